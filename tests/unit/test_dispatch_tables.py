"""Dispatch by table: every command type the domain decides, and every write the application
accepts, has exactly one entry, so a new command cannot be forgotten in one of them."""

from __future__ import annotations

from typing import get_args

from ledger import application, domain


def test_every_decidable_command_has_a_decider() -> None:
    assert set(domain._DECIDERS) == set(get_args(domain.Decidable))


def test_every_write_has_a_handler() -> None:
    assert set(application._HANDLERS) == set(get_args(application.Write))
