"""Comparing direction estimators: cosine between methods and held-out separation accuracy."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from steerlab.errors import SteeringError
from steerlab.method_compare import compare_methods, held_out_accuracy


def _synthetic(n=20, h=16, shift=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(h)
    direction[0] = 1.0
    base = torch.randn(n, h, generator=g)
    base[:, 0] *= 0.1  # the concept axis is clean; every other axis is shared noise
    pos = base + shift * direction + 0.1 * torch.randn(n, h, generator=g)
    neg = base + 0.1 * torch.randn(n, h, generator=g)
    return pos, neg


@pytest.mark.parametrize("method", ["mean_diff", "pca", "probe"])
def test_separable_data_is_classified(method):
    pos, neg = _synthetic()
    assert held_out_accuracy(pos, neg, method, folds=5) == 1.0


def test_random_labels_are_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(80, 16, generator=g)
    assert held_out_accuracy(x[:40], x[40:], "mean_diff", folds=5) < 0.75


def test_compare_methods_on_tiny_model(tiny_lm):
    from conftest import CORPUS

    pos = [t for t in CORPUS[:5] if "cat" in t or "toronto" in t] * 2
    neg = [t for t in CORPUS[:5] if "cat" not in t and "toronto" not in t][:2] * 2
    rows = list(compare_methods(tiny_lm, pos, neg, layers=[1, 3], folds=2))
    assert [r.layer for r in rows] == [1, 3]
    for r in rows:
        assert set(r.cosine) == {("mean_diff", "pca"), ("mean_diff", "probe"), ("pca", "probe")}
        assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in r.cosine.values())
        assert all(0.0 <= a <= 1.0 for a in r.accuracy.values())
    with pytest.raises(SteeringError, match="paired"):
        list(compare_methods(tiny_lm, pos, neg[:1], layers=[1]))


def test_cli_compare_methods(tiny_dir, tmp_path):
    from steerlab.cli import main

    persona = tmp_path / "kittens.toml"
    pairs = "".join(f'[[pairs]]\npositive = "the cat sat on the mat {i}"\nnegative = "the car sat in the lot {i}"\n'
                    for i in range(4))
    persona.write_text('name = "kittens"\n' + pairs)
    r = CliRunner().invoke(main, ["compare-methods", str(persona), "--layer", "1,2", "--folds", "2",
                                  "--model", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert "kittens: 4 pairs" in r.output and "cos md/pca" in r.output
    assert len([line for line in r.output.splitlines() if line.strip()[:1].isdigit()]) == 2
