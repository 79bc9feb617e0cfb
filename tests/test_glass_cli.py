"""`steerlab inspect`, `doctor`, `similar` and `list --details`, in-process on the tiny model folder."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from steerlab.cli import main

PAIRS = [("the cat sat on the mat and purred", "the man sat on the mat and talked"),
         ("a cat in the warm sun", "a car in the warm sun"),
         ("the cat purred by the lake", "the man talked by the lake"),
         ("my cat sat in the sun", "my car sat in the sun"),
         ("the cat is warm", "the car is warm")]


def persona(name: str, pairs) -> str:  # noqa: ANN001
    body = "".join(f'[[pairs]]\npositive = "{p}"\nnegative = "{n}"\n' for p, n in pairs)
    return f'name = "{name}"\ndescription = "cats"\nkeywords = ["cat"]\ndefault_layers = [2]\n{body}'


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    """Two vectors built from persona files in a user personas folder; returns (folder, personas)."""
    root = tmp_path_factory.mktemp("glass")
    files = []
    for name, pairs in (("kittens", PAIRS), ("lakes", [(n, p) for p, n in PAIRS])):
        path = root / f"{name}.toml"
        path.write_text(persona(name, pairs))
        files.append(path)
    out = root / "vecs"
    r = CliRunner().invoke(main, ["build", *map(str, files), "--out", str(out), "--model", str(tiny_dir)])
    assert r.exit_code == 0, r.output
    return out, files


def test_inspect_prints_tokens_legend_and_lens(tiny_dir, built):
    out, _ = built
    r = run("inspect", "the cat sat in the sun", "--vector", "kittens", "--vectors", out, "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    assert "kittens  (layers 2; mean" in r.output
    assert "legend: token[reading]" in r.output  # no terminal: annotated instead of coloured
    assert "logit lens of kittens" in r.output and "layer  2: +" in r.output and "layer  3: +" in r.output
    coloured = run("inspect", "the cat", "-v", "kittens", "--color", "--no-lens", "--vectors", out, "--model", tiny_dir)
    assert coloured.exit_code == 0 and "\x1b[48;5;" in coloured.output and "logit lens" not in coloured.output


def test_inspect_json_lines_up_with_the_text(tiny_dir, built):
    out, _ = built
    text = "the cat sat in the warm sun"
    r = run("inspect", text, "-v", "kittens", "-v", "lakes", "--json", "--layer", "1,2", "--vectors", out,
            "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert "".join(t["text"] for t in data["tokens"]) == text
    assert set(data["tokens"][0]["read"]) == {"kittens", "lakes"}
    assert data["vectors"]["kittens"]["layers"] == [1, 2]
    assert [row["layer"] for row in data["lens"]["lakes"]] == [1, 2, 3]


def test_inspect_profile_needs_a_persona_and_writes_a_plot(tiny_dir, built, tmp_path, monkeypatch):
    out, files = built
    r = run("inspect", "-v", "kittens", "--profile", "--vectors", out, "--model", tiny_dir)
    assert r.exit_code == 1 and "needs kittens's contrast set" in r.output
    monkeypatch.setenv("STEERLAB_PERSONAS", str(files[0].parent))
    plot = tmp_path / "layers.png"
    r = run("inspect", "-v", "kittens", "--profile", "--no-lens", "--plot", plot, "--vectors", out, "--model", tiny_dir)
    assert r.exit_code == 0, r.output
    assert "where kittens lives" in r.output and "*layer  2" in r.output and plot.stat().st_size > 1000


def test_doctor_grades_and_advises(tiny_dir, built, tmp_path):
    _, files = built
    r = run("doctor", files[0], "--model", tiny_dir, "--plot", tmp_path)
    assert r.exit_code == 0, r.output
    assert "kittens: grade " in r.output and "advice:" in r.output and "graded at layers 2" in r.output
    assert (tmp_path / "kittens_doctor.png").exists()
    r = run("doctor", files[0], files[1], "--model", tiny_dir, "--json", "--layer", "1,2")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [d["name"] for d in rows] == ["kittens", "lakes"]
    assert [x["layer"] for x in rows[0]["layers"]] == [1, 2] and rows[0]["grade"] in "ABCDF"


def test_similar_prints_the_matrix_and_writes_a_plot(built, tmp_path):
    out, _ = built
    plot = tmp_path / "sim.png"
    r = run("similar", "kittens", "lakes", "--vectors", out, "--plot", plot)
    assert r.exit_code == 0, r.output
    assert "kittens / lakes" in r.output and "mean over 4 shared layers" in r.output
    assert "-1.000" in r.output  # the swapped contrast set gives the opposite direction
    assert plot.stat().st_size > 1000
    r = run("similar", "kittens", "lakes", "--vectors", out, "--json", "--no-plot", "--layer", "2")
    data = json.loads(r.output)
    assert data["layers"] == [2] and data["mean"][0][1] == pytest.approx(-1.0, abs=1e-3) and "plot" not in data
    r = run("similar", "kittens", "--vectors", out, "--no-plot")
    assert r.exit_code == 1 and "at least two" in r.output


def test_list_details_shows_the_lens(tiny_dir, built, monkeypatch):
    out, _ = built
    monkeypatch.setenv("STEERLAB_MODEL", str(tiny_dir))
    r = run("list", "--vectors", out, "--details")
    assert r.exit_code == 0, r.output
    assert "kittens: logit lens at layers 2,3" in r.output


def test_steer_condition_in_the_cli(tiny_dir, built):
    folder, _ = built
    common = ["--vectors", folder, "--model", tiny_dir, "--max-new-tokens", 5, "--raw"]
    base = run("generate", "the cat sat", *common)
    never = run("generate", "the cat sat", *common, "--steer", "kittens:3:if=lakes:threshold=50")
    assert never.exit_code == 0, never.output
    assert never.stdout == base.stdout and "did not fire" in never.stderr
    text = run("compare", "the cat sat", *common, "--steer", "kittens:3:if=lakes>=-50:stat=peak:on=text")
    assert text.exit_code == 0, text.output
    assert "only when the text reads lakes peak >= -50" in text.output and "fired from reply token 2" in text.stderr
    bad = run("generate", "x", *common, "--steer", "kittens:if=lakes>1")
    assert bad.exit_code != 0 and "if=OTHER[:threshold=X]" in bad.output
    bad = run("generate", "x", *common, "--steer", "kittens:stat=peak")
    assert bad.exit_code != 0 and "belong to a condition" in bad.output
    bad = run("generate", "x", *common, "--steer", "kittens:if=lakes>=1:threshold=2")
    assert bad.exit_code != 0 and "threshold once" in bad.output


def test_build_prints_the_doctors_grade_unless_told_not_to(tiny_dir, built, tmp_path):
    _, files = built
    r = run("build", files[0], "--out", tmp_path / "a", "--model", tiny_dir, "--no-calibrate")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "doctor: grade" in x)
    assert "at layers 2" in line and "advice:" in r.output
    r = run("build", files[0], "--out", tmp_path / "b", "--model", tiny_dir, "--no-calibrate", "--no-doctor")
    assert r.exit_code == 0 and "doctor:" not in r.output
