"""The ``steerlab serve`` and ``steerlab examples`` commands (registered at the bottom of cli.py).

Owns command-line options and environment variables of the server (HOST, PORT, STRENGTH, as in
the seed), start-up (load the model, open the vectors folder, build missing built-in persona
vectors) and handing the app to uvicorn. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import click

from ..options import model_options, vectors_option
from .limits import STRENGTH_LIMIT


def _open(model_id: str | None, device: str, dtype: str, vectors_dir: Path | None):  # noqa: ANN202
    from ..models import load_model
    from ..paths import default_vectors_dir
    from ..store import VectorStore

    lm = load_model(model_id, device=device, dtype=dtype)
    store = VectorStore(vectors_dir or default_vectors_dir(), lm, warn=lambda m: click.echo(f"note: {m}", err=True))
    return lm, store


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
              type=click.FloatRange(-STRENGTH_LIMIT, STRENGTH_LIMIT),
              help="Replace every vector's default strength (residual-norm units; a request's own strength "
                   "still wins). Env: STRENGTH.")
@click.option("--no-build", is_flag=True, help="Do not build missing built-in persona vectors at start.")
@click.option("--max-queue", default=32, show_default=True, type=click.IntRange(1, 10_000),
              help="Requests that may wait; past it the server answers 503 with Retry-After.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1, 256),
              help="Rows (prompts) generated together in one batch.")
@click.option("--timeout", "timeout_s", default=120.0, show_default=True, type=click.FloatRange(1, 3600),
              help="Per-request time limit in seconds, waiting included (504 past it).")
@click.option("--threads", default=None, type=click.IntRange(1, 1024),
              help="CPU threads for torch (default: torch's choice; 1 helps on a machine shared with other jobs).")
@click.option("--api-key-all", is_flag=True, envvar="STEERLAB_API_KEY_ALL",
              help="Require the API key (env STEERLAB_API_KEY) on every endpoint but / and /health, not only on "
                   "building vectors. Env: STEERLAB_API_KEY_ALL=1.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="uvicorn log level.")
@vectors_option
@model_options
def serve(host, port, strength, no_build, max_queue, max_batch, timeout_s, threads, api_key_all, log_level, model_id,
          device, dtype, vectors_dir) -> None:  # noqa: ANN001
    """Run the web studio and HTTP API (OpenAPI docs at /docs).

    Loads the model, builds any missing built-in persona vector (a few seconds each on CPU),
    then serves http://HOST:PORT (default http://127.0.0.1:5050).
    """
    import uvicorn

    from .app import create_app
    from .resolve import ServerSettings

    import os

    api_key = os.environ.get("STEERLAB_API_KEY") or None  # env only: a --api-key would show in `ps`
    if api_key_all and not api_key:
        raise click.ClickException("--api-key-all / STEERLAB_API_KEY_ALL needs a key: set STEERLAB_API_KEY=<secret>")
    check_port_free(host, port)
    if threads:
        import torch

        torch.set_num_threads(threads)
    lm, store = _open(model_id, device, dtype, vectors_dir)
    click.echo(f"model: {lm.model_id} on {lm.device} ({lm.n_layers} layers); vectors: {store.folder}")
    if not no_build:
        built = store.ensure_builtins(progress=False)
        if built:
            click.echo(f"built missing persona vectors: {', '.join(built)}")
    if strength is not None:
        click.echo(f"STRENGTH {strength:g} replaces every vector's default strength")
    public = not _is_loopback(host)
    if public and not api_key:
        click.echo(f"warning: listening on {host} without STEERLAB_API_KEY: anyone who can reach this machine can "
                   "generate; building vectors is refused until a key is set", err=True)
    elif api_key:
        click.echo("API key required " + ("on every endpoint but / and /health" if api_key_all
                                          else "for building vectors (STEERLAB_API_KEY_ALL=1: everywhere)"))
    settings = ServerSettings(strength=strength, max_queue=max_queue, max_batch_rows=max_batch,
                              request_timeout_s=timeout_s, api_key=api_key, api_key_all=api_key_all, public=public)
    app = create_app(lm, store, settings)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"steerlab studio: http://{shown}:{port}  (API docs: /docs; stop with Ctrl-C)")
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


@click.command()
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write (default: the package's data/precomputed.json, served by the studio).")
@click.option("--persona", "personas", multiple=True, metavar="NAME[:STRENGTH]",
              help="Vector to include, optionally at its own strength (repeatable; default: every built-in "
                   "persona at --strength or its default).")
@click.option("--prompts", "n_prompts", default=3, show_default=True, type=click.IntRange(1, 10),
              help="How many of the studio's example prompts to use.")
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(1, 256))
@click.option("--strength", default=None, type=click.FloatRange(-STRENGTH_LIMIT, STRENGTH_LIMIT),
              help="Strength for every persona (default: each vector's own).")
@vectors_option
@model_options
def examples(out_path, personas, n_prompts, max_new_tokens, strength, model_id, device, dtype,
             vectors_dir) -> None:  # noqa: ANN001
    """Regenerate the pre-computed base vs steered examples the studio shows without a model.

    Greedy decoding; all rows (each prompt's base, each persona's steered text) in one batch.
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
    lm, store = _open(model_id, device, dtype, vectors_dir)
    data = precompute(lm, store, chosen, example_prompts(n_prompts), max_new_tokens=max_new_tokens)
    path = write_json(data, out_path or default_output())
    names = list(chosen)
    click.echo(f"wrote {path}: {len(names)} personas x {n_prompts} prompts ({lm.model_id}, greedy)")
