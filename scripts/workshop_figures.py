"""Regenerate the workshop slides' figures with steerlab itself (docs/workshop/figures/).

    python scripts/workshop_figures.py                    # all figures (~3-5 min on a laptop CPU)
    python scripts/workshop_figures.py --only tokens,dose # some of them
    python scripts/workshop_figures.py --strip-notebook   # only strip docs/workshop/tour.ipynb's outputs

Figures (the slides in docs/workshop/slides.md show them):

* activation_space.png: the tabby_cats contrast texts at layer 12, projected on two axes: the
  steering direction and the first principal component of what is left; the arrow is the vector.
* layers.png: held-out AUC per layer (`steerlab inspect --vector tabby_cats --profile --plot`).
* tokens.png: a sentence's tokens coloured by their tabby_cats reading (`steerlab inspect`).
* dose.png: the measured dose window of tabby_cats (concept and fluency against strength).
* sweep.png: a small sweep of tabby_cats (`steerlab sweep`; heatmap and curves).

Uses the vectors folder (`steerlab list` prints it) and builds a missing built-in persona there.
The PNGs are generated files and are not committed (docs/workshop/figures/.gitignore).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "workshop" / "figures"
NOTEBOOK = ROOT / "docs" / "workshop" / "tour.ipynb"
ALL = ("activation_space", "layers", "tokens", "dose", "sweep")
SENTENCE = "I adopted a striped kitten last week, then we went to the bank to open an account."


def strip_notebook(path: Path = NOTEBOOK) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cell.get("metadata", {}).pop("execution", None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def cli(*argv: str) -> None:
    from steerlab.cli import main

    main(list(argv), standalone_mode=False)


def activation_space(lm, vec, persona, path: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt
    import torch

    from steerlab.extract import pooled_activations

    layer = 12
    pos, _ = pooled_activations(lm, persona.positive, [layer], progress=False)
    neg, _ = pooled_activations(lm, persona.negative, [layer], progress=False)
    x = torch.cat([pos[layer], neg[layer]]).float()
    u = vec.directions[layer].float()
    u = u / u.norm()
    centre = x.mean(0)
    along = (x - centre) @ u
    rest = (x - centre) - along[:, None] * u
    _, _, v = torch.pca_lowrank(rest, q=1, center=False)
    other = rest @ v[:, 0]
    n = len(persona.positive)
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    ax.scatter(along[:n], other[:n], c="#e65100", s=22, label="about tabby cats")
    ax.scatter(along[n:], other[n:], c="#1565c0", s=22, label="same sentence, no cat")
    for i in range(n):
        ax.plot([along[n + i], along[i]], [other[n + i], other[i]], color="#9e9e9e", lw=0.4, zorder=0)
    m_pos, m_neg = along[:n].mean().item(), along[n:].mean().item()
    ax.annotate("", xy=(m_pos, 0), xytext=(m_neg, 0),
                arrowprops=dict(arrowstyle="-|>", lw=2.5, color="black"))
    ax.text((m_pos + m_neg) / 2, 0, "steering vector\n", ha="center", va="bottom", fontsize=9)
    ax.set_xlabel("position along the tabby-cats direction")
    ax.set_ylabel("main other direction")
    ax.set_title(f"{lm.model_id.split('/')[-1]}, layer {layer}: {n} contrast pairs (grey: a pair)", fontsize=10)
    lo, hi = torch.quantile(other, 0.03).item(), torch.quantile(other, 0.97).item()
    pad = (hi - lo) * 0.6
    ax.set_ylim(lo - pad, hi + pad)  # a few outlying texts would squash the picture
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tokens(lm, vec, path: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    from steerlab.reading import Reader

    (reading,) = Reader(lm, [vec]).read([SENTENCE])
    bands = [(-99, -2, "#64b5f6"), (-2, -1, "#bbdefb"), (-1, 1, "#ffffff"), (1, 2, "#fff176"), (2, 3, "#ffb74d"),
             (3, 99, "#e57373")]  # the CLI's bands
    fig = plt.figure(figsize=(9.0, 2.2), dpi=120)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")
    renderer = fig.canvas.get_renderer()
    x, y = 0.02, 0.68
    for tok in reading.tokens:
        value = tok.values[vec.name]
        colour = next(c for lo, hi, c in bands if lo <= value < hi)
        text = ax.text(x, y, tok.text.replace(" ", "\u2009") or " ", fontsize=13, family="DejaVu Sans",
                       bbox=dict(boxstyle="square,pad=0.15", fc=colour, ec="none"), va="baseline")
        box = text.get_window_extent(renderer=renderer).transformed(ax.transData.inverted())
        ax.text((box.x0 + box.x1) / 2, y - 0.16, f"{value:+.1f}", fontsize=8, ha="center", color="#555555")
        x = box.x1 + 0.004
        if x > 0.95:
            x, y = 0.02, y - 0.36
    legend = ("reading (neutral std. dev.):  < -2  blue   |   -1..1  none   |   1..2  yellow   |   2..3  orange   |"
              "   >= 3  red")
    ax.text(0.02, 0.05, f"tabby_cats at layers {','.join(map(str, vec.active_layers))}.   {legend}", fontsize=8,
            color="#333333")
    fig.savefig(path)
    plt.close(fig)


def dose(vec, path: Path) -> None:  # noqa: ANN001
    import matplotlib.pyplot as plt

    (key, w), *_ = vec.extra["windows"].items()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.plot(w["ladder"], w["concept"], "-o", color="#c62828", label="concept C")
    ax.plot(w["ladder"], w["fluency"], "-s", color="#2e7d32", label="fluency F")
    ax.axvline(w["max_strength"], color="black", ls="--", lw=1.2)
    ax.text(w["max_strength"], 1.04, " dose 1", fontsize=9, va="bottom")
    ax.axvspan(w["breakdown"], max(w["ladder"]), color="#ef9a9a", alpha=0.3, lw=0)
    ax.text(w["breakdown"], 0.5, " breaks", fontsize=9, color="#b71c1c")
    ax.axvspan(min(w["ladder"]), w["onset"], color="#e0e0e0", alpha=0.6, lw=0)
    ax.text(min(w["ladder"]), 0.5, " too weak", fontsize=9, color="#424242")
    ax.set_xscale("log")
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0) if min(w["ladder"]) <= t <= max(w["ladder"])]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(-0.02, 1.12)
    ax.set_xlabel(f"strength per layer (layers {','.join(map(str, w['layers']))}), log scale")
    ax.set_ylabel("mean over 4 neutral prompts")
    ax.set_title(f"{vec.name}: measured dose window ({key}); dose = strength / {w['max_strength']:.3f}", fontsize=10)
    ax.legend(fontsize=8, loc="lower center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list of {', '.join(ALL)}")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--strip-notebook", action="store_true", help="only strip the notebook's outputs")
    args = ap.parse_args(argv)
    if args.strip_notebook:
        strip_notebook()
        print(f"stripped {NOTEBOOK}")
        return
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = set(wanted) - set(ALL)
    if unknown:
        sys.exit(f"unknown figures {sorted(unknown)}; choose from {', '.join(ALL)}")
    args.out.mkdir(parents=True, exist_ok=True)

    from steerlab import load_model
    from steerlab.options import model_vectors_dir
    from steerlab.personas import get_persona
    from steerlab.store import VectorStore

    lm = load_model()
    folder = model_vectors_dir(lm.model_id)
    vec = VectorStore(folder, lm).get("tabby_cats")  # builds it (and measures its dose window) if missing
    persona = get_persona("tabby_cats")
    made = []
    if "activation_space" in wanted:
        activation_space(lm, vec, persona, args.out / "activation_space.png")
        made.append("activation_space.png")
    if "tokens" in wanted:
        tokens(lm, vec, args.out / "tokens.png")
        made.append("tokens.png")
    if "dose" in wanted:
        dose(vec, args.out / "dose.png")
        made.append("dose.png")
    if "layers" in wanted:
        cli("inspect", "--vector", "tabby_cats", "--profile", "--plot", str(args.out / "layers.png"), "--no-lens",
            "--vectors", str(folder))
        made.append("layers.png")
    if "sweep" in wanted:
        with tempfile.TemporaryDirectory() as tmp:
            cli("sweep", "tabby_cats", "--layers", "6,10,14,18,22", "--strengths", "0.15,0.3,0.5", "--prompts", "4",
                "--max-new-tokens", "24", "--out", tmp, "--no-save", "--vectors", str(folder))
            shutil.copy(Path(tmp) / "sweep.png", args.out / "sweep.png")
        made.append("sweep.png")
    print("wrote", ", ".join(str(args.out / m) for m in made))


if __name__ == "__main__":
    main()
