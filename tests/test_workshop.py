"""The workshop materials run (docs/workshop/): every command of the handout, the notebook, and every
troubleshooting entry's message.

* The handout: each fenced ```bash block's `steerlab ...` lines run in order through the real command
  line (in-process, click's runner; the embedded model is loaded once and shared, which is the only
  difference from a shell), each ```python block is executed, in one scratch folder with its own
  vectors folder; the HTML comment under a block says what its output must show
  (`<!-- expect: REGEX -->`) or which file it must write (`<!-- expect-file: PATH -->`).
  `generate`/`compare` lines get `--max-new-tokens 32` appended unless they set it. Shell lines that
  are not steerlab commands must be listed in ``NOT_RUN`` with the reason.
  The built-in vectors come from the session fixture ``real_vectors`` (what `steerlab build` makes:
  each persona built and its dose window measured), so the handout's `steerlab build` keeps them
  instead of spending ~3 minutes rebuilding; the handout's own persona is built for real.
* The notebook (docs/workshop/tour.ipynb) runs top to bottom under nbclient with a kernel on this
  interpreter, and is stored without outputs.
* docs/workshop/troubleshooting.md: each ```text block is what steerlab prints; each is triggered
  here and compared (``<...>`` in the doc stands for a part that varies: a path, a model id).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKSHOP = ROOT / "docs" / "workshop"
HANDOUT = WORKSHOP / "handout.md"
NOTEBOOK = WORKSHOP / "tour.ipynb"
TROUBLE = WORKSHOP / "troubleshooting.md"
NEW_TOKENS = "32"
NOT_RUN = {  # handout shell lines the test does not run, and why
    "make install": "sets up the environment this test already runs in",
    "source .venv/bin/activate": "puts .venv/bin on PATH; the test calls the command line directly",
}


# ---- reading the handout -------------------------------------------------------------------------
@dataclass
class Block:
    lang: str
    code: str
    line: int
    expects: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def blocks(path: Path = HANDOUT) -> list[Block]:
    """Fenced code blocks with the expect comments that follow them."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, body = i + 1, []
        i += 1
        while not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        block = Block(m.group(1), "\n".join(body), start)
        i += 1
        while i < len(lines) and (c := re.match(r"^<!-- expect(-file)?: (.*) -->$", lines[i])):
            (block.files if c.group(1) else block.expects).append(c.group(2))
            i += 1
        out.append(block)
    return out


def shell_lines(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comments and blank lines dropped."""
    text = block.code.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def steerlab_argv(line: str) -> list[str]:
    argv = shlex.split(line)
    assert argv[0] == "steerlab", line
    argv = argv[1:]
    if argv[0] in ("generate", "compare") and "--max-new-tokens" not in argv:
        argv += ["--max-new-tokens", NEW_TOKENS]
    return argv


def runnable() -> list[Block]:
    return [b for b in blocks() if b.lang in ("bash", "python")]


def test_the_handout_has_every_step_and_each_runnable_block_is_checked():
    from test_docs import parse  # the real parser of the command line

    text = HANDOUT.read_text(encoding="utf-8")
    for cmd in ("steerlab build", "steerlab generate", "steerlab inspect", "steerlab doctor", "steerlab sweep",
                "--dose", "--steer weeknd:dose", ":if=tabby_cats", "steerlab export"):
        assert cmd in text, cmd
    n = 0
    for b in runnable():
        assert b.expects or b.files, f"handout line {b.line}: a {b.lang} block without an expect comment"
        for pattern in b.expects:
            re.compile(pattern)
        if b.lang == "bash":
            for line in shell_lines(b):
                if line.startswith("steerlab "):
                    parse(line)
                    n += 1
                else:
                    assert line in NOT_RUN, f"handout line {b.line}: `{line}` is neither steerlab nor in NOT_RUN"
    assert n >= 12


# ---- running the handout on the real model -------------------------------------------------------
@pytest.fixture
def shared_model(real_lm, monkeypatch):
    """Every ``load_model()`` of the embedded model returns the session's copy (no reload per command)."""
    import steerlab
    import steerlab.models as models

    original = models.load_model

    def load(model_id=None, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        if model_id in (None, models.DEFAULT_MODEL) and kw.get("device", "auto") in ("auto", "cpu") \
                and kw.get("dtype", "auto") in ("auto", "float32"):
            return real_lm
        return original(model_id, *args, **kw)

    monkeypatch.setattr(models, "load_model", load)
    monkeypatch.setattr(steerlab, "load_model", load, raising=False)
    return real_lm


def run_cli(argv: list[str]) -> tuple[int, str]:
    from click.testing import CliRunner

    from steerlab.cli import main

    r = CliRunner().invoke(main, argv, catch_exceptions=True)
    out = r.output
    if r.exception and not isinstance(r.exception, SystemExit):
        import traceback

        out += "".join(traceback.format_exception(r.exception))
    return r.exit_code, out


def run_python(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, str(HANDOUT), "exec"), {"__name__": "__handout__"})  # noqa: S102
    return buf.getvalue()


@pytest.mark.model
@pytest.mark.usefixtures("one_torch_thread")
def test_the_handout_runs_as_written(shared_model, real_vectors, tmp_path, monkeypatch):
    import time

    vectors = Path(os.environ["STEERLAB_VECTORS"])
    vectors.mkdir(parents=True, exist_ok=True)
    for vec in real_vectors.values():  # what `steerlab build` writes (see the module docstring)
        vec.save(vectors / f"{vec.name}.safetensors")
    (tmp_path / "docs" / "workshop").mkdir(parents=True)
    shutil.copy(WORKSHOP / "warm_support.toml", tmp_path / "docs" / "workshop")
    monkeypatch.chdir(tmp_path)
    log, failures = [], []
    for b in runnable():
        t0 = time.perf_counter()
        if b.lang == "python":
            try:
                out = run_python(b.code)
            except Exception as exc:  # noqa: BLE001
                failures.append(f"python block at line {b.line} raised {exc!r}")
                continue
        else:
            out = ""
            for line in shell_lines(b):
                if line in NOT_RUN:
                    continue
                code, text = run_cli(steerlab_argv(line))
                out += f"$ {line}\n{text}\n"
                if code != 0 or "Traceback" in text:
                    failures.append(f"`{line}` (line {b.line}) exited {code}:\n{text[-3000:]}")
        log.append(f"--- block at line {b.line} ({time.perf_counter() - t0:.0f} s)\n{out}")
        for pattern in b.expects:
            if not re.search(pattern, out):
                failures.append(f"block at line {b.line}: output does not match {pattern!r}:\n{out[-3000:]}")
        for f in b.files:
            if not (tmp_path / f).is_file() or (tmp_path / f).stat().st_size == 0:
                failures.append(f"block at line {b.line}: {f} was not written")
    (Path(os.environ.get("WORKSHOP_LOG", tmp_path / "handout.log"))).write_text("\n".join(log), encoding="utf-8")
    assert not failures, "\n\n".join(failures)


# ---- the notebook --------------------------------------------------------------------------------
def test_the_notebook_is_stored_without_outputs():
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert len(code) >= 6
    for c in code:
        assert c.get("outputs") == [] and c.get("execution_count") is None, f"outputs in: {''.join(c['source'])[:80]}"


@pytest.mark.model
def test_the_notebook_runs(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # a kernel spec on this very interpreter, first on the kernel search path
    spec = tmp_path / "jupyter" / "kernels" / "steerlab-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "steerlab test", "language": "python"}), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    src = str(ROOT / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="steerlab-test", timeout=600, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = ["".join(o.get("text", "")) for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "\n".join(outputs)
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert re.search(r"steered: .*\b(cat|cats|tabby|kitten|feline|purr\w*|meow|fur)\b", text, re.I), text
    assert re.search(r"kitten'\s+\+[2-9]", text), text  # the glass box: "kitten" reads high
    assert "best:" in text
    assert not any(o.get("output_type") == "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# ---- troubleshooting: each documented message, triggered -----------------------------------------
def documented(title: str) -> list[str]:
    """The ```text block lines of the troubleshooting entry whose heading contains ``title``."""
    text = TROUBLE.read_text(encoding="utf-8")
    section = re.split(r"^## ", text, flags=re.M)
    (entry,) = [s for s in section if title.lower() in s.splitlines()[0].lower()]
    return re.findall(r"```text\n(.*?)\n```", entry, flags=re.S)[0].splitlines()


def matches(doc_line: str, output: str) -> bool:
    """``doc_line`` occurs in ``output``, ``<...>`` standing for anything on one line."""
    pattern = ".+?".join(re.escape(p) for p in re.split(r"<[^<>]*>", doc_line))
    return re.search(pattern, output) is not None


def assert_documented(title: str, output: str) -> None:
    for line in documented(title):
        assert matches(line, output), f"troubleshooting '{title}': {line!r} not in:\n{output}"


def test_port_in_use(tmp_path, tiny_dir):
    """The doc shows 5050, the default; the test holds 5050 (if something else already does, it is in use too)."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 5050))
            s.listen()
        except OSError:
            pass
        r = subprocess.run([sys.executable, "-m", "steerlab.cli", "serve", "--model", str(tiny_dir), "--vectors",
                            str(tmp_path), "--no-build"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PORT": "5050", "HOST": "127.0.0.1"})
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert_documented("port", r.stderr)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_no_gpu(device, tiny_dir):
    import torch

    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"{device} is available here")
    code, out = run_cli(["generate", "hi", "--device", device, "--max-new-tokens", "2"])
    assert code == 1
    lines = [line for line in documented("GPU") if device in line]
    assert lines and all(matches(line, out) for line in lines), out


def test_vectors_of_another_model_and_unknown_names(tiny_dir, tmp_path):
    from conftest import make_tiny

    from steerlab import build_vector
    from steerlab.models import LoadedModel

    model, tok = make_tiny("llama")
    other = LoadedModel(model=model, tokenizer=tok, model_id="HuggingFaceTB/SmolLM2-360M-Instruct")
    vec = build_vector(other, positive=["the cat sat", "a cat purred"], negative=["the dog sat", "a dog barked"],
                       layers=[1], name="mine", progress=False)
    folder = tmp_path / "vectors"
    folder.mkdir()
    vec.save(folder / "mine.safetensors")
    code, out = run_cli(["generate", "hi", "--steer", "mine", "--model", str(tiny_dir), "--vectors", str(folder),
                         "--max-new-tokens", "2"])
    assert code == 1
    assert_documented("another model", out)
    code, out = run_cli(["generate", "hi", "--steer", "tabbycats", "--model", str(tiny_dir), "--vectors", str(folder),
                         "--max-new-tokens", "2"])
    assert code == 1
    assert_documented("unknown vector", out)


def test_slow_start_says_loading(tiny_dir, monkeypatch):
    import time

    import steerlab.models as models

    original = models.load_model

    def slow_load(model_id=None, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        time.sleep(2.5)  # what a cold laptop does: the message comes after 2 s
        return original(str(tiny_dir), device="cpu")

    monkeypatch.setattr(models, "load_model", slow_load)
    code, out = run_cli(["generate", "hi", "--max-new-tokens", "2"])
    assert code == 0, out
    assert_documented("Slow", out)


def test_out_of_memory(tiny_dir, tmp_path, monkeypatch):
    import httpx
    import torch

    from steerlab.models import load_model
    from steerlab.server import ServerSettings, create_app
    from steerlab.server import runner as runner_mod
    from helpers import serve_in_thread
    from steerlab.store import VectorStore

    # loading: the model does not fit on the device
    def no_room(self, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as m:
        m.setattr(torch.nn.Module, "to", no_room)
        code, out = run_cli(["generate", "hi", "--model", str(tiny_dir), "--max-new-tokens", "2"])
    assert code == 1
    lines = documented("memory")
    assert matches(lines[0], out), out
    # generating in the studio: a 503 with the advice
    lm = load_model(str(tiny_dir), device="cpu")

    def boom(*a, **k):  # noqa: ANN002, ANN003, ANN202
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(runner_mod.slices, "run", boom)
    app = create_app(lm, VectorStore(tmp_path / "v", lm), ServerSettings(batch_wait_s=0.01))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/generate", json={"prompt": "x", "max_length": 4})
    assert r.status_code == 503
    assert matches(lines[1], json.dumps(r.json())), r.json()


# ---- slides --------------------------------------------------------------------------------------
def test_every_slide_figure_is_made_by_the_figures_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("workshop_figures", ROOT / "scripts" / "workshop_figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    slides = (WORKSHOP / "slides.md").read_text(encoding="utf-8")
    used = set(re.findall(r"\]\(figures/([\w-]+)\.png\)", slides))
    assert used and used <= set(figures.ALL), used - set(figures.ALL)
    assert slides.startswith("---\nmarp: true")
