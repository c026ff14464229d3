"""``cascade calibrate``: fit thresholds from the trace store (see issue: learning)."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    """Register the learning subcommands on the ``cascade`` parser."""
