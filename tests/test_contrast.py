"""Contrast-set files: JSONL, CSV/TSV and two text files; errors name file, line and reason."""

from __future__ import annotations

import json

import pytest

from steerlab.contrast import load_contrast, load_csv, load_jsonl, load_text_pair
from steerlab.errors import PersonaError


def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_jsonl_pairs_blank_lines_and_extra_keys(tmp_path):
    rows = [{"positive": "a cat", "negative": "a car", "id": 1}, {"negative": " a dog ", "positive": "a kitten"}]
    path = write(tmp_path, "p.jsonl", json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    cs = load_contrast(path)
    assert cs.positive == ("a cat", "a kitten") and cs.negative == ("a car", "a dog") and cs.paired
    assert cs.source == str(path)


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"positive": "a", "negative": "b"}\n{"positive": "a"\n', ":2: not valid JSON"),
        ('{"positive": "a", "negative": "b"}\n["a", "b"]\n', ":2: expected an object"),
        ('{"positive": "a", "negative": "b"}\n\n{"pos": "a", "negative": "b"}\n', ":3: missing 'positive'"),
        ('{"positive": "a", "negative": ""}\n', ":1: 'negative' is empty"),
        ('{"positive": 3, "negative": "b"}\n', ":1: 'positive' must be a string, got int"),
        ("\n\n", "no pairs found"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, body, message):
    path = write(tmp_path, "bad.jsonl", body)
    with pytest.raises(PersonaError) as err:
        load_jsonl(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_csv_header_any_order_quotes_and_multiline(tmp_path):
    body = 'id,negative,positive\n1,"a car, parked","a cat, napping"\n\n2,"two\nlines",b\n'
    cs = load_contrast(write(tmp_path, "p.csv", body))
    assert cs.positive == ("a cat, napping", "b") and cs.negative == ("a car, parked", "two\nlines")


def test_tsv_and_bom(tmp_path):
    cs = load_contrast(write(tmp_path, "p.tsv", "\ufeffPositive\tNegative\nx\ty\n"))
    assert cs.positive == ("x",) and cs.negative == ("y",)


@pytest.mark.parametrize(
    "body, message",
    [
        ("pos,neg\na,b\n", ":1: header must name 'positive' and 'negative'"),
        ("positive,negative\na,b\nc,d,e\n", ":3: 3 fields, the header has 2"),
        ('positive,negative\na,b\n"multi\nline",\n', ":3: 'negative' is empty"),
        ("", "empty file"),
    ],
)
def test_csv_errors_name_the_line(tmp_path, body, message):
    path = write(tmp_path, "bad.csv", body)
    with pytest.raises(PersonaError) as err:
        load_csv(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_two_text_files_may_differ_in_length(tmp_path):
    pos = write(tmp_path, "pos.txt", "a cat\n\na kitten\nthe tabby\n")
    neg = write(tmp_path, "neg.txt", "a car\na dog\n")
    cs = load_text_pair(pos, neg)
    assert cs.positive == ("a cat", "a kitten", "the tabby") and cs.negative == ("a car", "a dog")
    assert not cs.paired


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("x.txt", "a\n", "give two with --positive and --negative"),
        ("x.yaml", "a: b\n", "unknown contrast file type .yaml"),
        ("x.jsonl", b"\xff\xfe\x00", "not UTF-8"),
    ],
)
def test_file_level_errors(tmp_path, name, body, message):
    with pytest.raises(PersonaError, match=message):
        load_contrast(write(tmp_path, name, body))


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(PersonaError, match="no such contrast file"):
        load_contrast(tmp_path / "nope.jsonl")
    with pytest.raises(PersonaError, match="no texts"):
        load_text_pair(write(tmp_path, "p.txt", "\n \n"), write(tmp_path, "n.txt", "x\n"))


def test_cli_build_from_contrast_files(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from steerlab import SteeringVector
    from steerlab.cli import main

    rows = [("the cat sat on the mat and purred", "the man sat on the mat and talked"),
            ("a cat in the warm sun", "a car in the warm sun")]
    jsonl = write(tmp_path, "p.jsonl", "".join(json.dumps({"positive": p, "negative": n}) + "\n" for p, n in rows))
    out = tmp_path / "vecs"
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])  # noqa: E731
    r = run("build", "--contrast", jsonl, "--name", "mine", "--out", out, "--model", tiny_dir, "--layer", "1,2",
            "--prompt", "the cat")
    assert r.exit_code == 0, r.output
    assert "mine: built from 2 positive / 2 negative texts" in r.output and (out / "mine.safetensors").exists()
    vec = SteeringVector.load(out / "mine.safetensors")
    assert vec.layers == [1, 2] and vec.method == "mean_diff"

    pos = write(tmp_path, "pos.txt", "\n".join(p for p, _ in rows))
    neg = write(tmp_path, "neg.txt", "\n".join(n for _, n in rows))
    r = run("build", "--positive", pos, "--negative", neg, "--name", "mine", "--out", out, "--model", tiny_dir,
            "--method", "pca", "--force")
    assert r.exit_code == 0, r.output
    assert SteeringVector.load(out / "mine.safetensors").method == "pca"

    r = run("build", "--positive", pos, "--negative", neg, "--name", "mine", "--out", out, "--model", tiny_dir)
    assert r.exit_code != 0 and "exists already" in r.output

    bad = write(tmp_path, "bad.csv", "positive,negative\na,b\nc\n")
    r = run("build", "--contrast", bad, "--name", "x", "--model", tiny_dir)
    assert r.exit_code == 1 and f"{bad}:3: 1 fields" in r.output and "Traceback" not in r.output

    for args, message in [(["--contrast", jsonl], "needs --name"), (["--positive", pos, "--name", "x"], "go together"),
                          (["kittens", "--contrast", jsonl, "--name", "x"], "exactly one of")]:
        r = run("build", *args, "--model", tiny_dir)
        assert r.exit_code != 0 and message in r.output, r.output
