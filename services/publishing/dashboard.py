"""``training_dashboard.png``: a run's curves, drawn with matplotlib from ``metrics.jsonl`` alone.

Panels: training and validation loss (checkpoints marked, the best three highlighted), the
generalization gap (validation − training loss at each evaluation), learning rate, trained
tokens per second, and memory. Readable at 100 %: 1800×1100 px at 100 dpi.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgellm.services.common.runs import read_metrics, validation_by_iteration

SIZE_INCHES = (18, 11)
DPI = 100


def _series(events: list[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    points = [(e["iteration"], e[key]) for e in events
              if e.get("event") == kind and isinstance(e.get(key), (int, float))]
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def draw_dashboard(run_dir: Path, out: Path, *, title: str | None = None, best: list[int] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    events = read_metrics(run_dir)
    val = validation_by_iteration(events)
    ranked = best if best is not None else sorted(val, key=val.get)[:3]
    checkpoints = sorted({e["iteration"] for e in events if e.get("event") == "checkpoint"})

    fig = plt.figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2, 3)
    ax_loss = fig.add_subplot(grid[0, :2])
    ax_gap = fig.add_subplot(grid[0, 2])
    ax_lr, ax_speed, ax_mem = (fig.add_subplot(grid[1, i]) for i in range(3))
    fig.suptitle(title or run_dir.name, fontsize=16)

    it_train, train = _series(events, "train", "train_loss")
    it_val, valid = _series(events, "eval", "val_loss")
    ax_loss.plot(it_train, train, label="training loss", color="#1f77b4", linewidth=1.8)
    ax_loss.plot(it_val, valid, label="validation loss", color="#d62728", marker="o", linewidth=1.8)
    for iteration in checkpoints:
        ax_loss.axvline(iteration, color="#bbbbbb", linestyle=":", linewidth=1)
    for rank, iteration in enumerate(ranked, 1):
        if iteration in val:
            ax_loss.scatter([iteration], [val[iteration]], s=220 if rank == 1 else 140, marker="*",
                            color="#ff9900" if rank == 1 else "#ffcc66", edgecolor="black", zorder=5,
                            label="best checkpoint" if rank == 1 else ("next best" if rank == 2 else None))
            ax_loss.annotate(f"#{rank} it {iteration}", (iteration, val[iteration]), textcoords="offset points",
                             xytext=(6, 8), fontsize=11)
    ax_loss.set_title("Loss (dotted lines: checkpoints)", fontsize=13)
    ax_loss.set_xlabel("iteration")
    ax_loss.legend(fontsize=11)

    # gap at each evaluation: validation loss minus the latest training loss reported by then
    gap = []
    for iteration, value in zip(it_val, valid, strict=True):
        before = [loss for it, loss in zip(it_train, train, strict=True) if it <= iteration]
        if before:
            gap.append((iteration, value - before[-1]))
    if gap:
        ax_gap.plot([g[0] for g in gap], [g[1] for g in gap], color="#9467bd", marker="o")
    ax_gap.axhline(0, color="black", linewidth=0.8)
    ax_gap.set_title("Generalization gap (validation − training)", fontsize=13)
    ax_gap.set_xlabel("iteration")

    for ax, key, label, color in ((ax_lr, "learning_rate", "Learning rate", "#2ca02c"),
                                  (ax_speed, "tokens_per_second", "Trained tokens / s", "#17becf"),
                                  (ax_mem, "memory_usage_gb", "Memory (GB, MLX active)", "#8c564b")):
        xs, ys = _series(events, "train", key)
        ax.plot(xs, ys, color=color, linewidth=1.8)
        ax.set_title(label, fontsize=13)
        ax.set_xlabel("iteration")
    for ax in fig.axes:
        ax.ticklabel_format(axis="y", useOffset=False, style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
