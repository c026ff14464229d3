"""``cascade calibrate``: thresholds from labelled traces; the table, --write (comments survive),
--plot, and the exit codes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import yaml

from app.cli import main
from app.config import load_config
from app.learning.store import Store
from tests.learning.learning_helpers import synthetic

CONFIG = """\
# cascade config: this comment must survive --write
upstreams:
  small: {base_url: "http://fake.local/v1", model: ok, price: {input: 0.1, output: 0.2}}   # cheap
  large:
    base_url: http://fake.local/v1
    model: answer-large_says_hi   # strong
cascades:
  default:
    deadline_s: 60
    stages:
      - upstream: small
        threshold: 0.7      # tuned by hand, once
        scorers: [{type: heuristic}]
      - upstream: large
learning:
  store: "sqlite:///{db}"
  min_labels: 50   # enough for a test
"""


def _populate(url: str, cfg: dict, n: int) -> None:  # type: ignore[type-arg]
    async def go() -> None:
        s = Store(url)
        await s.open()
        traces, labels = synthetic(cfg, n)
        await s.write(traces, labels)
        await s.close()

    asyncio.run(go())


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    db = tmp_path / "traces.db"
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("{db}", str(db)))
    _populate(f"sqlite:///{db}", yaml.safe_load(path.read_text()), 400)
    return path


def test_calibrate_prints_the_table_and_the_choice(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["calibrate", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert "cascade 'default': small -> large" in out
    assert re.search(r"labelled requests: \d+ \(escalated \d+, shadow \d+\)", out)
    assert "target quality 0.950" in out
    assert "<- chosen" in out
    assert re.search(r"current\s+0\.7000: quality", out)
    chosen = re.search(r"chosen\s+([\d.]+): quality ([\d.]+)", out)
    assert chosen is not None
    # Stage 0 is right above ~0.4 (90 % of the time), so 0.95 needs a threshold above 0.4.
    assert 0.4 < float(chosen.group(1)) < 1.0
    # Table rows: thresholds, quality, se, cost, reach; costs and qualities increase down the table.
    rows = re.findall(r"^\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+1\.000 ([\d.]+)", out, re.M)
    assert len(rows) >= 3
    assert [float(r[3]) for r in rows] == sorted(float(r[3]) for r in rows)
    # The config file is untouched without --write.
    assert "threshold: 0.7      # tuned by hand, once" in config_file.read_text()


def test_calibrate_write_changes_only_the_numbers(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = config_file.read_text()
    assert main(["calibrate", "--config", str(config_file), "--target-quality", "0.9", "--write"]) == 0
    out = capsys.readouterr().out
    chosen = float(re.search(r"chosen\s+([\d.]+):", out).group(1))  # type: ignore[union-attr]
    after = config_file.read_text()
    assert after != before
    b_lines, a_lines = before.splitlines(), after.splitlines()
    assert len(a_lines) == len(b_lines)
    diff = [(b, a) for b, a in zip(b_lines, a_lines, strict=True) if a != b]
    assert len(diff) == 1
    assert diff[0][0] == "        threshold: 0.7      # tuned by hand, once"
    assert re.fullmatch(r"        threshold: [\d.]+      # tuned by hand, once", diff[0][1])
    assert load_config(config_file).cascades["default"].stages[0].threshold == pytest.approx(chosen, abs=1e-4)


def test_calibrate_write_through_a_symlink_keeps_crlf_and_refuses_a_shared_stage(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--write replaced a symlinked config with a plain file (the target kept the old numbers), turned
    every CRLF into LF (a diff of every line), and edited a stage another cascade shares through a YAML
    anchor (changing that cascade's threshold too)."""
    real = tmp_path / "real.yaml"
    real.write_bytes(config_file.read_text().replace("\n", "\r\n").encode())
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    before = real.read_bytes()
    assert main(["calibrate", "--config", str(link), "--target-quality", "0.9", "--write"]) == 0
    assert link.is_symlink()
    after = real.read_bytes()
    changed = [(b, a) for b, a in zip(before.split(b"\r\n"), after.split(b"\r\n"), strict=True) if a != b]
    assert (
        len(changed) == 1 and b"threshold: 0.7 " in changed[0][0] and b"\n" not in after.replace(b"\r\n", b"")
    )
    shared = config_file.read_text().replace("    stages:\n", "    stages: &st\n", 1)
    shared = shared.replace("learning:", "  copy: {deadline_s: 30, stages: *st}\nlearning:")
    config_file.write_text(shared)
    capsys.readouterr()
    assert main(["calibrate", "--config", str(config_file), "--cascade", "default", "--write"]) == 2
    err = capsys.readouterr().err
    assert "cascades.default.stages[0].threshold: the stage is shared with cascades.copy" in err
    assert config_file.read_text() == shared


@pytest.mark.parametrize("name", ["curve.txt", "curve", "missing/curve.png", "."])
def test_calibrate_plot_to_a_path_it_cannot_write_exits_2_before_fitting(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    """Tracebacks at the end (no such directory, an unknown format), or a file written under another name
    than the one printed ("curve" became "curve.png")."""
    path = tmp_path / name
    assert main(["calibrate", "--config", str(config_file), "--plot", str(path)]) == 2
    out = capsys.readouterr()
    assert out.err.startswith("calibrate: --plot: ") and "chosen" not in out.out, out
    assert not list(tmp_path.glob("curve*"))


def test_calibrate_plot_writes_a_png(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "curve.png"
    assert main(["calibrate", "--config", str(config_file), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_calibrate_not_enough_labels_exits_1(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "--config", str(config_file), "--min-labels", "100000", "--write"]) == 1
    err = capsys.readouterr().err
    assert "not enough labelled requests for default" in err and "need 100000" in err
    assert "threshold: 0.7 " in config_file.read_text()


def test_calibrate_without_a_store_file_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG.replace("{db}", str(tmp_path / "none.db")))
    assert main(["calibrate", "--config", str(path)]) == 1
    assert "no trace store at" in capsys.readouterr().err


def test_calibrate_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        CONFIG.replace("{db}", str(tmp_path / "t.db")).replace("upstream: large", "upstream: larg")
    )
    assert main(["calibrate", "--config", str(path)]) == 2
    assert "cascades.default.stages[1].upstream: unknown upstream 'larg'" in capsys.readouterr().err
    no_learning = CONFIG.split("learning:")[0]
    path.write_text(no_learning)
    assert main(["calibrate", "--config", str(path)]) == 2
    assert "no 'learning' section" in capsys.readouterr().err
    path.write_text(CONFIG.replace("{db}", str(tmp_path / "t.db")))
    assert main(["calibrate", "--config", str(path), "--target-quality", "1.5"]) == 2


def test_calibrate_shows_the_thresholds_auto_tune_put_in_force(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``auto_tune`` the thresholds serving are the newest fit in the store, not the file's: the
    "current" line (and the point --plot draws) showed the file's 0.7 where the tuner had put 0.39."""
    from app.learning.records import plan_fingerprint
    from app.learning.store import Fit

    text = config_file.read_text().replace("  min_labels: 50", "  min_labels: 50\n  auto_tune: true")
    config_file.write_text(text)
    cfg = load_config(str(config_file))
    assert cfg.learning is not None
    fp = plan_fingerprint(cfg, cfg.cascades["default"])

    async def save() -> None:
        s = Store(cfg.learning.store)  # type: ignore[union-attr]
        await s.open()
        await s.save_fit(Fit("default", fp, 1, (0.39,), 0, 0, None, None, False, {}, 0.0))
        await s.close()

    asyncio.run(save())
    assert main(["calibrate", "--config", str(config_file)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"current\s+0\.3900: quality [\d.]+, \$[\d.]+/request \(auto_tune's fit v1", out)
    lines = [ln for ln in out.splitlines() if re.match(r"^\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+\s", ln)]
    shown = [ln.replace(" <- chosen", "") for ln in lines]
    assert len(shown) == len(set(shown))  # no line twice (the chosen one was, with and without its mark)
