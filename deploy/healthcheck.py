"""The container's health probe: a grpc.health.v1 Check of one server, exit 0 when SERVING.

    python healthcheck.py [HOST:PORT] [--service NAME] [--timeout SECONDS]

The target defaults to $HEALTHCHECK_TARGET, else 127.0.0.1:50051 (the ledger); the service to
"" (the whole server). It needs only grpcio and grpcio-health-checking, which the image has,
and nothing is downloaded at build time for it (unlike grpc_health_probe). Kubernetes does not
use it: its probes speak gRPC health natively (`grpc: {port: ...}`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TARGET_DEFAULT = "127.0.0.1:50051"
TIMEOUT_S_DEFAULT = 3.0


def check(target: str, service: str = "", timeout_s: float = TIMEOUT_S_DEFAULT) -> str:
    """The server's status name for `service` (e.g. SERVING), or the gRPC error code's name."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("target", nargs="?", default=os.environ.get("HEALTHCHECK_TARGET"))
    parser.add_argument("--service", default="", help='default: "" (the whole server)')
    parser.add_argument("--timeout", type=float, default=TIMEOUT_S_DEFAULT, help="seconds")
    args = parser.parse_args(argv)
    target = args.target or TARGET_DEFAULT
    status = check(target, args.service, args.timeout)
    print(f"{target} {args.service or '(server)'}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
