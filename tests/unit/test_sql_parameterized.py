"""SQL is parameterized everywhere: request values only ever travel as query parameters.

How it is checked, in three layers:
1. ruff's S608 (SQL built with f-strings, `%`, `.format` or `+` around SQL keywords) is
   selected in pyproject.toml and run here over ledger/, services/ and migrations/;
2. each `# noqa: S608` there is a reviewed exception, listed below with why the interpolated
   parts are constants (column lists, WHERE clauses of constant text with %s placeholders,
   a table name from a fixed tuple): a new or edited suppression fails until reviewed;
3. an AST walk finds `.execute(...)` / `.executemany(...)` whose query is built in the call
   (f-string, `+`, `%`, `.format`) from a variable that is not an ALL_CAPS constant; each such
   place is listed below too.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("ledger", "services", "migrations")
RUFF = Path(sys.executable).parent / "ruff"
_RECORDS = (
    "column names and types from module constants (codec.EVENT_COLUMNS, the _*_TYPES dicts, "
    "COUNTER_NAMES); every value is in the one %(rows)s jsonb parameter"
)
_WHERE = "a WHERE clause from scope_where(): constant text, values as %s parameters"

REVIEWED_S608: dict[tuple[str, str], str] = {
    ("ledger/postgres/rows.py", 'f"SELECT {ACCOUNT_COLUMNS} FROM accounts "'): (
        "constant column list; the keys are two array parameters"
    ),
    (
        "ledger/postgres/verify.py",
        "query = f\"COPY (SELECT {', '.join(names)} FROM events WHERE {where} "
        'ORDER BY position) "',
    ): "constant column names; " + _WHERE + " (a Part adds constant text and %s parameters)",
    (
        "ledger/postgres/verify.py",
        'query = f"SELECT {columns} FROM {table} WHERE {clause}"',
    ): (
        "columns and table are constants from _Live.read's four calls; the clause is a "
        "Part's (" + _WHERE + ", constant text and %s parameters) or _Touched.where's "
        "(constant text, the keys as array parameters)"
    ),
    (
        "ledger/postgres/checkpoints.py",
        'f"SELECT {_COLUMNS} FROM audit_checkpoints WHERE tenant_id = %s ORDER BY seq",',
    ): "constant column list; the tenant is a parameter",
    ("ledger/postgres/checkpoints.py", 'f"INSERT INTO audit_checkpoints ({_COLUMNS}) "'): (
        "constant column list; every value is a parameter"
    ),
    ("ledger/postgres/audit.py", "f\"SELECT {', '.join([*columns, sums])} FROM usage_hourly \""): (
        "columns from GROUPS (a constant table keyed by validated dimension names), sums "
        "from COUNTER_NAMES; the WHERE parts are constant text with %s, values are params"
    ),
    ("ledger/postgres/audit.py", 'f"SELECT {_EVENT_COLUMNS} FROM events "'): (
        "constant column list; the tenant filter is one of two constant strings"
    ),
    (
        "ledger/postgres/audit.py",
        'sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where} AND position >= %s"',
    ): _WHERE,
    ("ledger/postgres/store.py", 'f"SELECT {RESERVATION_COLUMNS} FROM reservations "'): (
        "constant column list; get_reservation passes ids as parameters, _reservations_sql "
        "gets constant WHERE text from its two callers in _Unit.read_locked"
    ),
    ("ledger/postgres/store.py", 'f"DELETE FROM {table} WHERE tenant_id = %s",'): (
        "table from a fixed tuple of projection table names; the tenant is a parameter"
    ),
    ("ledger/postgres/store.py", 'f"INSERT INTO rate_limits ({RATE_LIMIT_COLUMNS}) VALUES "'): (
        "constant column list; values are %s parameters"
    ),
    (
        "ledger/postgres/store.py",
        'f"SELECT {ACCOUNT_COLUMNS} FROM accounts WHERE tenant_id = %(tenant)s "',
    ): "constant column list; the keys are two array parameters, the reservations one",
    (
        "ledger/postgres/store.py",
        'f"SELECT {RATE_LIMIT_COLUMNS} FROM rate_limits WHERE tenant_id = %(tenant)s "',
    ): "constant column list; the keys are two array parameters, the reservations one",
    ("ledger/postgres/store.py", '"INSERT INTO accounts (tenant_id, user_id, conversation_id) "'): (
        "constant column list (RETURNING); the keys are two array parameters"
    ),
    (
        "ledger/postgres/store.py",
        'f"user_id = ANY({_USERS}) AND (user_id, conversation_id) IN (SELECT u, c FROM unnest("',
    ): "constant fragments (_USERS, _OWNERS); the keys and the reservations are parameters",
    # The hot tables' writes: one statement a table, the rows one jsonb parameter spread by
    # _recordset (constant names and types) into typed columns.
    ("ledger/postgres/store.py", "f\"INSERT INTO events ({', '.join(_EVENT_TYPES)}) \""): _RECORDS,
    ("ledger/postgres/store.py", '"UPDATE accounts AS a SET "'): _RECORDS,
    ("ledger/postgres/store.py", 'f"INSERT INTO reservations ({RESERVATION_COLUMNS}) "'): _RECORDS,
    ("ledger/postgres/store.py", '"UPDATE reservations AS t SET "'): _RECORDS,
    ("ledger/postgres/store.py", "f\"INSERT INTO usage_hourly ({', '.join(_USAGE_TYPES)}) \""): (
        _RECORDS
    ),
    (
        "ledger/postgres/store.py",
        "f\"INSERT INTO idempotency_keys ({', '.join(_OUTCOME_TYPES)}) \"",
    ): _RECORDS,
}
"""(file, the suppressed line without its comment) -> why it is safe."""

_PARTITION = (
    "a partition of events named events_YYYY_MM, read from pg_inherits, composed with "
    "psycopg.sql.Identifier (quoted) into constant sql.SQL text"
)

REVIEWED_DYNAMIC: dict[tuple[str, str, str], str] = {
    ("ledger/postgres/audit.py", "query_usage", "sql"): (
        "from _usage_sql (reviewed S608 above); LIMIT and OFFSET are %s parameters"
    ),
    ("ledger/postgres/store.py", "replace_projections", "table"): (
        "loops over a fixed tuple of projection table names"
    ),
    ("ledger/postgres/archive.py", "prune", "table"): _PARTITION,
    ("ledger/postgres/archive.py", "_check_covered", "table"): _PARTITION,
}
"""(file, function, variable) of SQL built inside an execute call -> why it is safe."""

_CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*")
_NOQA = re.compile(r"#\s*noqa:[^#\n]*\bS608\b")


def sources() -> list[Path]:
    return sorted(p for root in ROOTS for p in (REPO / root).rglob("*.py") if "_gen" not in p.parts)


def suppressions() -> dict[tuple[str, str], int]:
    """(file, code of the line) -> line number of every `# noqa: S608`."""
    found: dict[tuple[str, str], int] = {}
    for path in sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _NOQA.search(line):
                code = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
                found[(str(path.relative_to(REPO)), code)] = number
    return found


def _dynamic_names(node: ast.expr) -> list[str]:
    """Variables interpolated into a query built by `node`, constants left out."""
    if isinstance(node, ast.JoinedStr):
        parts: list[ast.expr] = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
    elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod):
        parts = [node.left, node.right]
    elif (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "format"
    ):
        parts = [*node.args, *(k.value for k in node.keywords)]
    else:
        return []
    nodes = [n for part in parts for n in ast.walk(part)]
    # `for c in COLUMNS.split(",")` inside the query: c is as constant as COLUMNS
    derived = {
        target.id
        for comp in nodes
        if isinstance(comp, ast.comprehension)
        and all(_CONSTANT.fullmatch(n.id) for n in ast.walk(comp.iter) if isinstance(n, ast.Name))
        for target in ast.walk(comp.target)
        if isinstance(target, ast.Name)
    }
    names = {
        n.id
        for n in nodes
        if isinstance(n, ast.Name) and not _CONSTANT.fullmatch(n.id) and n.id not in derived
    }
    return sorted(names)


def built_queries(tree: ast.AST) -> list[tuple[str, str, int]]:
    """(function, variable, line) of each variable interpolated into the query argument of an
    `.execute` / `.executemany` call."""
    found: list[tuple[str, str, int]] = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("execute", "executemany")
            and node.args
        ):
            found.extend((function, name, node.lineno) for name in _dynamic_names(node.args[0]))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_ruff_selects_s608() -> None:
    """The lint rule is on for the whole project (make lint runs it, and so does this file)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    selected = config["tool"]["ruff"]["lint"]["select"]
    assert "S608" in selected or "S" in selected
    assert "S608" not in config["tool"]["ruff"]["lint"].get("ignore", [])


def test_ruff_finds_no_unsuppressed_string_built_sql() -> None:
    result = subprocess.run(
        [str(RUFF), "check", "--select", "S608", "--quiet", *ROOTS],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_s608_flags_a_query_built_from_a_request_value(tmp_path: Path) -> None:
    """The rule catches the pattern it is here for (with the project's configuration)."""
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def find(conn, tenant):\n"
        "    return conn.execute(f\"SELECT * FROM events WHERE tenant_id = '{tenant}'\")\n"
    )
    result = subprocess.run(
        [str(RUFF), "check", "--config", str(REPO / "pyproject.toml"), "--no-cache", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "S608" in result.stdout, result.stdout + result.stderr


def test_every_s608_suppression_is_reviewed() -> None:
    """A new `# noqa: S608`, or an edit to a suppressed line, fails here until someone reads
    it and adds it to REVIEWED_S608 with the reason it is safe; stale entries fail too."""
    found = suppressions()
    unreviewed = [f"{f}:{line}: {code}" for (f, code), line in found.items()
                  if (f, code) not in REVIEWED_S608]  # fmt: skip
    assert not unreviewed, "review these S608 suppressions:\n" + "\n".join(unreviewed)
    stale = [f"{f}: {code}" for f, code in REVIEWED_S608 if (f, code) not in found]
    assert not stale, "reviewed suppressions no longer in the code:\n" + "\n".join(stale)


def test_queries_built_in_execute_calls_interpolate_only_reviewed_values() -> None:
    """No `.execute(f"... {value} ...")`, `.execute(sql + value)` or `%`/`.format` with a
    variable, unless the variable is listed as reviewed (ALL_CAPS constants pass)."""
    seen: set[tuple[str, str, str]] = set()
    offenders = []
    for path in sources():
        rel = str(path.relative_to(REPO))
        for function, name, line in built_queries(ast.parse(path.read_text())):
            seen.add((rel, function, name))
            if (rel, function, name) not in REVIEWED_DYNAMIC:
                offenders.append(f"{rel}:{line} in {function}(): {name}")
    assert not offenders, "queries built from variables:\n" + "\n".join(offenders)
    stale = sorted(set(REVIEWED_DYNAMIC) - seen)
    assert not stale, f"reviewed entries no longer in the code: {stale}"


@pytest.mark.parametrize(
    ("code", "names"),
    [
        ('conn.execute(f"SELECT * FROM t WHERE id = {request.id}")', ["request"]),
        ('cur.executemany("DELETE FROM t WHERE id = " + key, rows)', ["key"]),
        ('conn.execute("SELECT %s" % value)', ["value"]),
        ('conn.execute("SELECT {}".format(value))', ["value"]),
        ('conn.execute(f"SELECT {COLUMNS} FROM t WHERE id = %s", (value,))', []),
        ('conn.execute("SELECT * FROM t WHERE id = %s", (value,))', []),
        ("conn.execute(f\"SELECT {', '.join(c for c in COLUMNS)} FROM t\")", []),
        ("conn.execute(f\"SELECT {', '.join(c for c in value)} FROM t\")", ["c", "value"]),
    ],
)
def test_the_ast_check_sees_interpolated_variables(code: str, names: list[str]) -> None:
    source = f"def handler(conn, cur, request, key, value, rows):\n    {code}"
    found = built_queries(ast.parse(source))
    assert [name for _, name, _ in found] == names
