"""Every RPC of every service in the protos has an entry in the auth policy table
(services/platform/auth.py): a new RPC without one fails here, not at run time as a refusal to
everyone (or as the auth interceptor refusing to start)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services._gen.tokenledger.v1 import context_pb2, ledger_pb2
from services.platform.auth import (
    POLICIES,
    ROLES,
    Authenticator,
    AuthInterceptor,
    KeyStore,
    unguarded_methods,
)

OURS = (ledger_pb2.DESCRIPTOR, context_pb2.DESCRIPTOR)
"""Every file of ours that declares services, with every service in it (not only those the
auth module lists): a new service is caught too."""
OPEN = (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
"""Health checking and reflection answer anyone, by design: no policy, and auth lets them by."""


def _methods(*files: FileDescriptor) -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for file in files
        for service in file.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_of_our_protos_has_an_auth_policy() -> None:
    missing = sorted(_methods(*OURS) - POLICIES.keys())
    assert not missing, f"RPCs without an entry in services/platform/auth.py: {missing}"
    assert not unguarded_methods()


def test_every_auth_policy_names_an_rpc_of_our_protos() -> None:
    """A policy left behind by a renamed or removed RPC is not silently kept."""
    stale = sorted(POLICIES.keys() - _methods(*OURS))
    assert not stale, f"policies of no RPC: {stale}"


def test_every_policy_allows_at_least_one_known_role() -> None:
    for method, policy in POLICIES.items():
        assert policy.roles, method
        assert policy.roles <= set(ROLES), method


async def _behavior(request: Any, context: Any) -> None:
    return None


def test_health_and_reflection_stay_open_and_our_rpcs_are_guarded() -> None:
    """The auth interceptor passes health and reflection through untouched, and wraps every
    RPC of ours."""
    open_methods = _methods(*OPEN)
    assert open_methods and not open_methods & POLICIES.keys()
    interceptor = AuthInterceptor(Authenticator("api_key", KeyStore(None)))  # type: ignore[arg-type]
    for method in sorted(open_methods):
        assert interceptor.wrap(_behavior, method) is _behavior, method
    for method in sorted(_methods(*OURS)):
        assert interceptor.wrap(_behavior, method) is not _behavior, method
