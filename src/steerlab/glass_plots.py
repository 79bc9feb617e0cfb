"""Glass-box figures (matplotlib, Agg, no pyplot state): where a concept lives, how vectors relate.

Import only when drawing (matplotlib is in the ``eval`` extra). Each function writes one PNG
and returns its path; the numbers come from :mod:`steerlab.anatomy` and :mod:`steerlab.doctor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .anatomy import LayerProfileRow, Similarity
from .plots import _COLORS, _figure, _save


def layer_profile_plot(rows: Sequence[LayerProfileRow], path: str | Path, *, title: str = "",
                       active: Sequence[int] = (), consistency: dict[int, float] | None = None) -> Path:
    """Held-out AUC and neighbour-layer cosine against layer; active layers shaded."""
    fig = _figure(6.8, 3.8)
    ax = fig.subplots()
    xs = [r.layer for r in rows]
    for x in active:
        ax.axvspan(x - 0.5, x + 0.5, color="#ffd54f", alpha=0.35, lw=0)
    ax.plot(xs, [r.auc for r in rows], "-o", ms=3.5, color=_COLORS[0], label="held-out AUC")
    nxt = [(r.layer, r.cos_next) for r in rows if r.cos_next is not None]
    ax.plot([x for x, _ in nxt], [c for _, c in nxt], "-s", ms=3, color=_COLORS[1], label="cos(layer, next layer)")
    if consistency:
        ax.plot(list(consistency), list(consistency.values()), ":", color=_COLORS[2], label="pair consistency")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (output of block i)" + ("; shaded: active layers" if active else ""))
    ax.set_ylabel("AUC / cosine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title or "where the concept lives", fontsize=10)
    return _save(fig, path)


def similarity_plot(sim: Similarity, path: str | Path, *, title: str = "") -> Path:
    """Left: cosine of each pair of vectors against layer. Right: the matrix averaged over layers."""
    fig = _figure(10.5, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[6, 4])
    idx = {n: i for i, n in enumerate(sim.names)}
    for k, (a, b) in enumerate(sim.pairs()):
        ys = [float(sim.per_layer[x][idx[a], idx[b]]) for x in sim.layers]
        left.plot(sim.layers, ys, "-o", ms=3, color=_COLORS[k % len(_COLORS)], label=f"{a} / {b}")
    left.axhline(0, color="black", lw=0.8)
    left.set_ylim(-1.02, 1.02)
    left.set_xlabel("layer")
    left.set_ylabel("cosine")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("per shared layer", fontsize=10)
    m = sim.mean.numpy()
    im = right.imshow(m, cmap="RdBu_r", vmin=-1, vmax=1)
    right.set_xticks(range(len(sim.names)), sim.names, rotation=30, ha="right")
    right.set_yticks(range(len(sim.names)), sim.names)
    for i in range(len(sim.names)):
        for j in range(len(sim.names)):
            right.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                       color="white" if abs(m[i, j]) > 0.6 else "black")
    right.set_title(f"mean over {len(sim.layers)} layers", fontsize=10)
    fig.colorbar(im, ax=right, shrink=0.85)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)
