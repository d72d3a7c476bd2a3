"""The import rules of DESIGN §1, read from the source with `ast`: every import of every module
under ledger/, services/ (but services/_gen) and migrations/, those inside functions and
`if TYPE_CHECKING:` blocks included, and `importlib.import_module("…")` with a literal name.

- `ledger` imports no `services`, grpc, protobuf (`google.protobuf`, `google.rpc`) or
  OpenTelemetry; of `ledger`, only the PostgreSQL adapter (`ledger.postgres`) imports a
  database driver or is imported (the application reaches it through ledger/ports.py, and
  the composition roots name it); a pure ledger module imports, of `ledger`, only pure
  modules, and no database driver;
- `services.platform` imports neither `services.ledger` nor `services.context` (nor the
  `services.cli` entry point), and of `ledger` only pure modules and `ledger.postgres.errors`
  (PLATFORM_LEDGER_ADAPTER_MODULES);
- `services.context` imports no `services.ledger` (nor `services.cli`), and of `ledger` only
  pure modules;
- `services.ledger` imports no `services.context` (nor `services.cli`): two processes;
- `services.client` (the Python client, installable without the servers' packages) imports,
  of this repository, only itself and the generated stubs, and no database driver, server
  package or OpenTelemetry: gRPC, protobuf and what its integrations wrap (openai, litellm);
- `migrations` imports neither `ledger` nor `services`.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PURE_LEDGER_MODULES = frozenset(
    {
        "ledger.limits",
        "ledger.errors",
        "ledger.model",
        "ledger.domain",
        "ledger.validation",
        "ledger.reads",
        "ledger.replay",
        "ledger.codec",
        "ledger.usage",
        "ledger.checkpoints",
        "ledger.money",
    }
)
"""Ledger modules that do no I/O: the only ones `services.platform` and `services.context` may
import. A new pure module goes here; the rules below then hold it to importing pure ones only."""

PLATFORM_LEDGER_ADAPTER_MODULES = frozenset({"ledger.postgres.errors"})
"""The one impure ledger module `services.platform` may import: the API key store reads the
database, and its errors are translated as the ledger's are (failover-class: StoreUnavailable)."""

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("ledger", "services", "migrations")
SKIPPED = ("services/_gen",)
"""Generated stubs: rebuilt by `make proto`, never edited by hand."""
GRPC = ("grpc", "grpc_status", "grpc_health", "grpc_reflection", "grpc_tools")
PROTOBUF = ("google.protobuf", "google.rpc")
DATABASE_DRIVERS = ("psycopg", "psycopg_pool", "sqlalchemy", "alembic")
SERVER_PACKAGES = (
    "structlog", "opentelemetry", "tiktoken", "pgserver", "nats", "httpx", "rich",
    "prometheus_client", "grpc_status", "grpc_health", "grpc_reflection",
)  # fmt: skip
"""The `server` extra: a client installed alone does not have them."""


@dataclass(frozen=True)
class Import:
    path: str
    """The importing file, relative to the root, e.g. services/context/server.py."""
    line: int
    source: str
    """The importing module, e.g. services.context.server."""
    target: str
    """The imported module, e.g. services.platform.auth (`from a import b` gives a.b when b is
    a module, else a)."""


def _under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _impure_ledger(target: str) -> bool:
    return _under(target, "ledger") and target not in PURE_LEDGER_MODULES


@dataclass(frozen=True)
class Rule:
    applies: Callable[[str], bool]
    """Whether the rule binds the importing module."""
    forbids: Callable[[str], bool]
    """Whether the imported module breaks it."""
    text: str


RULES = (
    Rule(
        lambda m: _under(m, "ledger"),
        lambda t: _under(t, "services", "opentelemetry", *GRPC, *PROTOBUF),
        "ledger imports no services, grpc, protobuf or opentelemetry",
    ),
    Rule(
        lambda m: _under(m, "ledger") and not _under(m, "ledger.postgres"),
        lambda t: _under(t, *DATABASE_DRIVERS, "ledger.postgres"),
        "of ledger, only the PostgreSQL adapter (ledger.postgres) touches the database",
    ),
    Rule(
        lambda m: m in PURE_LEDGER_MODULES,
        lambda t: _impure_ledger(t) or _under(t, *DATABASE_DRIVERS),
        "a pure ledger module imports only pure ledger modules and no database driver",
    ),
    Rule(
        lambda m: _under(m, "services.platform"),
        lambda t: (
            _under(t, "services.ledger", "services.context", "services.cli")
            or (_impure_ledger(t) and t not in PLATFORM_LEDGER_ADAPTER_MODULES)
        ),
        "services.platform imports neither services.ledger nor services.context, and of "
        "ledger only pure modules and ledger.postgres.errors",
    ),
    Rule(
        lambda m: _under(m, "services.context"),
        lambda t: _under(t, "services.ledger", "services.cli") or _impure_ledger(t),
        "services.context imports no services.ledger, and of ledger only pure modules",
    ),
    Rule(
        lambda m: _under(m, "services.ledger"),
        lambda t: _under(t, "services.context", "services.cli"),
        "services.ledger imports no services.context",
    ),
    Rule(
        lambda m: _under(m, "services.client"),
        lambda t: (
            _under(t, "ledger", "migrations", "services.platform", "services.ledger")
            or _under(t, "services.context", "services.cli", *DATABASE_DRIVERS, *SERVER_PACKAGES)
        ),
        "services.client imports only itself, the generated stubs, gRPC and protobuf",
    ),
    Rule(
        lambda m: _under(m, "migrations"),
        lambda t: _under(t, "ledger", "services"),
        "migrations imports neither ledger nor services",
    ),
)


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(root: Path, dotted: str) -> bool:
    base = root.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def _from_base(root: Path, path: Path, node: ast.ImportFrom) -> str:
    """The module a `from … import` names, relative imports resolved against `path`."""
    if not node.level:
        return node.module or ""
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package.pop()
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _dynamic(node: ast.Call) -> str | None:
    """The literal name of `importlib.import_module("…")` or `__import__("…")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def imports(root: Path, path: Path) -> Iterator[Import]:
    """Every import in `path`, wherever it stands in the file."""
    rel, source = path.relative_to(root).as_posix(), module_name(root, path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(rel, node.lineno, source, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(root, path, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                target = sub if alias.name != "*" and _is_module(root, sub) else base
                yield Import(rel, node.lineno, source, target)
        elif isinstance(node, ast.Call) and (name := _dynamic(node)):
            yield Import(rel, node.lineno, source, name)


def source_files(root: Path) -> list[Path]:
    files = (p for r in ROOTS if (root / r).is_dir() for p in (root / r).rglob("*.py"))
    return sorted(
        p
        for p in files
        if not any(p.relative_to(root).as_posix().startswith(s + "/") for s in SKIPPED)
    )


def violations(root: Path) -> list[str]:
    """`file:line: importer -> imported (the rule)` for each forbidden arrow under `root`."""
    found: dict[str, None] = {}  # `from a import b, c` is one arrow when b and c are names
    for path in source_files(root):
        for imp in imports(root, path):
            for rule in RULES:
                if rule.applies(imp.source) and rule.forbids(imp.target):
                    arrow = f"{imp.source} -> {imp.target}"
                    found[f"{imp.path}:{imp.line}: {arrow} ({rule.text})"] = None
                    break  # one rule named per arrow is enough
    return list(found)


# --- the repository ---------------------------------------------------------------------------


def test_no_module_imports_across_a_forbidden_arrow() -> None:
    """Every import of ledger/, services/ and migrations/ keeps the rules of DESIGN §1."""
    found = violations(REPO)
    assert not found, "forbidden imports:\n" + "\n".join(found)


def test_the_scan_reads_every_module_of_the_three_roots() -> None:
    """Nothing is skipped but the generated stubs, and each root has imports to check."""
    scanned = source_files(REPO)
    assert len(scanned) > 40
    assert not [p for p in scanned if "_gen" in p.parts]
    for root in ROOTS:
        assert any(imports(REPO, p) for p in scanned if p.relative_to(REPO).parts[0] == root)


def test_every_pure_ledger_module_exists() -> None:
    """A renamed or removed pure module must leave the allow-list too."""
    assert not [m for m in sorted(PURE_LEDGER_MODULES) if not _is_module(REPO, m)]


# --- the checker, on planted trees --------------------------------------------------------------

PACKAGES = (
    "ledger",
    "ledger/postgres",
    "services",
    "services/platform",
    "services/ledger",
    "services/context",
    "services/client",
    "services/_gen",
    "migrations",
)
MODULES = (
    "ledger/limits.py",
    "ledger/errors.py",
    "ledger/model.py",
    "ledger/validation.py",
    "ledger/application.py",
    "ledger/postgres/store.py",
    "ledger/postgres/audit.py",
    "ledger/postgres/errors.py",
    "services/cli.py",
    "services/platform/errors.py",
    "services/platform/serve.py",
    "services/ledger/server.py",
    "services/context/config.py",
    "services/context/server.py",
    "migrations/env.py",
)


def _plant(root: Path, files: dict[str, str]) -> Path:
    """A tree with the real packages' shape (empty modules), then `files` written over it."""
    for package in PACKAGES:
        (root / package).mkdir(parents=True, exist_ok=True)
        (root / package / "__init__.py").write_text("")
    for module in MODULES:
        (root / module).write_text("")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


PLANTED = {
    "ledger-application-reaches-for-the-database": (
        "ledger/application.py",
        "def f():\n    from ledger.postgres import store\n",
        "ledger/application.py:2: ledger.application -> ledger.postgres.store",
    ),
    "ledger-grpc-in-a-function": (
        "ledger/postgres/store.py",
        "def f():\n    import grpc\n",
        "ledger/postgres/store.py:2: ledger.postgres.store -> grpc",
    ),
    "ledger-services-under-type-checking": (
        "ledger/model.py",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from services.platform import errors\n",
        "ledger/model.py:3: ledger.model -> services.platform.errors",
    ),
    "ledger-protobuf": (
        "ledger/postgres/audit.py",
        "from google.protobuf import any_pb2\n",
        "ledger/postgres/audit.py:1: ledger.postgres.audit -> google.protobuf",
    ),
    "ledger-google-rpc": (
        "ledger/postgres/audit.py",
        "import google.rpc.status_pb2\n",
        "ledger/postgres/audit.py:1: ledger.postgres.audit -> google.rpc.status_pb2",
    ),
    "ledger-opentelemetry": (
        "ledger/postgres/store.py",
        "from opentelemetry import trace\n",
        "ledger/postgres/store.py:1: ledger.postgres.store -> opentelemetry",
    ),
    "pure-imports-io": (
        "ledger/validation.py",
        "from ledger.postgres.audit import GROUPS\n",
        "ledger/validation.py:1: ledger.validation -> ledger.postgres.audit",
    ),
    "pure-imports-driver": (
        "ledger/model.py",
        "import psycopg\n",
        "ledger/model.py:1: ledger.model -> psycopg",
    ),
    "platform-ledger-edge": (
        "services/platform/errors.py",
        "from services.ledger import server\n",
        "services/platform/errors.py:1: services.platform.errors -> services.ledger.server",
    ),
    "platform-context-relative": (
        "services/platform/serve.py",
        "from ..context import config\n",
        "services/platform/serve.py:1: services.platform.serve -> services.context.config",
    ),
    "platform-store": (
        "services/platform/db.py",
        "x = 1\nimport ledger.postgres.store\n",
        "services/platform/db.py:2: services.platform.db -> ledger.postgres.store",
    ),
    "platform-adapter-beside-the-errors": (
        "services/platform/auth.py",
        "from ledger.postgres.errors import translated\nfrom ledger.postgres import audit\n",
        "services/platform/auth.py:2: services.platform.auth -> ledger.postgres.audit",
    ),
    "platform-adapter-package": (
        "services/platform/db.py",
        "import ledger.postgres\n",
        "services/platform/db.py:1: services.platform.db -> ledger.postgres",
    ),
    "context-adapter-errors": (
        "services/context/service.py",
        "from ledger.postgres.errors import translate\n",
        "services/context/service.py:1: services.context.service -> ledger.postgres.errors",
    ),
    "platform-cli": (
        "services/platform/auth.py",
        "def f():\n    from services import cli\n",
        "services/platform/auth.py:2: services.platform.auth -> services.cli",
    ),
    "context-ledger-edge": (
        "services/context/server.py",
        "import services.ledger\n",
        "services/context/server.py:1: services.context.server -> services.ledger",
    ),
    "context-store": (
        "services/context/requests.py",
        "from ledger.postgres import store\n",
        "services/context/requests.py:1: services.context.requests -> ledger.postgres.store",
    ),
    "context-dynamic": (
        "services/context/service.py",
        "import importlib\nimportlib.import_module('ledger.application')\n",
        "services/context/service.py:2: services.context.service -> ledger.application",
    ),
    "ledger-edge-context": (
        "services/ledger/server.py",
        "from services.context.server import ContextServer\n",
        "services/ledger/server.py:1: services.ledger.server -> services.context.server",
    ),
    "client-platform-errors": (
        "services/client/errors.py",
        "from services.platform.errors import TABLE\n",
        "services/client/errors.py:1: services.client.errors -> services.platform.errors",
    ),
    "client-ledger-errors": (
        "services/client/hold.py",
        "def f():\n    from ledger import errors\n",
        "services/client/hold.py:2: services.client.hold -> ledger.errors",
    ),
    "client-driver": (
        "services/client/client.py",
        "import psycopg\n",
        "services/client/client.py:1: services.client.client -> psycopg",
    ),
    "client-server-package": (
        "services/client/client.py",
        "from opentelemetry import trace\n",
        "services/client/client.py:1: services.client.client -> opentelemetry",
    ),
    "client-grpc-status": (
        "services/client/errors.py",
        "from grpc_status import rpc_status\n",
        "services/client/errors.py:1: services.client.errors -> grpc_status",
    ),
    "migrations-ledger": (
        "migrations/env.py",
        "from ledger.model import Event\n",
        "migrations/env.py:1: migrations.env -> ledger.model",
    ),
    "migrations-services": (
        "migrations/versions/0009_x.py",
        "def upgrade():\n    from services.platform import serve\n",
        "migrations/versions/0009_x.py:2: migrations.versions.0009_x -> services.platform.serve",
    ),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_a_planted_forbidden_import_is_reported_with_file_line_and_arrow(
    case: str, tmp_path: Path
) -> None:
    rel, text, expected = PLANTED[case]
    found = violations(_plant(tmp_path, {rel: text}))
    assert len(found) == 1, found
    assert found[0].startswith(expected + " ("), found


CLEAN = {
    "ledger/domain.py": "from ledger import errors\nfrom ledger.model import Event\n",
    "ledger/validation.py": "from . import limits\nfrom ledger.errors import InvalidArgument\n",
    "ledger/postgres/store.py": "import psycopg\nfrom ledger.postgres.audit import LedgerAudit\n",
    "ledger/application.py": "from ledger.ports import Store\nfrom ledger import domain\n",
    "services/platform/errors.py": "import grpc\nfrom google.rpc import status_pb2\n"
    "from opentelemetry import trace\nfrom ledger import errors\nimport migrations\n",
    "services/platform/auth.py": "from services._gen.tokenledger.v1 import ledger_pb2\n"
    "from .errors import pack\nfrom ledger.postgres.errors import translated\n",
    "services/context/requests.py": "from typing import TYPE_CHECKING\n"
    "from ledger.validation import Checker\nfrom ..platform import errors\n"
    "if TYPE_CHECKING:\n    from ledger import limits\n",
    "services/ledger/server.py": "from ledger.postgres.store import PostgresStore\n"
    "from services.platform.serve import serve_until_signalled\n",
    "services/cli.py": "def main():\n    import services.context.server\n"
    "    import services.ledger.server\n",
    "services/_gen/stub.py": "import services.ledger\n",
    "services/client/client.py": "import grpc\nfrom google.rpc import status_pb2\n"
    "from services._gen.tokenledger.v1 import ledger_pb2\nfrom .errors import LedgerError\n"
    "import openai\n",
    "migrations/env.py": "import alembic\nfrom sqlalchemy import text\n",
}


def test_a_tree_that_keeps_the_rules_reports_nothing(tmp_path: Path) -> None:
    """Allowed arrows pass (pure ledger modules, platform, _gen, the entry point, relative
    imports), and the generated stubs are not read."""
    assert violations(_plant(tmp_path, CLEAN)) == []


def test_one_import_planted_in_a_clean_tree_is_the_one_reported(tmp_path: Path) -> None:
    planted = {**CLEAN, "services/context/extra.py": "import services.ledger.server\n"}
    found = violations(_plant(tmp_path, planted))
    assert len(found) == 1, found
    assert found[0].startswith(
        "services/context/extra.py:1: services.context.extra -> services.ledger.server ("
    )


_LOADED = (
    "import os, sys; os.environ['LITELLM_LOCAL_MODEL_COST_MAP'] = 'True'\n"
    "import {modules}\n"
    "roots = {roots!r}\n"
    "ours = ('services.platform', 'services.ledger', 'services.context')\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] in roots"
    " or m.startswith(ours) or m == 'services.cli'))\n"
)
_SERVER_SIDE = ("ledger", "migrations", "psycopg", "psycopg_pool", "sqlalchemy", "alembic",
                "structlog", "pgserver", "nats")  # fmt: skip


def _loaded(modules: str, roots: tuple[str, ...]) -> list[str]:
    code = _LOADED.format(modules=modules, roots=roots)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    return list(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_importing_the_client_loads_no_server_module_nor_the_server_extra() -> None:
    """What the rules say of the source, proven on a fresh interpreter: services.client loads
    nothing of ledger/, the servers, a database driver or the server extra's packages."""
    roots = (*_SERVER_SIDE, "tiktoken", "opentelemetry", "grpc_status", "rich")  # grpc itself
    # imports grpc_health and grpc_reflection when they are installed: not ours to refuse
    assert _loaded("services.client, services.client.hold, services.client.counting", roots) == []


def test_importing_the_integrations_loads_no_server_module() -> None:
    """The OpenAI wrapper and the LiteLLM callback load nothing of ours server-side (what
    openai and litellm import for themselves is theirs)."""
    modules = "services.client.openai, services.client.litellm, services.client.litellm_proxy"
    assert _loaded(modules, _SERVER_SIDE) == []
