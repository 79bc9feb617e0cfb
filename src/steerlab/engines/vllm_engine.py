"""Generate on vLLM with per-request steerlab steering inside vLLM's dynamic batch.

Owns two things: the translation of one row of steerlab steering (vectors, strengths, layers,
positions) into the request payload of the vllm-lens plugin, and :class:`VLLMEngine`, a thin
wrapper over vLLM's offline ``LLM`` with the contract of :func:`steerlab.generate.generate`.
Does not own building vectors (the transformers engine does), nor HTTP serving. ``vllm`` is
imported only when an engine is created; the payload functions need neither vllm nor vllm-lens.

How a steerlab dose maps onto vllm-lens 1.3.0 (read from its ``_worker_ext.py``; pinned by
``tests/test_vllm.py``; details in ``docs/vllm.md``):

* layer: vllm-lens hooks the *output* of decoder module ``model.layers.{i}`` and calls it layer
  ``i``, as steerlab does (steerlab layer ``i`` = Hugging Face ``hidden_states[i + 1]``). So the
  index passes through unchanged; adding 1 (the ``hidden_states`` habit) would be wrong.
* dose: with ``norm_match=False`` vllm-lens adds ``activations[k] * scale``. Each (vector, layer)
  becomes one plugin vector holding the stored direction with ``scale = strength * norm[layer]``
  (or the absolute ``scale``): exactly :meth:`SteeringVector.deltas`. ``norm_match=True`` would
  rescale to every token's own residual norm, a different unit, so it is never used.
* positions ``all``: 2-D activations, which vllm-lens adds at every token of the request, prompt
  and generated. ``generated`` (the last prompt position, then every new token) cannot be
  said with a vllm-lens 1.3.0 vector (see :class:`PositionSpan`), so it (and ``prompt``,
  the prompt's positions only) travels as a
  vllm-lens hook doing steerlab's arithmetic.
* prefix cache: every steered request gets a unique ``cache_salt`` (:func:`steered_cache_salt`),
  or its steered prompt KV blocks would be reused by later plain requests.

(About 480 lines, over the ~400 we aim for: the payload translation and the two engines share
:class:`VLLMModel` and are tested together in an optional environment, ``make test-vllm``, that
this refactor could not run; split it where that environment is at hand.)
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch

from ..errors import ModelLoadError, SteeringError
from ..generate import GenerationOptions, eos_ids
from ..hooks import Positions, RowSteering, as_steer, steering_rows
from ..spec import POSITION_NAMES, Resolved, Steer, resolve
from ..models import resolve_model_source

if TYPE_CHECKING:
    from ..vectors import SteeringVector

__all__ = [
    "AsyncVLLMEngine", "PositionSpan", "VLLMEngine", "VLLMModel", "engine_kwargs", "row_deltas",
    "steered_cache_salt", "steering_extra_args",
    "steering_vectors", "vllm_xargs",
]

INSTALL_HINT = "install the vLLM extra first: `bash scripts/install_vllm.sh`, then use .venv-vllm/bin/python"


# ---- payload translation (no vllm needed) --------------------------------------------------
def _resolved(row: RowSteering, n_layers: int, hidden_size: int) -> list[Resolved]:
    """The row's entries resolved as the transformers engine would, minus what vllm-lens cannot do.

    vllm-lens adds a fixed vector: the governor is off unless an entry asks for it (then refused),
    and operators other than ``add`` are refused, each with a one-line reason. So are conditions it
    cannot honour: one on the text (re-checked at every step) and one on the prompt not yet decided
    (:func:`steerlab.conditional.decide` decides them first; the server does).
    """
    out = []
    for item in row:
        st = item.steer if isinstance(item, Resolved) else as_steer(item)
        _check_vector(st.vector, hidden_size)
        if (why := condition_problem(st)) is not None:
            raise SteeringError(why)
        if isinstance(item, Resolved) and not item.governor:  # resolved by the server already
            res = item
        elif st.governor:
            raise SteeringError("the coherence governor needs the transformers engine (it reads every step's "
                                "logits); send \"governor\": false on the vLLM engine")
        else:
            res = resolve(replace(st, governor=False), n_layers,
                          positions=item.positions if isinstance(item, Resolved) else None)
        if res.operator != "add":
            raise SteeringError(f"operator {res.operator!r} needs each hidden state; vllm-lens only adds a fixed "
                                "vector: use operator 'add' on the vLLM engine, or the transformers engine")
        if res.positions not in POSITION_NAMES:
            raise SteeringError("positions from a given position are not available on the vLLM engine; "
                                "use 'all', 'prompt' or 'generated'")
        out.append(res)
    return out


def condition_problem(st: Steer) -> str | None:
    """Why vLLM cannot apply this entry's condition (None: no condition, or a decided prompt condition)."""
    when = st.when
    if when is None or (when.on == "prompt" and when.value is not None):
        return None
    if when.on == "text":
        return (f"{st.vector.name}: a condition on the text ({when.name}, on=text) re-checks the reply at every "
                "step; vllm-lens only adds a fixed vector: use on=prompt on the vLLM engine, or the transformers "
                "engine")
    return (f"{st.vector.name}: the prompt condition on {when.name} is not decided yet: decide it first "
            "(steerlab.conditional.decide), then send the rows it leaves")


def steering_vectors(row: RowSteering, *, n_layers: int, hidden_size: int) -> list[dict[str, Any]]:
    """One row's steering as vllm-lens ``SteeringVector`` fields, applied at every position.

    One dict per (vector, layer): the stored direction (fp32, CPU) as 2-D ``activations``, the
    layer unchanged, ``scale = strength * norm[layer]`` (or the absolute scale), ``norm_match``
    False. vllm-lens adds ``activations * scale``: bit for bit the transformers engine's add.
    """
    out: list[dict[str, Any]] = []
    for res in _resolved(row, n_layers, hidden_size):
        vec = res.steer.vector
        for layer in res.layers:
            scale = res.scale if res.scale is not None else float(res.strength or 0.0) * vec.norms[layer]
            out.append({"activations": vec.directions[layer].detach().to("cpu", torch.float32)[None],
                        "layer_indices": [layer], "scale": float(scale), "norm_match": False,
                        "position_indices": None})
    return out


def row_deltas(row: RowSteering, *, n_layers: int, hidden_size: int) -> dict[int, torch.Tensor]:
    """Per layer, the sum of one row's deltas (fp32, CPU), as the transformers engine adds them."""
    acc: dict[int, torch.Tensor] = {}
    for res in _resolved(row, n_layers, hidden_size):
        for t in res.terms:
            acc[t.layer] = acc.get(t.layer, torch.zeros(hidden_size)) + t.direction.float()
    return acc


def _check_vector(vec: SteeringVector, hidden_size: int) -> SteeringVector:
    if vec.hidden_size != hidden_size:
        raise SteeringError(f"vector {vec.name} has hidden size {vec.hidden_size}, the model {hidden_size}: "
                            f"it was built for {vec.model_id}")
    return vec


class PositionSpan:
    """A vllm-lens hook function adding ``deltas[layer]`` at absolute positions ``first .. stop-1``.

    steerlab's ``positions="generated"``: ``first`` is the last prompt position (no ``stop``), so
    the prompt is left alone except the position that predicts the first new token, then every
    new token is steered. ``positions="prompt"``: ``first`` 0, ``stop`` the prompt's length.
    vllm-lens 1.3.0 cannot express this with a ``SteeringVector``: its 3-D
    (position-indexed) form takes every forward chunk to start at position 0 (it reads
    ``seq_lens`` from the per-layer metadata *dict*), so decode steps are never steered. This
    hook counts the tokens each layer has seen for its request instead (one instance per
    request; exact under chunked prefill).
    """

    def __init__(self, deltas: dict[int, torch.Tensor], first: int, stop: int | None = None) -> None:
        self.deltas = {int(k): v.detach().to("cpu", torch.float32) for k, v in deltas.items()}
        self.first = int(first)
        self.stop = None if stop is None else int(stop)
        self._seen: dict[int, int] = {}
        self._cast: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"deltas": self.deltas, "first": self.first, "stop": self.stop}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["deltas"], state["first"], state.get("stop"))  # type: ignore[misc]

    def __call__(self, ctx: Any, hidden: torch.Tensor) -> torch.Tensor | None:
        layer = int(ctx.layer_idx)
        start = self._seen.get(layer, 0)
        n = int(hidden.shape[0])
        self._seen[layer] = start + n
        lo = max(self.first - start, 0)
        hi = n if self.stop is None else min(self.stop - start, n)
        if layer not in self.deltas or lo >= hi:
            return None
        key = (layer, hidden.dtype, hidden.device)
        if key not in self._cast:
            self._cast[key] = self.deltas[layer].to(device=hidden.device, dtype=hidden.dtype)
        out = hidden.clone()
        out[lo:hi] += self._cast[key]
        return out


def steering_extra_args(
    row: RowSteering,
    *,
    n_layers: int,
    hidden_size: int,
    positions: Positions = "all",
    prompt_tokens: int | None = None,
) -> dict[str, Any]:
    """One row's steering as vLLM ``SamplingParams.extra_args`` for vllm-lens (``{}``: none).

    ``positions="all"``: ``{"apply_steering_vectors": steering_vectors(...)}``.
    ``positions="generated"`` or ``"prompt"``: ``{"apply_hooks": [...]}`` with a
    :class:`PositionSpan` hook; needs the prompt's token count (``prompt_tokens``).
    """
    if positions not in POSITION_NAMES:
        raise SteeringError(f"positions must be 'all', 'prompt' or 'generated', not {positions!r}")
    if positions == "all":
        svs = steering_vectors(row, n_layers=n_layers, hidden_size=hidden_size)
        return {"apply_steering_vectors": svs} if svs else {}
    if prompt_tokens is None or prompt_tokens < 1:
        raise SteeringError(f"positions={positions!r} on vLLM needs prompt_tokens (the prompt's token count, >= 1)")
    deltas = row_deltas(row, n_layers=n_layers, hidden_size=hidden_size)
    if not deltas:
        return {}
    span = PositionSpan(deltas, 0, prompt_tokens) if positions == "prompt" else PositionSpan(deltas, prompt_tokens - 1)
    return {"apply_hooks": [{"fn": span, "layer_indices": sorted(deltas),
                             "pre": False}]}


def steered_cache_salt() -> str:
    """A fresh ``cache_salt`` for one steered request (send it with every steered request).

    vllm-lens makes a steered request skip *reading* vLLM's prefix cache, but its prompt KV
    blocks, computed with steering, are still *written* there under the plain tokens' hash: a
    later unsteered request with the same prompt prefix would reuse them and come out steered.
    A unique salt gives them a hash nobody else asks for. (Over HTTP: the body's ``cache_salt``.)
    """
    return f"steerlab-{uuid.uuid4().hex}"


def _encode_tensor(t: torch.Tensor) -> dict[str, Any]:
    """vllm-lens's tensor wire form, uncompressed float32 (its decoder accepts both)."""
    arr = t.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4")
    return {"data": base64.b64encode(arr.tobytes()).decode("ascii"), "dtype": "float32",
            "original_dtype": "torch.float32", "shape": list(arr.shape)}


def vllm_xargs(extra_args: dict[str, Any]) -> dict[str, str]:
    """:func:`steering_extra_args` as the ``vllm_xargs`` of an HTTP request to ``vllm serve``.

    vLLM passes only strings and numbers through ``vllm_xargs``, so each list travels as one
    JSON string (vllm-lens decodes it). Vectors need nothing but this module. Hooks
    (``positions="generated"``) travel cloudpickled: the server must have steerlab installed
    and accept pickled code from its clients (vllm-lens does by default; trusted clients only).
    """
    out: dict[str, str] = {}
    if svs := extra_args.get("apply_steering_vectors"):
        encoded = [{**d, "activations": _encode_tensor(d["activations"])} for d in svs]
        out["apply_steering_vectors"] = json.dumps(encoded)
    if hooks := extra_args.get("apply_hooks"):
        import cloudpickle

        out["apply_hooks"] = json.dumps([
            {**h, "fn": {"cloudpickle": base64.b64encode(cloudpickle.dumps(h["fn"])).decode("ascii")}} for h in hooks
        ])
    return out


# ---- the engine ------------------------------------------------------------------------------
def _default_dtype() -> str:
    """steerlab's rule: bfloat16 on CUDA, float32 on CPU (so both engines run the same dtype)."""
    return "bfloat16" if torch.cuda.is_available() else "float32"


def engine_kwargs(
    source: str,
    *,
    dtype: str = "auto",
    max_model_len: int = 2048,
    seed: int = 0,
    kv_cache_gib: int | None = None,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    gpu_memory_utilization: float | None = None,
    engine_args: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """vLLM engine arguments (``LLM(**kw)`` / ``AsyncEngineArgs(**kw)``) with steerlab's defaults.

    Sets ``VLLM_CPU_KVCACHE_SPACE`` for the CPU build (1 GiB unless set or ``kv_cache_gib``).
    """
    if kv_cache_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(kv_cache_gib))  # vLLM reads whole GiB
    else:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    kwargs: dict[str, Any] = dict(
        model=source, tokenizer=source, dtype=_default_dtype() if dtype == "auto" else dtype,
        max_model_len=max_model_len, seed=seed, tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
    )
    if gpu_memory_utilization is not None:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    kwargs.update(engine_args or {})
    return kwargs


class VLLMModel:
    """What both vLLM engines share: the model's facts, prompt encoding and request building.

    Reads the config and tokenizer only (fast); the subclasses start vLLM itself.
    """

    def __init__(self, model: str | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.source, self.model_id = resolve_model_source(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.source)
            config = AutoConfig.from_pretrained(self.source)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot read model {self.model_id!r} from {self.source}: {exc}") from None
        text_config = getattr(config, "text_config", None) or config
        self.n_layers = int(text_config.num_hidden_layers)
        self.hidden_size = int(text_config.hidden_size)
        self.eos_ids = eos_ids(self.tokenizer)
        self.dtype = "auto"

    def _engine_kwargs(self, **kwargs: Any) -> dict[str, Any]:
        """:func:`engine_kwargs` for this model; records the dtype vLLM will run in."""
        kw = engine_kwargs(self.source, **kwargs)
        self.dtype = kw["dtype"]
        return kw

    # ---- prompts ---------------------------------------------------------------------------
    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str, *, chat: bool | None = None) -> list[int]:
        """Token ids exactly as :func:`steerlab.generate.encode_prompts` makes them (no padding)."""
        use_chat = self.has_chat_template if chat is None else chat
        if use_chat:
            if not self.has_chat_template:
                raise ModelLoadError(f"{self.model_id} has no chat template; use raw completion (chat=False)")
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        else:
            text = prompt
        return list(self.tokenizer(text, add_special_tokens=not use_chat)["input_ids"])

    # ---- requests --------------------------------------------------------------------------
    def extra_args(self, row: RowSteering, *, positions: Positions = "all", prompt_tokens: int | None = None
                   ) -> dict[str, Any]:
        """:func:`steering_extra_args` for this model."""
        return steering_extra_args(row, n_layers=self.n_layers, hidden_size=self.hidden_size,
                                   positions=positions, prompt_tokens=prompt_tokens)

    def sampling_params(self, options: GenerationOptions, extra_args: dict[str, Any] | None = None,
                        **more: Any) -> Any:
        """vLLM ``SamplingParams`` matching steerlab's generation options (greedy at temperature 0)."""
        from vllm import SamplingParams

        if options.norm_preserve:
            raise SteeringError("norm_preserve is not available on the vLLM engine; use the transformers engine")
        sample = options.temperature > 0
        return SamplingParams(
            max_tokens=options.max_new_tokens,
            temperature=options.temperature if sample else 0.0,
            top_p=options.top_p if sample else 1.0,
            seed=options.seed,
            repetition_penalty=options.repetition_penalty,
            stop_token_ids=self.eos_ids,
            skip_special_tokens=True,
            extra_args=dict(extra_args) if extra_args else None,
            **more,
        )

    def request(self, prompt: str, row: RowSteering, options: GenerationOptions, **more: Any
                ) -> tuple[dict[str, Any], Any]:
        """(vLLM prompt, SamplingParams) for one prompt with one row of steering."""
        ids = self.encode(prompt, chat=options.chat)
        positions = cast("Positions", options.positions)  # checked per entry by _resolved()
        extra = self.extra_args(row, positions=positions, prompt_tokens=len(ids))
        vllm_prompt: dict[str, Any] = {"prompt_token_ids": ids}
        if extra:  # keep its steered KV blocks out of everyone else's prefix cache
            vllm_prompt["cache_salt"] = steered_cache_salt()
        return vllm_prompt, self.sampling_params(options, extra, **more)

    def requests(
        self, prompts: Sequence[str], steering: Sequence[RowSteering] | RowSteering | None, options: GenerationOptions
    ) -> tuple[list[dict[str, Any]], list[Any]]:
        """(vLLM prompts, SamplingParams) for a batch; one steering row per prompt, or one shared."""
        rows = steering_rows(steering, len(prompts))
        if len(rows) == 1 and len(prompts) != 1:
            rows = rows * len(prompts)
        pairs = [self.request(prompt, row, options) for prompt, row in zip(prompts, rows)]
        return [p for p, _ in pairs], [sp for _, sp in pairs]

    def decode(self, ids: Sequence[int]) -> str:
        """Text as steerlab's engine returns it (special tokens skipped, stripped)."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)).strip()


class VLLMEngine(VLLMModel):
    """vLLM's offline ``LLM`` on one model, generating with per-row steerlab steering.

    ``model``: None for the embedded SmolLM2 (its converted safetensors folder), else a local
    folder or a Hugging Face id. Keyword arguments as :func:`engine_kwargs`: ``dtype``,
    ``max_model_len``, ``seed``, ``kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE`` for the CPU build,
    default 1 GiB; ignored on GPUs, use ``gpu_memory_utilization``), ``tensor_parallel_size``,
    ``pipeline_parallel_size``, and ``engine_args`` for ``vllm.LLM`` unchanged (e.g.
    ``{"enable_prefix_caching": False}``). vLLM starts its engine in a child process: scripts using this need an
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        try:
            from vllm import LLM
        except ImportError:
            raise ModelLoadError(f"vLLM is not installed in this environment: {INSTALL_HINT}") from None
        super().__init__(model)
        self.llm = LLM(**self._engine_kwargs(**kwargs))

    def generate(
        self,
        prompts: str | Sequence[str],
        steering: Sequence[RowSteering] | RowSteering | None = None,
        *,
        options: GenerationOptions | None = None,
    ) -> list[str]:
        """One completion per prompt, all prompts submitted together to vLLM's scheduler.

        ``steering`` as for :func:`steerlab.generate.generate`: None, one list for every row,
        or one list per row (an empty list leaves that row unsteered).
        """
        return [self.decode(ids) for ids in self.generate_ids(prompts, steering, options=options)]

    def generate_ids(
        self,
        prompts: str | Sequence[str],
        steering: Sequence[RowSteering] | RowSteering | None = None,
        *,
        options: GenerationOptions | None = None,
    ) -> list[list[int]]:
        """Like :meth:`generate`, returning the generated token ids (stop token dropped)."""
        opts = options or GenerationOptions()
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            return []
        vllm_prompts, params = self.requests(prompts, steering, opts)
        outs = self.llm.generate(vllm_prompts, params, use_tqdm=False)
        eos = set(self.eos_ids)
        return [[t for t in out.outputs[0].token_ids if t not in eos] for out in outs]

    def close(self) -> None:
        """Stop vLLM's engine process (also happens when the object is garbage-collected)."""
        llm = getattr(self, "llm", None)
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncVLLMEngine(VLLMModel):
    """vLLM's ``AsyncLLM`` on one model: one streaming vLLM request per row, for servers.

    What ``steerlab serve --engine vllm`` runs on (:mod:`steerlab.server.vllm_runner`). vLLM's
    scheduler batches the requests of all clients continuously, steered rows beside plain ones.
    Keyword arguments as :class:`VLLMEngine`. Create it inside the event loop that will use it.
    """

    def __init__(self, model: str | None = None, *, log_stats: bool = False, **kwargs: Any) -> None:
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.platforms import current_platform
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError:
            raise ModelLoadError(f"vLLM is not installed in this environment: {INSTALL_HINT}") from None
        super().__init__(model)
        self.device = str(current_platform.device_type)
        kw = self._engine_kwargs(**kwargs)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kw, disable_log_stats=not log_stats))

    def prepare(self, prompt: str, row: RowSteering, options: GenerationOptions) -> tuple[dict[str, Any], Any]:
        """One row as a streaming vLLM request; raises SteeringError on bad steering (before anything runs)."""
        from vllm.sampling_params import RequestOutputKind

        return self.request(prompt, row, options, output_kind=RequestOutputKind.DELTA)

    async def stream(self, prepared: tuple[dict[str, Any], Any], request_id: str
                     ) -> AsyncIterator[tuple[list[int], str | None]]:
        """(new token ids, finish reason or None) as vLLM produces them, stop tokens dropped.

        ``prepared`` comes from :meth:`prepare`. Closing or cancelling the consumer aborts the
        vLLM request (vLLM does it).
        """
        vllm_prompt, params = prepared
        eos = set(self.eos_ids)
        async for out in self.engine.generate(vllm_prompt, params, request_id):
            c = out.outputs[0]
            yield [t for t in c.token_ids if t not in eos], c.finish_reason

    def close(self) -> None:
        """Stop vLLM's engine process (call from another thread than the event loop's)."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is None:
            return
        handler = getattr(engine, "output_handler", None)
        if handler is not None and not handler.done():
            # Stop vLLM's output loop before its engine process, or it logs the engine's exit as an error.
            handler.get_loop().call_soon_threadsafe(handler.cancel)
            deadline = time.monotonic() + 2
            while not handler.done() and time.monotonic() < deadline:
                time.sleep(0.01)
        engine.shutdown()
