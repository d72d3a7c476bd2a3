"""Every RPC of every service in the protos declares who may call it: the `tokenledger.v1.access`
method option (proto/tokenledger/v1/options.proto), read by the auth interceptor from the
method descriptors when a server starts. A new RPC without one fails here, not at run time as
the auth interceptor refusing to start."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from services._gen.tokenledger.v1 import context_pb2, ledger_pb2, options_pb2
from services.platform.auth import (
    ROLES,
    Authenticator,
    AuthInterceptor,
    KeyStore,
    policies,
    policy_of,
    unguarded_methods,
)

OURS = (ledger_pb2.DESCRIPTOR, context_pb2.DESCRIPTOR)
"""Every file of ours that declares services, with every service in it: a new service is
caught too."""
OPEN = (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
"""Health checking and reflection answer anyone, by design: no policy, and auth lets them by."""
SERVICES = [s for file in OURS for s in file.services_by_name.values()]
POLICIES = policies(*SERVICES)


def _methods(*files: FileDescriptor) -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for file in files
        for service in file.services_by_name.values()
        for method in service.methods
    }


def test_every_rpc_of_our_protos_has_an_auth_policy() -> None:
    missing = sorted(_methods(*OURS) - POLICIES.keys())
    assert not missing, f"RPCs without an `access` option in their proto: {missing}"
    assert not unguarded_methods(*SERVICES)


def test_every_auth_policy_names_an_rpc_of_our_protos() -> None:
    """Policies come from the RPCs themselves: none can outlive its RPC."""
    stale = sorted(POLICIES.keys() - _methods(*OURS))
    assert not stale, f"policies of no RPC: {stale}"


def test_every_policy_allows_at_least_one_known_role() -> None:
    for method, policy in POLICIES.items():
        assert policy.roles, method
        assert policy.roles <= set(ROLES), method


def test_the_roles_are_the_protos_role_enum() -> None:
    """The roles keys are created with (`tokenledger keys create --role`) are those the
    protos can name."""
    assert ROLES == ("writer", "reader", "auditor", "admin")
    assert options_pb2.Role.Name(options_pb2.ROLE_AUDITOR) == "ROLE_AUDITOR"


def test_tenant_fields_are_read_from_the_request() -> None:
    """`tenant_field` is a path into the request: the tenant of a QueryUsage is its query's."""
    prefix = "/tokenledger.v1.LedgerService/"
    query = POLICIES[prefix + "QueryUsage"].tenant
    reserve = POLICIES[prefix + "Reserve"].tenant
    assert query is not None and reserve is not None
    assert query(ledger_pb2.QueryUsageRequest(query=ledger_pb2.UsageQuery(tenant_id="t1"))) == "t1"
    assert reserve(ledger_pb2.ReserveRequest(tenant_id="t2")) == "t2"
    assert POLICIES[prefix + "SubscribeEvents"].empty_is_all
    assert POLICIES["/tokenledger.v1.ContextService/CountTokens"].tenant is None


async def _behavior(request: Any, context: Any) -> None:
    return None


def test_health_and_reflection_stay_open_and_our_rpcs_are_guarded() -> None:
    """The auth interceptor passes health and reflection through untouched, and wraps every
    RPC of ours."""
    open_methods = _methods(*OPEN)
    assert open_methods and not open_methods & POLICIES.keys()
    interceptor = AuthInterceptor(Authenticator("api_key", KeyStore(None, cache=False)), SERVICES)  # type: ignore[arg-type]
    for method in sorted(open_methods):
        assert interceptor.wrap(_behavior, method) is _behavior, method
    for method in sorted(_methods(*OURS)):
        assert interceptor.wrap(_behavior, method) is not _behavior, method


# --- the check itself, on a service whose RPC lacks the option ----------------------------------


def _service_without_a_policy(tenant_field: str = "tenant_id") -> ServiceDescriptor:
    """A copy of ContextService, in a pool of its own, whose CountTokens has no `access`
    option (and whose PrepareContext reads the tenant from `tenant_field`)."""
    pool = descriptor_pool.DescriptorPool()
    for file in (options_pb2.DESCRIPTOR, ledger_pb2.DESCRIPTOR, context_pb2.DESCRIPTOR):
        for dep in file.dependencies:
            if dep.name.startswith("google/"):
                proto = descriptor_pb2.FileDescriptorProto()
                dep.CopyToProto(proto)
                pool.Add(proto)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        if file is context_pb2.DESCRIPTOR:
            methods = {m.name: m for m in proto.service[0].method}
            methods["CountTokens"].ClearField("options")
            access = methods["PrepareContext"].options.Extensions[options_pb2.access]
            access.tenant_field = tenant_field
        pool.Add(proto)
    return pool.FindServiceByName("tokenledger.v1.ContextService")


def test_an_rpc_without_the_option_is_reported_and_stops_the_server() -> None:
    service = _service_without_a_policy()
    assert unguarded_methods(service) == ["/tokenledger.v1.ContextService/CountTokens"]
    count = service.methods_by_name["CountTokens"]
    assert policy_of(count) is None
    with pytest.raises(RuntimeError, match=r"without an auth policy: .*/CountTokens"):
        AuthInterceptor(Authenticator("api_key", KeyStore(None, cache=False)), [service])  # type: ignore[arg-type]


def test_a_tenant_field_the_request_lacks_is_refused_when_the_policy_is_read() -> None:
    service = _service_without_a_policy(tenant_field="query.tenant_id")
    with pytest.raises(ValueError, match=r"no string field 'query\.tenant_id'"):
        policy_of(service.methods_by_name["PrepareContext"])
