"""Matplotlib figures (Agg backend, PNG files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..train.logging_utils import read_metrics  # noqa: E402


def plot_bestof(result, path: str | Path) -> Path:
    """Best@M / Mean@M / Worst@M of the reward against M, one colour per policy."""
    fig, ax = plt.subplots(figsize=(7.4, 4.2), dpi=110)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, cur) in enumerate(result.reward.items()):
        ms = list(range(1, len(cur["mean"]) + 1))
        c = colors[i % len(colors)]
        ax.plot(ms, cur["best"], color=c, ls="--", lw=1)
        ax.plot(ms, cur["mean"], color=c, lw=2, label=name)
        ax.plot(ms, cur["worst"], color=c, ls=":", lw=1.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("M (samples per LR image)")
    ax.set_ylabel("reward (pooled group-normalised)")
    ax.set_title("Best@M (dashed) / Mean@M (solid) / Worst@M (dotted)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def plot_training(run_dirs: dict[str, Path], path: str | Path) -> Path | None:
    """Loss, implicit accuracy and rollout reward of each run's metrics.jsonl."""
    keys = [("loss", "loss"), ("implicit_acc", "implicit accuracy"), ("reward_mean", "rollout reward (group mean)")]
    data = {n: read_metrics(d) for n, d in run_dirs.items()}
    data = {n: rows for n, rows in data.items() if rows}
    if not data:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {n: palette[i % len(palette)] for i, n in enumerate(data)}
    for ax, (k, label) in zip(axes, keys):
        for n, rows in data.items():
            pts = [(r["step"], r[k]) for r in rows if k in r]
            if pts:
                xs, ys = zip(*pts)
                if len(ys) > 10:  # light smoothing for readability
                    w = max(1, len(ys) // 20)
                    ys = [sum(ys[max(0, i - w) : i + 1]) / len(ys[max(0, i - w) : i + 1]) for i in range(len(ys))]
                ax.plot(xs, ys, label=n, color=color[n])
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=color[n], label=n) for n in data]
    axes[0].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
