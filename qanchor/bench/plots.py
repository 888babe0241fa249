"""PNG plots of a benchmark (matplotlib, Agg backend: no display needed).

- ``auc_ks.png``: AUC and KS per task, one bar per method (grouped), error bars = std over folds.
- ``pca_<task>.png``: the first two principal components of a task's user embeddings coloured by
  label, before prompt tuning (task query) and after (task query + the head's soft prompt).

Example:
    >>> paths = write_plots(result, "results/demo")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qanchor.bench.runner import BenchResult
from qanchor.data.io import atomic_path

__all__ = ["bar_plot", "pca_plot", "pca_2d", "save_figure", "write_plots"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display, safe in CI and over ssh
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` as a PNG, atomically (a run killed mid-write never leaves half an image in place
    of the last good one), and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")  # the temporary's name has no .png suffix to infer it from
    finally:
        _pyplot().close(fig)
    return Path(path)


def bar_plot(result: BenchResult, path: str | Path) -> Path:
    """Grouped bars: for each task, one bar per method; AUC on top, KS below."""
    plt = _pyplot()
    tasks = [t for t in result.tasks.values() if t.methods]
    methods = list(dict.fromkeys(m for t in tasks for m in t.methods))
    fig, axes = plt.subplots(2, 1, figsize=(max(7.0, 1.3 * len(tasks) + 4), 7), sharex=True)
    width = 0.8 / max(len(methods), 1)
    x = np.arange(len(tasks))
    for ax, metric in zip(axes, ("auc", "ks")):
        lowest = 1.0
        for j, m in enumerate(methods):
            stats = np.array([_stat(t.methods.get(m), metric) for t in tasks])  # (n_tasks, 2): mean, std
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, stats[:, 0], width, yerr=stats[:, 1], label=m, capsize=2)
            lowest = min(lowest, np.nanmin(stats[:, 0] - stats[:, 1], initial=1.0))
        oracle = np.array([_stat(t.oracle, metric)[0] for t in tasks])
        if np.isfinite(oracle).any():  # synthetic data: the true probability's score, an upper bound
            ax.scatter(x, oracle, marker="_", s=900 * width * len(methods), color="black", label="oracle", zorder=3)
        # AUC bars start at 0.5 (chance) unless a method falls below it, which must stay visible.
        ax.set_ylim(min(0.5, np.floor(lowest * 20) / 20) if metric == "auc" else 0.0, 1.0)
        ax.set_ylabel(metric.upper())
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(x, [t.name for t in tasks], rotation=30, ha="right")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars and oracle stay visible
    axes[0].set_title(f"{result.run['dataset']}: AUC and KS per task (mean ± std over folds)")
    fig.tight_layout()
    return save_figure(fig, path)


def _stat(r, metric: str) -> tuple[float, float]:
    if r is None or not r.ok:
        return np.nan, 0.0
    return r.auc_mean_std if metric == "auc" else r.ks_mean_std


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` [N, D] onto their first two principal components -> [N, 2].

    Example:
        >>> pca_2d(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])).shape
        (3, 2)
    """
    centred = x - x.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt: (min(N, D), D)
    comps = vt[:2]
    if comps.shape[0] < 2:
        comps = np.vstack([comps, np.zeros((2 - comps.shape[0], x.shape[1]))])
    return centred @ comps.T


def pca_plot(task: str, labels: np.ndarray, before: np.ndarray, after: np.ndarray, path: str | Path) -> Path:
    """Side by side: PCA of embeddings before and after prompt tuning, positives in orange."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, emb, title in zip(axes, (before, after), ("before prompt tuning (task query)", "after prompt tuning (head)")):
        xy = pca_2d(np.asarray(emb, np.float64))
        neg, pos = labels == 0, labels == 1
        ax.scatter(xy[neg, 0], xy[neg, 1], s=6, alpha=0.4, label=f"label 0 ({int(neg.sum())})", color="tab:blue")
        ax.scatter(xy[pos, 0], xy[pos, 1], s=8, alpha=0.7, label=f"label 1 ({int(pos.sum())})", color="tab:orange")
        ax.set_title(title)
        ax.set_xlabel("PC 1")
        ax.set_ylabel("PC 2")
        ax.legend(fontsize=8)
    fig.suptitle(f"{task}: user embeddings, first two principal components")
    fig.tight_layout()
    return save_figure(fig, path)


def write_plots(result: BenchResult, out_dir: str | Path) -> list[Path]:
    """Every plot this result supports, written into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if any(t.methods for t in result.tasks.values()):
        paths.append(bar_plot(result, out_dir / "auc_ks.png"))
    for item in result.extras.get("pca", []):
        paths.append(pca_plot(item["task"], item["labels"], item["before"], item["after"], out_dir / f"pca_{item['task']}.png"))
    return paths
