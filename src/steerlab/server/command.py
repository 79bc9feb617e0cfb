"""The ``steerlab serve`` and ``steerlab examples`` commands (registered at the bottom of cli.py).

Owns command-line options and environment variables of the server (HOST, PORT, STRENGTH, as in
the seed), start-up (load the model, open the vectors folder, build missing built-in persona
vectors) and handing the app to uvicorn. Heavy imports happen inside the commands.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import ipaddress
import sys
from pathlib import Path

import click

from ..errors import SteeringError
from ..options import load_lm, model_options, open_store, quantize_option, vectors_option
from .limits import MAX_PROMPT_TOKENS, STRENGTH_LIMIT

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ..models import LoadedModel
    from ..models import ModelInfo
    from .vllm_runner import DeferredModel
    from .vllm_runner import VLLMRunner


def _finite(value: float | None, param: click.Parameter) -> float | None:
    """FloatRange lets NaN through (every comparison with NaN is false)."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number: give a strength between {-STRENGTH_LIMIT:g} and "
                                 f"{STRENGTH_LIMIT:g} (or leave STRENGTH unset)", param=param)
    return value


def _key_values(pairs: tuple[str, ...]) -> dict:
    """``KEY=VALUE`` options as a dict, VALUE as JSON when it parses (true, 0.5, [1,2]) else text."""
    import json

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise click.BadParameter(f"{pair!r}: use KEY=VALUE, e.g. enforce_eager=true", param_hint="--vllm-arg")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _vllm_side(model_id: str | None, device: str, dtype: str, max_queue: int,
               engine_args: dict) -> tuple[DeferredModel, VLLMRunner]:
    """(transformers side, runner) for --engine vllm; vLLM itself starts with the app."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise click.ClickException(
            "--engine vllm needs vLLM, which this environment lacks: run `make vllm-install` (CPU; see docs/vllm.md "
            "for GPUs), then `.venv-vllm/bin/steerlab serve --engine vllm` (or `make run-vllm`)")
    from ..engines.vllm_engine import AsyncVLLMEngine, VLLMModel
    from ..models import load_model
    from .vllm_runner import DeferredModel, VLLMRunner

    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs

    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(engine_args.get("engine_args") or {}) - known)
    if unknown:
        raise click.BadParameter(f"not vLLM engine arguments: {', '.join(unknown)} (see `python -m "
                                 "vllm.entrypoints.openai.api_server --help`, dashes as underscores)",
                                 param_hint="--vllm-arg")
    facts = VLLMModel(model_id)
    # vLLM holds the accelerator's memory: the transformers copy (builds only) stays on the CPU unless told.
    build_device = "cpu" if device == "auto" else device
    lm = DeferredModel(facts, lambda: load_model(model_id, device=build_device, dtype=dtype))
    runner = VLLMRunner(lambda: AsyncVLLMEngine(model_id, dtype=dtype, **engine_args), max_queue=max_queue)
    return lm, runner


def check_port_free(host: str, port: int) -> None:
    """Fail fast (before loading the model) with one line when ``host:port`` is taken."""
    import errno
    import socket

    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                why = "is in use" if exc.errno == errno.EADDRINUSE else "needs privileges"
                raise click.ClickException(
                    f"port {port} on {host} {why}: choose another with --port N or PORT=N "
                    f"(e.g. PORT={port + 1 if port < 65535 else 5050} steerlab serve; --port 0 picks a free one)"
                ) from None
            raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command()
@click.option("--host", envvar="HOST", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback exposes the model to your network: set STEERLAB_API_KEY "
                   "(building vectors is refused there without it). Env: HOST.")
@click.option("--port", envvar="PORT", default=5050, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any free port). Env: PORT.")
@click.option("--strength", envvar="STRENGTH", default=None,
              type=click.FloatRange(-STRENGTH_LIMIT, STRENGTH_LIMIT), callback=lambda c, p, v: _finite(v, p),
              help="Replace every vector's default strength (residual-norm units; a request's own strength "
                   "still wins). Env: STRENGTH.")
@click.option("--no-build", is_flag=True, help="Do not build missing built-in persona vectors at start.")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(1, 10_000),
              help="Requests that may wait; past it the server answers 503 with Retry-After.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Rows (prompts) generated together in one batch.")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Per-request time limit in seconds, waiting included (504 past it; checked at every decode step).")
@click.option("--max-prompt-tokens", default=MAX_PROMPT_TOKENS, show_default=True, type=click.IntRange(16, 1_000_000),
              help="Longest prompt in tokens (after the chat template); the model's context bounds prompt + "
                   "new tokens too. Longer prompts get 400.")
@click.option("--limit-concurrency", default=256, show_default=True, type=click.IntRange(1, 100_000),
              help="Connections/requests in progress before uvicorn answers 503; silent new connections are "
                   "closed after 10 s and connections past 4x this (or the open-file limit) at once.")
@click.option("--timeout-keep-alive", default=5.0, show_default=True, type=click.FloatRange(0.1, 600),
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name besides localhost/127.0.0.1/[::1] that may build or cancel builds on a loopback "
                   "bind (e.g. behind a proxy); repeatable. Other names get 403 (DNS rebinding).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="CPU threads for torch (default: the cores free at start, from the load average; "
                   "env STEERLAB_THREADS).")
@click.option("--api-key-all", is_flag=True, envvar="STEERLAB_API_KEY_ALL",
              help="Require the API key (env STEERLAB_API_KEY) on every endpoint but / and /health, not only on "
                   "building vectors. Env: STEERLAB_API_KEY_ALL=1.")
@click.option("--engine", type=click.Choice(["transformers", "vllm"]), default="transformers", show_default=True,
              envvar="STEERLAB_ENGINE",
              help="What generates: steerlab's own transformers engine, or vLLM (continuous batching, GPUs, "
                   "tensor/pipeline parallel; `make vllm-install`). Vectors are built with transformers either way. "
                   "Env: STEERLAB_ENGINE.")
@click.option("--tensor-parallel-size", "tp", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="vLLM only: GPUs to split each layer over.")
@click.option("--pipeline-parallel-size", "pp", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="vLLM only: GPUs (or nodes, with Ray) to split the layers over.")
@click.option("--gpu-memory-utilization", "gpu_mem", default=None, type=click.FloatRange(0.05, 1.0),
              help="vLLM only: share of each GPU's memory vLLM may take (vLLM's default 0.9).")
@click.option("--max-model-len", default=2048, show_default=True, type=click.IntRange(64, 1_000_000),
              help="vLLM only: longest prompt + reply in tokens.")
@click.option("--kv-cache-gib", default=None, type=click.IntRange(1, 4096),
              help="vLLM on CPU only: KV cache size in GiB (default 1; env VLLM_CPU_KVCACHE_SPACE).")
@click.option("--vllm-arg", "vllm_args", multiple=True, metavar="KEY=VALUE",
              help="vLLM only: any other vLLM engine argument (a field of vLLM's EngineArgs), repeatable, e.g. "
                   "distributed_executor_backend=ray or enable_prefix_caching=false; VALUE is read as JSON "
                   "when it parses, else as text.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
@vectors_option
@quantize_option
@model_options
# About 90 lines: its signature is its 27 options; the body is start-up in order (checks, settings, load).
def serve(host: str, port: int, strength: float | None, no_build: bool, max_queue: int, max_batch: int,
          timeout_s: float, max_prompt_tokens: int, limit_concurrency: int, timeout_keep_alive: float,
          allowed_hosts: tuple[str, ...], threads: int | None, api_key_all: bool, engine: str, tp: int, pp: int,
          gpu_mem: float | None, max_model_len: int, kv_cache_gib: int | None, vllm_args: tuple[str, ...],
          log_level: str, model_id: str | None, device: str, dtype: str, quantize: str,
          vectors_dir: Path | None) -> None:
    """Run the web studio and HTTP API (OpenAPI docs at /docs).

    Opens http://HOST:PORT (default http://127.0.0.1:5050) at once: while the model loads and
    any missing built-in persona vector is built (a few seconds each on CPU), the page and
    /health say "warming up" and other requests get 503 with Retry-After.
    """
    import os

    import uvicorn

    from ..phases import say
    from .resolve import ServerSettings
    from .warmup import WarmingUp
    from .serving import make_server

    api_key = os.environ.get("STEERLAB_API_KEY") or None  # env only: a --api-key would show in `ps`
    if api_key_all and not api_key:
        raise click.ClickException("--api-key-all / STEERLAB_API_KEY_ALL needs a key: set STEERLAB_API_KEY=<secret>")
    if engine == "vllm" and quantize != "none":
        raise click.ClickException("--quantize is for the transformers engine on CPU; vLLM has its own quantisation "
                                   "(--vllm-arg quantization=...)")
    check_port_free(host, port)
    from .. import threads as cpu_threads

    try:
        n_threads, why = cpu_threads.apply(threads)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"torch threads: {n_threads} ({why})")
    public = not _is_loopback(host)
    if public and not api_key:
        click.echo(f"warning: listening on {host} without STEERLAB_API_KEY: anyone who can reach this machine can "
                   "generate; building vectors is refused until a key is set", err=True)
    elif api_key:
        click.echo("API key required " + ("on every endpoint but / and /health" if api_key_all
                                          else "for building vectors (STEERLAB_API_KEY_ALL=1: everywhere)"))
    settings = ServerSettings(strength=strength, max_queue=max_queue, max_batch_rows=max_batch,
                              request_timeout_s=timeout_s, max_prompt_tokens=max_prompt_tokens, api_key=api_key,
                              api_key_all=api_key_all, public=public, allowed_hosts=tuple(allowed_hosts))
    vllm_options = dict(tensor_parallel_size=tp, pipeline_parallel_size=pp, gpu_memory_utilization=gpu_mem,
                        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib,
                        engine_args=_key_values(vllm_args)) if engine == "vllm" else None

    def load(note: Callable[[str], None]) -> FastAPI:  # runs in a thread while the port already answers
        from .app import create_app

        runner = None
        lm: ModelInfo
        if vllm_options is not None:
            note("checking vLLM and the model...")
            lm, runner = _vllm_side(model_id, device, dtype, max_queue, vllm_options)
            store = open_store(lm, vectors_dir)
            say(f"model: {lm.model_id} on vLLM ({lm.n_layers} layers; vLLM starts next, minutes on a CPU); "
                f"vectors: {store.folder}")
        else:
            note(f"loading {model_id or 'the embedded model (SmolLM2-135M-Instruct)'}...")
            loaded = _load(model_id, device, dtype, quantize, note)
            store = open_store(loaded, vectors_dir)
            say(f"model: {loaded.model_id} on {loaded.device} ({loaded.n_layers} layers); vectors: {store.folder}")
            lm = loaded
        if not no_build:
            built = store.ensure_builtins(progress=True, notify=note)
            if built:
                say(f"built missing persona vectors: {', '.join(built)}")
        if strength is not None:
            say(f"STRENGTH {strength:g} replaces every vector's default strength")
        app = create_app(lm, store, settings, runner=runner)
        say("ready")
        return app

    server: uvicorn.Server | None = None

    def failed(exc: BaseException) -> None:
        say(f"error: {exc}" if isinstance(exc, (SteeringError, click.ClickException)) else
            f"error: start-up failed: {type(exc).__name__}: {exc} (steerlab --debug serve shows the traceback)")
        if server is not None:
            server.should_exit = True

    warming = WarmingUp(load, on_failure=failed, echo=say)
    server = make_server(warming, host=host, port=port, log_level=log_level, limit_concurrency=limit_concurrency,
                         timeout_keep_alive=timeout_keep_alive)
    server.on_exit = lambda: warming.shutdown_runner()  # SIGTERM: answer in-flight requests with 503 first
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"steerlab studio: http://{shown}:{port}  (warming up: the page shows progress; API docs: /docs; "
               "stop with Ctrl-C)")
    server.run()
    if warming.error is not None:
        if click.get_current_context().meta.get("steerlab.debug"):
            raise warming.error
        sys.exit(1)


def _load(model_id: str | None, device: str, dtype: str, quantize: str, note: Callable[[str], None]) -> LoadedModel:
    from ..models import load_model

    return load_model(model_id, device=device, dtype=dtype, quantize=quantize, notify=note)


@click.command()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write (default: the package's data/precomputed.json, served by the studio).")
@click.option("--persona", "personas", multiple=True, metavar="NAME[:STRENGTH]",
              help="Vector to include, optionally at its own strength (repeatable; default: every built-in "
                   "persona at --strength or its default).")
@click.option("--prompts", "n_prompts", default=4, show_default=True, type=click.IntRange(1, 11),
              help="How many of the studio's example prompts to use.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(1, 256))
@click.option("--strength", default=None, type=click.FloatRange(-STRENGTH_LIMIT, STRENGTH_LIMIT),
              help="Strength for every persona (default: each vector's own).")
@vectors_option
@model_options
def examples(out_path: Path | None, personas: tuple[str, ...], n_prompts: int, max_new_tokens: int,
             strength: float | None, model_id: str | None, device: str, dtype: str, vectors_dir: Path | None) -> None:
    """Regenerate the pre-computed base vs steered examples the studio shows without a model.

    Greedy decoding; each example runs in its mode (chat or raw); all rows of a mode (each prompt's
    base, each persona's steered text) in one batch.
    """
    from ..personas import builtin_names
    from .precompute import default_output, example_prompts, precompute, write_json

    chosen: dict[str, float | None] = {}
    for spec in personas or builtin_names():
        name, _, dose = spec.partition(":")
        try:
            chosen[name] = float(dose) if dose else strength
        except ValueError:
            raise click.BadParameter(f"{spec!r}: use NAME or NAME:STRENGTH", param_hint="--persona") from None
    lm = load_lm(model_id, device, dtype)
    store = open_store(lm, vectors_dir)
    data = precompute(lm, store, chosen, example_prompts(n_prompts), max_new_tokens=max_new_tokens)
    path = write_json(data, out_path or default_output())
    names = list(chosen)
    click.echo(f"wrote {path}: {len(names)} personas x {n_prompts} prompts ({lm.model_id}, greedy)")
