"""The google/rpc protos our errors use ship beside ours (proto/google/rpc), unchanged from
googleapis with their license, and compile together with ours from proto/ alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.rpc import status_pb2

REPO = Path(__file__).resolve().parents[2]
VENDORED = REPO / "proto" / "google" / "rpc"
FILES = ("status.proto", "error_details.proto", "code.proto")


def test_each_vendored_file_is_googleapis_own_unchanged() -> None:
    upstream = Path(status_pb2.__file__).parent  # googleapis-common-protos ships the sources
    for name in FILES:
        assert (VENDORED / name).read_bytes() == (upstream / name).read_bytes(), name


def test_the_license_ships_with_them() -> None:
    license_text = (REPO / "proto" / "google" / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text


def test_ours_and_the_vendored_protos_compile_from_proto_alone(tmp_path: Path) -> None:
    """protoc with proto/ as the only import path (its own well-known types aside)."""
    ours = [f"tokenledger/v1/{n}.proto" for n in ("ledger", "context", "options")]
    sources = [f"google/rpc/{n}" for n in FILES] + ours
    out = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO / 'proto'}",
         f"--descriptor_set_out={tmp_path / 'all.pb'}", *sources],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "all.pb").read_bytes()).file
    messages = {m.name for f in files if f.package == "google.rpc" for m in f.message_type}
    assert {"Status", "ErrorInfo", "QuotaFailure", "RetryInfo", "BadRequest"} <= messages
