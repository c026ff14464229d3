"""``cascade replay --online --plot FILE.png``: quality, savings and thresholds over the stream, with the
target line, the offline thresholds' figures and the drift point. Needs matplotlib (the ``plot`` extra)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _nan(xs: list[float | None]) -> list[float]:
    return [math.nan if x is None else x for x in xs]  # (None: the best model costs nothing)


def plot_online(report: Mapping[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = report["windows"]
    off = report["offline"]["windows"]
    x = [w["requests"] for w in ws]
    fig, (aq, asv, at) = plt.subplots(3, 1, figsize=(10.5, 9), dpi=110, sharex=True)
    aq.plot(x, [w["quality_vs_best"] for w in ws], color="tab:blue", alpha=0.35, label="window (100)")
    aq.plot(x, [w["rolling_quality_vs_best"] for w in ws], color="tab:blue", label="rolling (500)")
    aq.plot(
        x, [w["rolling_quality_vs_best"] for w in off], color="tab:gray", ls=":", label="offline thresholds"
    )
    aq.axhline(report["target_quality"], color="tab:red", ls="--", lw=1, label="target")
    aq.set_ylabel("quality vs best single")
    asv.plot(x, _nan([w["savings_vs_best"] for w in ws]), color="tab:green", alpha=0.35, label="window (100)")
    asv.plot(x, _nan([w["rolling_savings_vs_best"] for w in ws]), color="tab:green", label="rolling (500)")
    asv.plot(
        x,
        _nan([w["rolling_savings_vs_best"] for w in off]),
        color="tab:gray",
        ls=":",
        label="offline thresholds",
    )
    asv.set_ylabel("savings vs best single")
    k = len(ws[0]["thresholds"]) if ws else 0
    for j in range(k):
        at.step(x, [w["thresholds"][j] for w in ws], where="post", label=f"stage {j}")
    at.set_ylabel("threshold")
    at.set_ylim(-0.02, 1.02)
    at.set_xlabel("requests")
    if not ws:  # fewer requests than one window: say so, rather than draw empty axes
        aq.text(0.5, 0.5, "fewer requests than one window (100): nothing to draw", ha="center",
                va="center", transform=aq.transAxes)  # fmt: skip
    for ax in (aq, asv, at):
        if report.get("drift_at"):
            ax.axvline(report["drift_at"], color="black", lw=1, ls="-.", label="drift")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            # outside the axes: inside, it covered the end of the lines it labels
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    drift = f" -> {report['drift']}" if report.get("drift") else ""
    aq.set_title(f"cascade replay --online: {report['dataset']}{drift}, seed {report['seed']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
