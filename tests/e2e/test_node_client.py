"""A Node client built from proto/ alone (ours and the vendored google/rpc) reads a
BUDGET_EXHAUSTED refusal's ErrorInfo and QuotaFailure: tests/node/budget_exhausted.js, the
README's example, run with node against a real ledger. Its packages come from `make
node-deps` (var/node); without node or them the test skips, saying how to get them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from services._gen.tokenledger.v1 import ledger_pb2 as pb
from services.client import LedgerClient
from tests.support import ServerThread, new_id

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "tests" / "node" / "budget_exhausted.js"
NODE_MODULES = REPO / "var" / "node" / "node_modules"


def test_the_readme_shows_the_node_example_that_this_test_runs() -> None:
    readme = (REPO / "README.md").read_text()
    body = EXAMPLE.read_text().split("\n", 3)[3]  # the example without its header comment
    assert body.strip() in readme


@pytest.mark.skipif(
    shutil.which("node") is None or not (NODE_MODULES / "@grpc" / "grpc-js").is_dir(),
    reason="needs node and `make node-deps` (@grpc/grpc-js, @grpc/proto-loader in var/node)",
)
def test_a_node_client_reads_a_budget_exhausted_refusals_details(ledger: ServerThread) -> None:
    tenant = new_id("t")
    with LedgerClient(ledger.target) as c:
        c.set_quota(tenant_id=tenant, user_id="alice", limit=1_000, period=pb.PERIOD_DAY)
    env = os.environ | {"NODE_PATH": str(NODE_MODULES), "TOKENLEDGER_TARGET": ledger.target,
                        "TOKENLEDGER_PROTO": str(REPO / "proto"), "TENANT": tenant}  # fmt: skip
    out = subprocess.run(["node", str(EXAMPLE)], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.returncode == 0, out.stderr
    said = json.loads(out.stdout)
    assert (said["code"], said["reason"]) == ("RESOURCE_EXHAUSTED", "BUDGET_EXHAUSTED")
    assert said["metadata"]["requested"] == "100000000"
    assert said["metadata"]["available"] == said["metadata"]["reservable"] == "1000"
    assert said["quota"] == f"user:{tenant}/alice"
