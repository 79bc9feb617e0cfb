"""Sweep figures (matplotlib, Agg, no pyplot state): heatmaps and strength curves.

Import this module only when drawing: matplotlib is part of the ``eval`` extra. Every function
takes the rows of :func:`steerlab.evaluate.sweep`, writes one PNG and returns its path. Knows
nothing about how the rows were produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from collections.abc import Sequence
from pathlib import Path

from .evaluate import SweepRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRICS = (("score", "combined S"), ("concept", "concept C"), ("fluency", "fluency F"))
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _figure(w: float, h: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=110, layout="constrained")


def _settings(rows: Sequence[SweepRow]) -> list[str]:
    return list(dict.fromkeys(r.setting for r in rows if not r.is_base))


def _grid(rows: Sequence[SweepRow], setting: str) -> tuple[list[str], list[float], dict[tuple[str, float], SweepRow]]:
    steered = [r for r in rows if not r.is_base and r.setting == setting]
    labels = list(dict.fromkeys(r.label for r in steered))
    strengths = sorted({r.strength for r in steered})
    cells = {(r.label, r.strength): r for r in steered}
    return labels, strengths, cells


def _draw_heatmap(ax: Axes, rows: Sequence[SweepRow], setting: str, metric: str, title: str,
                  best: SweepRow | None, *, annotate: bool = True, colorbar: bool = True) -> None:
    import numpy as np

    labels, strengths, cells = _grid(rows, setting)
    data = np.full((len(labels), len(strengths)), np.nan)
    for i, lab in enumerate(labels):
        for j, s in enumerate(strengths):
            if (lab, s) in cells:
                data[i, j] = getattr(cells[(lab, s)], metric)
    im = ax.imshow(data, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(strengths)), [f"{s:g}" for s in strengths])
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("strength (x layer's residual norm)")
    ax.set_ylabel("layer(s)")
    ax.set_title(title, fontsize=10)
    if annotate and data.size <= 200:
        for i in range(data.shape[0]):
            for j in range(data.shape[1]):
                if np.isfinite(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=7.5,
                            color="black" if data[i, j] > 0.6 else "white")
    if best is not None and best.setting == setting and best.label in labels:
        from matplotlib.patches import Rectangle

        i, j = labels.index(best.label), strengths.index(best.strength)
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#ff2d2d", linewidth=2.5))
    if colorbar:
        ax.figure.colorbar(im, ax=ax, shrink=0.85)


def heatmap(rows: Sequence[SweepRow], best: SweepRow | None, path: str | Path, *, title: str = "") -> Path:
    """Combined score, concept and fluency over layer x strength; one row of panels per setting."""
    settings = _settings(rows)
    labels, strengths, _ = _grid(rows, settings[0])
    w = 3 * max(3.2, 0.62 * len(strengths) + 1.6)
    h = max(2.6, 0.34 * len(labels) + 1.4)
    fig = _figure(w, h * len(settings) + 0.4)
    axes = fig.subplots(len(settings), 3, squeeze=False)
    for k, setting in enumerate(settings):
        for m, (metric, name) in enumerate(METRICS):
            _draw_heatmap(axes[k][m], rows, setting, metric, f"{name}" + (f" [{setting}]" if setting else ""), best,
                          colorbar=m == 2)
    if title:
        fig.suptitle(title + "  (red box: chosen cell)", fontsize=11)
    return _save(fig, path)


def _best_per_setting(rows: Sequence[SweepRow], best: SweepRow | None) -> dict[str, list[SweepRow]]:
    """For each setting, the curve over strength at that setting's best layer group."""
    out = {}
    for setting in _settings(rows):
        steered = [r for r in rows if not r.is_base and r.setting == setting]
        top = best if best is not None and best.setting == setting else max(steered, key=lambda r: r.score)
        out[setting] = sorted((r for r in steered if r.label == top.label), key=lambda r: r.strength)
    return out


def _draw_curves(ax: Axes, curve: list[SweepRow], best: SweepRow | None, title: str) -> None:
    xs = [r.strength for r in curve]
    ax.plot(xs, [r.concept for r in curve], "-o", color=_COLORS[1], label="concept C")
    ax.plot(xs, [r.fluency for r in curve], "-s", color=_COLORS[2], label="fluency F")
    ax.plot(xs, [r.score for r in curve], "-D", color="black", lw=2.2, label="combined S")
    ax.plot(xs, [r.keyword_rate for r in curve], ":", color=_COLORS[3], label="keyword rate")
    ax.fill_between(xs, [r.score - r.score_se for r in curve], [r.score + r.score_se for r in curve],
                    color="black", alpha=0.12, lw=0)
    if best is not None and best in curve:
        ax.axvline(best.strength, color="#ff2d2d", ls="--", lw=1.2, label=f"chosen {best.strength:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("strength (x layer's residual norm)")
    ax.set_ylabel("score (0..1)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def strength_plot(rows: Sequence[SweepRow], best: SweepRow | None, path: str | Path, *, title: str = "") -> Path:
    """Concept, fluency and combined score against strength at the best layer group.

    With several settings: one panel per metric, one line per setting (the before/after view).
    """
    curves = _best_per_setting(rows, best)
    if len(curves) == 1:
        fig = _figure(6.4, 4.2)
        ax = fig.subplots()
        (setting, curve), = curves.items()
        _draw_curves(ax, curve, best, f"layer(s) {curve[0].label}" + (f" [{setting}]" if setting else ""))
    else:
        fig = _figure(13.5, 4.2)
        axes = fig.subplots(1, 3, sharey=True)
        for m, (metric, name) in enumerate(METRICS):
            ax = axes[m]
            for k, (setting, curve) in enumerate(curves.items()):
                ax.plot([r.strength for r in curve], [getattr(r, metric) for r in curve], "-o",
                        color=_COLORS[k % len(_COLORS)], label=f"{setting} @ {curve[0].label}")
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("strength (x layer's residual norm)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("score (0..1), each setting at its best layer(s)")
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def dose_plot(rows: Sequence[SweepRow], best: SweepRow | None, path: str | Path, *, title: str = "") -> Path:
    """Combined score against *total* dose (strength x number of layers), one line per layer row.

    Puts single layers and multi-layer groups on one axis: a group of five at 0.1 adds as much
    as one layer at 0.5. One panel per setting.
    """
    settings = _settings(rows)
    fig = _figure(min(5.2 * len(settings), 16.0) + 0.8, 4.2)
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    for ax, setting in zip(axes, settings):
        labels, _, cells = _grid(rows, setting)
        for k, label in enumerate(labels):
            curve = sorted((r for (lab, _), r in cells.items() if lab == label), key=lambda r: r.strength)
            xs = [r.strength * len(r.layers) for r in curve]
            style = "-o" if len(curve[0].layers) == 1 else "--s"
            ax.plot(xs, [r.score for r in curve], style, color=_COLORS[k % len(_COLORS)], label=label)
        if best is not None and best.setting == setting:
            ax.plot([best.strength * len(best.layers)], [best.score], "*", ms=16, color="#ff2d2d", label="chosen")
        ax.set_xscale("log")
        ax.set_xlabel("total dose (strength x layers, log scale)")
        ax.set_title(f"combined S [{setting}]" if setting else "combined S", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.set_ylim(-0.02, 1.02)
    axes[0].set_ylabel("combined score S")
    axes[0].legend(fontsize=8, title="layer(s)", title_fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def summary_figure(rows: Sequence[SweepRow], best: SweepRow, path: str | Path, *, title: str = "") -> Path:
    """The one picture for a vector page: combined-score heatmap and the curves at the best layer."""
    labels, strengths, _ = _grid(rows, best.setting)
    h = max(3.8, 0.34 * len(labels) + 1.6)
    fig = _figure(max(4.2, 0.62 * len(strengths) + 2.0) + 6.0, h)
    left, right = fig.subplots(1, 2, width_ratios=[max(4.2, 0.62 * len(strengths) + 2.0), 6.0])
    _draw_heatmap(left, rows, best.setting, "score", "combined score S (red box: chosen)", best, colorbar=False)
    curve = _best_per_setting(rows, best)[best.setting]
    _draw_curves(right, curve, best, f"at layer(s) {best.label}" + (f" [{best.setting}]" if best.setting else ""))
    fig.suptitle(title or f"chosen: layer(s) {best.label}, strength {best.strength:g}", fontsize=11)
    return _save(fig, path)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
