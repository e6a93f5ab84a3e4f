"""The demo's pretraining monitors as a figure (issue #26 item 2): reconstruction loss, weighted-kNN top-1, the
online linear classifier's top-1 and RankMe against the pretraining step, read from the pretraining run's
``log.jsonl`` (``train`` and ``monitor`` records).  The monitor measures at step 0, before the first update: that
value (the random-initialised network's) is drawn as the dotted reference line of its panel.  Nothing here trains.
"""

from __future__ import annotations

from pathlib import Path

from maecore.engine import read_log

MONITOR_PNG = "pretrain_monitor.png"  # beside report.md
# (log key, panel title, y label) of the monitor's panels
MONITOR_KEYS = (("knn_top1", "weighted kNN (k 20)", "top-1 (%)"),
                ("linear_top1", "online linear classifier", "top-1 (%)"),
                ("rankme", "RankMe (effective rank)", "RankMe"))


def monitor_records(run_dir: Path) -> list[dict]:
    """The ``monitor`` records of a pretraining run, one per step (a resumed run's repeat of a step: the last)."""
    by_step = {int(r["step"]): r for r in read_log(run_dir, "monitor")}
    return [by_step[s] for s in sorted(by_step)]


def monitor_summary(run_dir: Path) -> dict | None:
    """The monitor's values at step 0 (the random-initialised network) and at its last measurement:
    ``{"first": {...}, "last": {...}}`` with ``step`` and each measured key; None without records."""
    recs = monitor_records(run_dir)
    if not recs:
        return None
    pick = lambda r: {"step": int(r["step"]), **{k: r[k] for k, _, _ in MONITOR_KEYS if k in r}}  # noqa: E731
    return {"first": pick(recs[0]), "last": pick(recs[-1])}


def monitor_png(run_dir: Path, png: Path, num_classes: int = 0) -> bool:
    """Draw the four panels of ``run_dir``'s logs into ``png``; ``num_classes`` > 0 adds the chance level to the
    accuracy panels.  Returns whether the run has monitor records (else nothing is written)."""
    recs = monitor_records(run_dir)
    if not recs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from maecore.figures import save_figure

    train = read_log(run_dir, "train")
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4), dpi=100)
    ax = axes[0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax.set_title("reconstruction loss (masked patches)", fontsize=10)
    ax.set_ylabel("training loss")
    for ax, (key, title, ylabel) in zip(axes[1:], MONITOR_KEYS):
        pts = [(int(r["step"]), float(r[key])) for r in recs if key in r]
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel)
        if not pts:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="0.4")
            continue
        ax.plot(*zip(*pts), "-o", markersize=3, label="MAE pretraining")
        if pts[0][0] == 0:
            ax.axhline(pts[0][1], ls=":", color="0.35", label=f"random init (step 0): {pts[0][1]:.1f}")
        if num_classes and key.endswith("top1"):
            ax.axhline(100.0 / num_classes, ls="--", lw=0.8, color="tab:red", label=f"chance ({100.0 / num_classes:.1f})")
        ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
    sub = recs[-1].get("subset", {})
    fig.suptitle(f"pretraining monitors: unmasked features of {sub.get('bank', '?')} training images (kNN bank, RankMe)"
                 f" and {sub.get('queries', '?')} val images (queries)", fontsize=10)
    save_figure(fig, png)
    return True
