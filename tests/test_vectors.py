"""SteeringVector: save/load round trip, metadata checks, arithmetic, refusals."""

from __future__ import annotations

import pytest
import torch
from helpers import random_vector

from steerlab import SteeringError, SteeringVector, VectorFileError


def test_save_load_round_trip(tiny_lm, tmp_path):
    vec = random_vector(tiny_lm, [0, 2], name="cats").with_defaults(layers=[2], strength=0.7, sweep="done")
    path = vec.save(tmp_path / "cats")
    assert path.suffix == ".safetensors"
    back = SteeringVector.load(path, model_id="tiny-llama", hidden_size=64)
    assert back.layers == [0, 2] and back.default_layers == (2,) and back.default_strength == 0.7
    assert back.extra == {"sweep": "done"} and back.name == "cats" and back.created_at == vec.created_at
    for layer in vec.layers:
        assert torch.equal(back.directions[layer], vec.directions[layer])
    assert back.norms == vec.norms


def test_load_checks_model_and_size(tiny_lm, tmp_path):
    path = random_vector(tiny_lm, [1]).save(tmp_path / "v.safetensors")
    with pytest.raises(VectorFileError, match="hidden size 64 but the model has 576"):
        SteeringVector.load(path, hidden_size=576)
    with pytest.raises(VectorFileError, match="built for tiny-llama, not other/model"):
        SteeringVector.load(path, model_id="other/model")


def test_refuses_pickle_corrupt_and_foreign_files(tmp_path):
    pkl = tmp_path / "weeknd.pkl"
    pkl.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(VectorFileError, match="pickle"):
        SteeringVector.load(pkl)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(VectorFileError, match="not a readable safetensors"):
        SteeringVector.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(VectorFileError, match="without steerlab metadata"):
        SteeringVector.load(tmp_path / "foreign.safetensors")
    with pytest.raises(VectorFileError, match="no such vector file"):
        SteeringVector.load(tmp_path / "missing.safetensors")


def test_truncated_file_is_refused(tiny_lm, tmp_path):
    path = random_vector(tiny_lm, [1]).save(tmp_path / "v.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VectorFileError):
        SteeringVector.load(path)


def test_arithmetic(tiny_lm):
    a = random_vector(tiny_lm, [1, 2], seed=1, name="a")
    b = random_vector(tiny_lm, [2, 3], seed=2, name="b")
    blend = a + 0.5 * b
    assert blend.layers == [1, 2, 3] and blend.name == "a+b"
    torch.testing.assert_close(blend.directions[2], a.directions[2] + 0.5 * b.directions[2])
    torch.testing.assert_close(blend.directions[3], 0.5 * b.directions[3])
    torch.testing.assert_close((-a).directions[1], -a.directions[1])
    torch.testing.assert_close((a - a).directions[1], torch.zeros(64))
    torch.testing.assert_close((a / 2).directions[1], a.directions[1] / 2)
    assert blend.active_layers == [1, 2, 3]


def test_dose_units(tiny_lm):
    vec = random_vector(tiny_lm, [1], strength=0.5)
    d = vec.deltas()[1]
    assert d.norm().item() == pytest.approx(0.5 * vec.norms[1], rel=1e-5)  # default strength
    assert vec.deltas(strength=2.0)[1].norm().item() == pytest.approx(2.0 * vec.norms[1], rel=1e-5)
    assert vec.deltas(scale=3.0)[1].norm().item() == pytest.approx(3.0, rel=1e-5)
    with pytest.raises(SteeringError, match="not both"):
        vec.deltas(strength=1.0, scale=1.0)
    with pytest.raises(SteeringError, match="no direction at layers"):
        vec.deltas(layers=[3])


def test_combining_different_models_fails(tiny_lm):
    a = random_vector(tiny_lm, [1])
    b = SteeringVector(directions={1: torch.ones(64)}, norms={1: 1.0}, model_id="other")
    with pytest.raises(SteeringError, match="different models"):
        a + b


def test_invalid_construction():
    with pytest.raises(SteeringError, match="at least one layer"):
        SteeringVector(directions={}, norms={}, model_id="m")
    with pytest.raises(SteeringError, match="no residual norm"):
        SteeringVector(directions={1: torch.ones(4)}, norms={}, model_id="m")
    with pytest.raises(SteeringError, match="default layers"):
        SteeringVector(directions={1: torch.ones(4)}, norms={1: 1.0}, model_id="m", default_layers=(2,))


def test_vectors_compare_by_value_and_hash(tiny_lm):
    """``==`` compares metadata and every direction exactly; equal vectors hash alike (usable in sets)."""
    a = random_vector(tiny_lm, [1, 2])
    same = SteeringVector.from_metadata({k: v.clone() for k, v in a.directions.items()}, a.metadata())
    assert a == same and hash(a) == hash(same) and len({a, same}) == 1
    assert a != a * 2.0 and a != a.with_defaults(strength=0.9) and a != "a vector"
    assert (a * 1.0) == a
