"""`tokenledger run` (what `make run` runs): the ledger and the context service, each in a
child process, stopping as a whole. Before starting either it checks both configurations and
that both ports are free, and refuses in one line naming the setting to change. Once they
run, when one of them exits the other is stopped: a service that could not start has said
why in one line (exit code 2); any other exit is named here. SIGTERM or SIGINT stops both
gracefully."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from services.ledger.config import Settings
from services.platform.config import ConfigError
from services.platform.serve import STARTUP_FAILED_EXIT_CODE, StartupFailure, check_listen

POLL_S = 0.1
STOP_TIMEOUT_S = 60.0
"""How long a child may take to stop gracefully (its own grace period is 10 s by default)
before it is killed."""


def add_command(sub: Any) -> None:
    p = sub.add_parser("run", help="serve the ledger and the context service; stop both as one")
    p.set_defaults(run=cmd_run)


def cmd_run(_args: argparse.Namespace) -> int:
    env = dict(os.environ)
    try:
        ledger_listen = _preflight(env)
    except (ConfigError, StartupFailure) as exc:
        print(f"tokenledger run: {exc}", file=sys.stderr)
        return STARTUP_FAILED_EXIT_CODE
    # The context service reaches the ledger started here unless told otherwise: a newcomer
    # who moves the ledger's port need not move the context service's target too.
    context_env = {"TOKENLEDGER_LEDGER_TARGET": ledger_listen} | env
    children = {
        "ledger": _spawn("serve", env),
        "context service": _spawn("context-serve", context_env),
    }
    return _supervise(children)


def _preflight(env: Mapping[str, str]) -> str:
    """Both configurations parse and both ports are free; the ledger's address."""
    # Here, not at the top: it loads the tokenizer registry, a second on every `tokenledger`.
    from services.context.config import ContextSettings

    ledger, context = Settings.from_env(env), ContextSettings.from_env(env)
    if ledger.listen == context.listen:
        raise ConfigError(
            f"TOKENLEDGER_LISTEN and TOKENLEDGER_CONTEXT_LISTEN are both {ledger.listen}; "
            "set one of them to another port"
        )
    check_listen("ledger", ledger.listen, "TOKENLEDGER_LISTEN")
    check_listen("context service", context.listen, "TOKENLEDGER_CONTEXT_LISTEN")
    for metrics, setting in (
        (ledger.metrics.listen, "TOKENLEDGER_METRICS_LISTEN"),
        (context.metrics.listen, "TOKENLEDGER_CONTEXT_METRICS_LISTEN"),
    ):
        if metrics:
            check_listen("metrics", metrics, setting)
    return ledger.listen


def _spawn(command: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "services.cli", command], env=env)


def _supervise(children: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait for a signal or for a child to exit; then stop every child. The exit code: 0 on a
    signal, else the code of the child that exited first (1 if it died of a signal)."""
    signalled: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _frame: signalled.append(number))
    while not signalled:
        exited = [(name, p.returncode) for name, p in children.items() if p.poll() is not None]
        if exited:
            break
        time.sleep(POLL_S)
    _stop(children.values())
    if signalled:
        return 0
    name, code = exited[0]
    if code != STARTUP_FAILED_EXIT_CODE:  # exit code 2: the child has said why, in one line
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited ({code})"
        others = " and ".join(n for n in children if n != name)
        print(f"tokenledger run: the {name} {how}; stopped the {others}", file=sys.stderr)
    return code if code > 0 else 1


def _stop(children: Any) -> None:
    """SIGTERM to every child still running, then wait; SIGKILL to any that takes too long."""
    running = [p for p in children if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
