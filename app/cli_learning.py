"""``cascade calibrate`` and ``cascade replay`` (filled in by the learning work)."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(sub: Any) -> None:
    _ = (sub, argparse)
