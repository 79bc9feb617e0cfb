"""llama.cpp control vectors: the file layout, the layer and scale conventions, round trips, errors."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import random_vector

from steerlab import SteeringError, SteeringVector, VectorFileError
from steerlab.gguf_io import export_gguf, import_gguf, read_gguf
from steerlab.store import load_vectors


def _fields(path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type, list(t.shape), np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def _foreign(path, tensors: dict[str, np.ndarray], *, arch="controlvector", hint="llama"):
    """A file as repeng writes it (no steerlab metadata)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_string(f"{arch}.model_hint", hint)
    w.add_uint32(f"{arch}.layer_count", len(tensors))
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def vec(tiny_lm):
    v = random_vector(tiny_lm, [0, 1, 2, 3], seed=3, name="kitty", strength=0.4)
    return replace(v, norms={0: 9.0, 1: 2.0, 2: 3.0, 3: 5.0}, default_layers=(2, 3), keywords=("cat",))


def test_file_layout_keys_and_default_layers(vec, tmp_path):
    path = export_gguf(vec, tmp_path / "kitty.gguf")
    fields, tensors = _fields(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == "tiny-llama"
    assert fields["controlvector.layer_count"] == 2
    assert set(tensors) == {"direction.2", "direction.3"}  # the vector's default layers only
    for _name, (ttype, shape, _) in tensors.items():
        assert ttype == gguf.GGMLQuantizationType.F32 and shape == [64]


def test_scale_convention_tensor_is_what_steerlab_adds(vec, tmp_path):
    """direction.N == vec.deltas(strength=s)[N] == s * norm_N * unit direction_N (default s = 1)."""
    for s in (1.0, 0.4, -2.0):
        _, tensors = _fields(export_gguf(vec, tmp_path / f"k{s}.gguf", strength=s))
        for layer in (2, 3):
            t = tensors[f"direction.{layer}"][2]
            np.testing.assert_allclose(t, vec.deltas(strength=s, layers=[layer])[layer].numpy(), rtol=1e-6)
            assert np.linalg.norm(t) == pytest.approx(abs(s) * vec.norms[layer], rel=1e-5)
    _, tensors = _fields(export_gguf(vec, tmp_path / "abs.gguf", scale=7.0))
    assert np.linalg.norm(tensors["direction.2"][2]) == pytest.approx(7.0, rel=1e-5)


def test_layer_numbering_no_offset_and_layer_zero_refused(vec, tmp_path):
    _, tensors = _fields(export_gguf(vec, tmp_path / "one.gguf", layers=[1]))
    assert list(tensors) == ["direction.1"]  # steerlab layer N -> direction.N (llama.cpp block N output)
    with pytest.raises(SteeringError, match="layer 0"):
        export_gguf(vec, tmp_path / "zero.gguf", layers=[0, 1])


@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_round_trip_restores_vector(vec, tmp_path, strength):
    back = import_gguf(export_gguf(vec, tmp_path / "k.gguf", strength=strength))
    assert back.layers == [2, 3] and back.default_layers == (2, 3)
    for layer in (2, 3):
        torch.testing.assert_close(back.directions[layer], vec.directions[layer], rtol=1e-6, atol=1e-7)
        assert back.norms[layer] == vec.norms[layer]
    assert (back.name, back.model_id, back.keywords, back.default_strength) == ("kitty", "tiny-llama", ("cat",), 0.4)
    assert import_gguf(tmp_path / "k.gguf", name="other").name == "other"


def test_round_trip_strength_identity(vec, tmp_path):
    """steerlab strength k on the imported vector adds k * (file tensor at strength 1) at every layer."""
    path = export_gguf(vec, tmp_path / "k.gguf", layers=[1, 2, 3])
    _, tensors = _fields(path)
    back = import_gguf(path)
    for layer in (1, 2, 3):
        np.testing.assert_allclose(back.deltas(strength=0.7)[layer].numpy(), 0.7 * tensors[f"direction.{layer}"][2],
                                   rtol=1e-5, atol=1e-6)


def test_foreign_file_without_model_uses_file_norms(tmp_path):
    g = np.random.default_rng(0)
    raw = {f"direction.{i}": (2.0 * i * g.standard_normal(64)).astype(np.float32) for i in (1, 2, 3)}
    v = import_gguf(_foreign(tmp_path / "repeng.gguf", raw), model_id="tiny-llama")
    assert v.model_id == "tiny-llama" and v.name == "repeng" and v.default_layers == (1, 2, 3)
    assert v.extra["norms_source"] == "file" and v.extra["model_hint"] == "llama" and v.default_strength == 1.0
    for i in (1, 2, 3):
        assert float(v.directions[i].norm()) == pytest.approx(1.0, abs=1e-6)
        # strength k == llama.cpp scale k, per layer
        np.testing.assert_allclose(v.deltas(strength=1.5)[i].numpy(), 1.5 * raw[f"direction.{i}"], rtol=1e-5)


def test_foreign_file_with_model_measures_norms(tiny_lm, tmp_path):
    raw = {f"direction.{i}": np.full(64, 0.5, np.float32) for i in (1, 3)}  # |t| = 4
    v = import_gguf(_foreign(tmp_path / "f.gguf", raw), lm=tiny_lm)
    assert v.extra["norms_source"] == "measured" and v.model_id == "tiny-llama"
    from steerlab.extract import measure_norms

    expect = measure_norms(tiny_lm, [1, 3])
    assert v.norms == pytest.approx(expect)
    assert v.default_strength == pytest.approx(np.mean([4.0 / expect[1], 4.0 / expect[3]]))
    assert import_gguf(tmp_path / "f.gguf", lm=tiny_lm, norms="file").extra["norms_source"] == "file"


def test_zero_direction_is_dropped_and_all_zero_refused(tmp_path):
    raw = {"direction.1": np.zeros(64, np.float32), "direction.2": np.ones(64, np.float32)}
    v = import_gguf(_foreign(tmp_path / "z.gguf", raw))
    assert v.layers == [2] and v.extra["zero_layers"] == [1]
    with pytest.raises(VectorFileError, match="all zeros"):
        import_gguf(_foreign(tmp_path / "zz.gguf", {"direction.1": np.zeros(64, np.float32)}))


@pytest.mark.parametrize(
    "tensors, arch, message",
    [
        ({"direction.0": np.ones(64, np.float32)}, "controlvector", "direction.0"),
        ({"direction.1": np.ones(64, np.int32)}, "controlvector", "control vectors are F32"),
        ({"direction.1": np.ones((2, 32), np.float32)}, "controlvector", "1-D"),
        ({"direction.1": np.ones(64, np.float32), "direction.2": np.ones(32, np.float32)}, "controlvector",
         "32 values"),
        ({"blk.0.weight": np.ones(64, np.float32)}, "controlvector", "unexpected tensor 'blk.0.weight'"),
        ({"direction.1": np.ones(64, np.float32)}, "llama", "architecture is 'llama'"),
        ({}, "controlvector", "no direction.N tensors"),
        ({"direction.1": np.full(64, np.nan, np.float32)}, "controlvector", "NaN"),
    ],
)
def test_bad_files(tmp_path, tensors, arch, message):
    path = _foreign(tmp_path / "bad.gguf", tensors, arch=arch)
    with pytest.raises(VectorFileError, match=message):
        read_gguf(path)


def test_not_gguf_missing_and_wrong_model(vec, tiny_lm, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(VectorFileError, match="not a readable GGUF"):
        import_gguf(junk)
    with pytest.raises(VectorFileError, match="no such control-vector file"):
        import_gguf(tmp_path / "nope.gguf")
    with pytest.raises(VectorFileError, match="hidden size is 576"):
        import_gguf(export_gguf(vec, tmp_path / "k.gguf"), hidden_size=576)
    with pytest.raises(VectorFileError, match="built for tiny-llama, not other"):
        import_gguf(tmp_path / "k.gguf", model_id="other")
    deep = _foreign(tmp_path / "deep.gguf", {"direction.9": np.ones(64, np.float32)})
    with pytest.raises(VectorFileError, match="layers \\[9\\]"):
        import_gguf(deep, lm=tiny_lm)
    with pytest.raises(SteeringError, match="needs the model"):
        import_gguf(deep, norms="measure")


def test_vectors_folder_loads_gguf_and_reports_bad_ones(vec, tiny_lm, tmp_path):
    folder = tmp_path / "vecs"
    export_gguf(vec, folder / "kitty.gguf")
    _foreign(folder / "foreign.gguf", {"direction.1": np.ones(64, np.float32)})
    _foreign(folder / "wide.gguf", {"direction.1": np.ones(576, np.float32)})
    (folder / "broken.gguf").write_bytes(b"GGUF\x03\x00garbage")
    errors = []
    vecs = load_vectors(folder, model_id="tiny-llama", hidden_size=64, on_error=lambda p, e: errors.append(p.name))
    assert sorted(vecs) == ["foreign", "kitty"] and sorted(errors) == ["broken.gguf", "wide.gguf"]
    assert vecs["kitty"].norms[2] == 3.0 and vecs["foreign"].model_id == "tiny-llama"

    from steerlab.store import VectorStore

    store = VectorStore(folder, tiny_lm, warn=lambda m: None)
    assert {"kitty", "foreign"} <= set(store.names())


def test_cli_export_and_import(vec, tiny_dir, tmp_path):
    from steerlab.cli import main

    folder = tmp_path / "vecs"
    vec = replace(vec, model_id=str(tiny_dir))  # the model id the CLI records for a local folder
    vec.save(folder / "kitty.safetensors")
    out = tmp_path / "kitty.gguf"
    r = CliRunner().invoke(main, ["export", "kitty", str(out), "--vectors", str(folder), "--layer", "1:4"])
    assert r.exit_code == 0, r.output
    assert "layers 1,2,3, strength 1.0 baked in" in r.output and "--control-vector-scaled" in r.output
    assert set(_fields(out)[1]) == {"direction.1", "direction.2", "direction.3"}

    r = CliRunner().invoke(main, ["import", str(out), "--name", "again", "--vectors", str(folder),
                                  "--model", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    assert "imported" in r.output and (folder / "again.safetensors").exists()
    again = SteeringVector.load(folder / "again.safetensors")
    torch.testing.assert_close(again.directions[2], vec.directions[2], rtol=1e-6, atol=1e-7)

    r = CliRunner().invoke(main, ["import", str(out), "--name", "again", "--vectors", str(folder),
                                  "--model", str(tiny_dir)])
    assert r.exit_code == 1 and "exists already" in r.output

    r = CliRunner().invoke(main, ["export", "nothing", str(out), "--vectors", str(folder)])
    assert r.exit_code == 1 and "no vector 'nothing'" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["export", "kitty", str(out), "--vectors", str(folder), "--layer", "0"])
    assert r.exit_code == 1 and "layer 0" in r.output
