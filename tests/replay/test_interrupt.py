"""`cascade replay` stopped by SIGTERM (a job scheduler, `timeout`, `docker stop`) or Ctrl-C mid-run: its
in-process servers stop, its temporary directory (trace store, fitted scorers) goes, and it exits with
the shell's status for the signal and one line saying so. Before, SIGTERM killed it where it stood and
left the directory behind, and Ctrl-C printed the proxy's connection errors as a traceback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.replay import synth

pytestmark = pytest.mark.loopback

ROOT = Path(__file__).resolve().parents[2]


def _interrupt(tmp_path: Path, sig: signal.Signals, rows: int, *args: str) -> tuple[int, str, list[str]]:
    """Start `cascade replay DATA ARGS` on ROWS generated rows with its own TMPDIR, send SIG once its
    requests flow (its first progress line; the rest of the run is hundreds of requests more, so the
    signal lands mid-run on a loaded machine too), wait; return (exit status, stderr, what is left in
    TMPDIR)."""
    data = synth.write(tmp_path / "data.jsonl", n=rows, seed=11)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    with subprocess.Popen(
        [sys.executable, "-m", "app.cli", "replay", str(data), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # a child of a non-interactive shell may start with SIGINT ignored: Ctrl-C reaches a terminal's
        # foreground job with its default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        assert proc.stderr is not None
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith(("replay [", "online [")):  # the first progress line (one per 10 % here)
                break
        try:
            assert proc.poll() is None, "".join(lines)
            assert [p.name for p in tmp.iterdir()], "the run's temporary directory should exist while it runs"
            proc.send_signal(sig)
            rest = proc.stderr.read()
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return code, "".join(lines) + rest, sorted(p.name for p in tmp.iterdir())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_an_online_run_stopped_by_a_signal_cleans_up_and_says_so(tmp_path: Path, sig: signal.Signals) -> None:
    code, err, left = _interrupt(tmp_path, sig, 400, "--online", "--passes", "40")
    assert code == 128 + sig, err
    assert left == [], f"left behind: {left}"
    assert f"cascade replay: interrupted ({sig.name})" in err
    assert "Traceback" not in err, err


def test_an_offline_replay_stopped_by_sigterm_cleans_up(tmp_path: Path) -> None:
    code, err, left = _interrupt(tmp_path, signal.SIGTERM, 3000, "--concurrency", "1")
    assert code == 128 + signal.SIGTERM, err
    assert left == []
    assert "cascade replay: interrupted (SIGTERM)" in err
    assert "Traceback" not in err, err
