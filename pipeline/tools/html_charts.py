"""The charts of the extract report, as PNG bytes: throughput over time from the commit records, the stage split
from the timings, and a 2-D map of the embedding (PCA, or t-SNE for small samples)."""

from __future__ import annotations

import collections

import numpy as np

from pipeline import charts

# t-SNE shows clusters better than PCA but costs more: exact t-SNE (O(n^2), yet far faster than Barnes-Hut at these
# sizes on a few cores: 0.5 s for 20 points, 5 s for 200 on 2 busy cores) up to this many points, PCA above
TSNE_MAX_POINTS = 300
MAP_COLOURS = 10  # categories with their own colour; the rest are drawn grey as "other"


def new_figure(width: float = 7.0, height: float = 3.2):
    from matplotlib.figure import Figure  # without pyplot: Agg, no GUI, no global state

    return Figure(figsize=(width, height), layout="constrained")


def throughput_png(commit_times: list[float], commit_rows: list[int], startup_seconds: float) -> bytes | None:
    """Images committed over time and the rate between commits; None without commit times (older outputs)."""
    pairs = sorted((when, rows) for when, rows in zip(commit_times, commit_rows) if when)
    if not pairs:
        return None
    times = np.array([when for when, _ in pairs])
    rows = np.array([count for _, count in pairs], dtype=float)
    seconds = times - times[0] + startup_seconds  # from the run's start: its startup, then the first commit
    figure = new_figure()
    total, rate = figure.subplots(1, 2)
    total.step(np.concatenate([[0.0], seconds]), np.concatenate([[0.0], np.cumsum(rows)]), where="post")
    total.set(xlabel="seconds since start", ylabel="images committed", title="progress")
    if len(seconds) > 1:
        window = max(1, len(seconds) // 20)  # smooth over ~5% of the commits: single gaps are noisy
        spans = seconds[window:] - seconds[:-window]
        counts = np.convolve(rows, np.ones(window), "valid")[1:]
        rate.plot(seconds[window:], counts / np.maximum(spans, 1e-6), marker=".")
    rate.set(xlabel="seconds since start", ylabel="images / s", title="throughput between commits", ylim=(0, None))
    return charts.figure_png(figure)


def stage_split_png(timings: dict[str, float]) -> bytes | None:
    """Seconds per stage (fetch and decode run in threads, so they can exceed wall time)."""
    if not timings:
        return None
    stages = sorted(timings, key=timings.get)
    figure = new_figure(height=0.5 + 0.4 * len(stages))
    axes = figure.subplots()
    axes.barh(stages, [timings[stage] for stage in stages])
    total = sum(timings.values()) or 1.0
    for position, stage in enumerate(stages):
        axes.annotate(f" {timings[stage]:.1f} s ({timings[stage] / total:.0%})", (timings[stage], position),
                      va="center")
    axes.set(xlabel="seconds (summed over threads and actors)", title="stage split")
    axes.margins(x=0.25)
    return charts.figure_png(figure)


def project_2d(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(points, method): cosine geometry (rows L2-normalised), t-SNE for small samples, PCA otherwise."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    vectors = features.astype(np.float32)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if 5 <= len(vectors) <= TSNE_MAX_POINTS:
        perplexity = min(30.0, (len(vectors) - 1) / 3)
        tsne = TSNE(2, perplexity=perplexity, init="pca", method="exact", random_state=seed)
        return tsne.fit_transform(vectors), "t-SNE"
    return PCA(2, random_state=seed).fit_transform(vectors), "PCA"


def embedding_map_png(features: np.ndarray, categories: list[str], colour_name: str) -> tuple[bytes, str]:
    """A scatter of the projected features, one colour per category (the most common ones); and the method."""
    from matplotlib import colormaps

    points, method = project_2d(features)
    common = sorted(name for name, _ in collections.Counter(categories).most_common(MAP_COLOURS))  # legend order
    figure = new_figure(6.5, 5.0)
    axes = figure.subplots()
    others = np.array([category not in common for category in categories])
    if others.any():
        axes.scatter(points[others, 0], points[others, 1], s=12, c="lightgrey", label="other")
    palette = colormaps["tab10"].colors
    for index, name in enumerate(common):
        chosen = np.array([category == name for category in categories])
        axes.scatter(points[chosen, 0], points[chosen, 1], s=14, color=palette[index % len(palette)],
                     label=name[:30])
    axes.legend(title=colour_name, fontsize="small", loc="best")
    axes.set(title=f"{method} of {len(points)} feature vectors", xticks=[], yticks=[])
    return charts.figure_png(figure), method
