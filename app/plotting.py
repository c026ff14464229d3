"""``--plot FILE`` of ``cascade calibrate`` and ``cascade replay``: checked before any work is done.

matplotlib is the optional ``plot`` extra. After a whole replay, a missing directory or an unknown format
was a matplotlib traceback, and a name without a suffix was written as another file than the one printed
("curve" became "curve.png"): :func:`plot_problem` says what is wrong first.
"""

from __future__ import annotations

import os
from pathlib import Path

INSTALL_HINT = "--plot needs matplotlib: pip install 'cascade-proxy[plot]' (or pip install matplotlib)"
PLOT_FORMATS = (".png", ".svg", ".pdf")


def plot_problem(path: str) -> str | None:
    """Why ``--plot path`` cannot be written (format, directory, permissions, matplotlib), or None."""
    p = Path(path)
    if p.suffix.lower() not in PLOT_FORMATS:
        return f"--plot: {path} must end in {', '.join(PLOT_FORMATS)}"
    if p.is_dir():
        return f"--plot: {path} is a directory"
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        return f"--plot: {parent} is not a directory"
    if not os.access(parent, os.W_OK):
        return f"--plot: {parent} is not writable"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return INSTALL_HINT
    return None
