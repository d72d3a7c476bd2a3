"""`tokenledger demo` prints the README's round trip, line for line."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from services.cli import main
from tests.support import ServerThread, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
RUN_SPECIFIC = (
    (re.compile(r"alice-[0-9a-f]{8}"), "alice-<run>"),
    (re.compile(r"rsv_[0-9a-f]{32}"), "rsv_<id>"),
    (re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), "<date>"),
)
"""What differs between runs (a user of the run's own, the reservation id, tomorrow's date),
each of one length, so that even the wrapping is the same."""


def masked(text: str) -> list[str]:
    for pattern, mask in RUN_SPECIFIC:
        text = pattern.sub(mask, text)
    return text.splitlines()


def readme_transcript() -> str:
    section = README.read_text().split("## A round trip", 1)[1]
    return section.split("```text\n", 1)[1].split("```", 1)[0]


def test_demo_prints_exactly_the_readme_transcript(
    ledger: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["demo", "--target", ledger.target]) == 0
    printed = capsys.readouterr().out
    assert masked(printed) == masked(readme_transcript())
    # The balance shown is the user's (the conversation's would have no limit).
    assert "GetBalance the user -> user demo/alice-" in printed


def test_demo_without_a_ledger_says_so_within_a_second(
    capsys: pytest.CaptureFixture[str],
) -> None:
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert main(["demo", "--target", target]) == 2
    assert time.monotonic() - started < 2.5
    assert capsys.readouterr().err == (
        f"tokenledger demo: no ledger at {target}: start it with `make run`, or set "
        "TOKENLEDGER_TARGET\n"
    )
