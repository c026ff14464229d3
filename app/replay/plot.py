"""`cascade replay --plot FILE.png`: the cost/accuracy picture. Needs the optional extra ``plot``
(matplotlib); :func:`require_matplotlib` fails early and clearly when it is missing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from app.plotting import plot_problem


def _saved(x: float | None) -> str:
    return "savings n/a (the best model costs nothing)" if x is None else f"{x:.0%} saved"


def require_matplotlib(path: str) -> None:
    """``--plot path`` can be written (``app.plotting``), or ReplayError saying what is wrong."""
    from app.replay.configure import ReplayError

    if (problem := plot_problem(path)) is not None:
        raise ReplayError(problem)


def plot_report(report: Mapping[str, Any], curve: Sequence[tuple[float, float]], path: str) -> None:
    """Single models (dots), the cascade (star), the oracle (diamond) on test; the cascade's train
    cost/accuracy frontier over its thresholds (line). Cost axis: mean USD per request, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    singles = report["single_models"]
    for m, v in singles.items():
        ax.scatter(v["cost_usd"], v["accuracy"], color="tab:gray", s=25, zorder=2)
        ax.annotate(
            m.rsplit("/", 1)[-1],
            (v["cost_usd"], v["accuracy"]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    if curve:
        xs, ys = zip(*sorted(curve), strict=True)
        ax.plot(xs, ys, color="tab:blue", alpha=0.6, lw=1.2, label="cascade thresholds (train)")
    ax.scatter(
        report["cost_usd"],
        report["accuracy"],
        marker="*",
        s=220,
        color="tab:red",
        zorder=3,
        label=f"cascade (test): {report['accuracy']:.3f}, {_saved(report['savings_vs_best'])}",
    )
    o = report["oracle"]
    ax.scatter(
        o["cost_usd"],
        o["accuracy"],
        marker="D",
        s=50,
        color="tab:green",
        zorder=3,
        label="oracle (perfect router)",
    )
    bs = report["best_single"]
    ax.axhline(0.95 * bs["accuracy"], color="tab:orange", ls=":", lw=1, label="95% of best single")
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per request (USD, log)")
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{report['dataset']}: " + " -> ".join(s.rsplit("/", 1)[-1] for s in report["stages"]), fontsize=10
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
