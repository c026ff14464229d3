"""``cascade replay``: run a recorded dataset through the real HTTP path (see issue: learning)."""

from __future__ import annotations

from typing import Any


def add_commands(sub: Any) -> None:
    """Register the replay subcommands on the ``cascade`` parser."""
