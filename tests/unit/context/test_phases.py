"""PrepareContext's two kinds of phases, held by reading the code (ast): pure planning and
fitting never reach for I/O, and nothing in a worker thread waits on the event loop."""

from __future__ import annotations

import ast
from pathlib import Path

CONTEXT = Path(__file__).resolve().parents[3] / "services" / "context"
PURE = ("planning.py", "fitting.py", "summarizer.py", "relevance.py", "messages.py")
IO_MODULES = ("grpc", "httpx", "urllib", "requests", "socket", "asyncio", "psycopg")
IO_CONTEXT_MODULES = ("ledger_client", "remote_summarizer", "service", "server")


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def _calls(path: Path) -> set[str]:
    """Dotted names called in `path` (e.g. asyncio.run_coroutine_threadsafe)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            names.add(ast.unparse(node.func))
    return names


def test_planning_and_fitting_import_nothing_that_does_io() -> None:
    for name in PURE:
        for module in _imports(CONTEXT / name):
            top = module.split(".")[0]
            assert top not in IO_MODULES, f"{name} imports {module}"
            assert module.rsplit(".", 1)[-1] not in IO_CONTEXT_MODULES, f"{name} imports {module}"


def test_no_thread_hops_back_onto_the_event_loop() -> None:
    """Threads are only ever handed work by the loop (run_in_executor), never the reverse."""
    hops = ("run_coroutine_threadsafe", "call_soon_threadsafe", "asyncio.run")
    for path in sorted(CONTEXT.rglob("*.py")):
        calls = {c for c in _calls(path) if any(c.endswith(h) for h in hops)}
        if path.name == "server.py":
            calls.discard("asyncio.run")  # the process's entry point starts the loop
        assert not calls, f"{path.relative_to(CONTEXT)} calls {sorted(calls)}"


def test_the_summarizer_endpoint_is_called_with_an_async_client() -> None:
    imports = _imports(CONTEXT / "remote_summarizer.py")
    assert "httpx" in imports
    assert not {m for m in imports if m.split(".")[0] in ("urllib", "requests", "http")}
