"""Compiled decoding (``--compile``): the decode step as one ``torch.compile`` graph, steering as data in it.

Near idle a float32 decode step of SmolLM2-135M on 2 cores spends about a third of its time outside
the weight products: ~4,000 small operations per token (norms, rotary, attention, the cache, the
linear layers' wrappers) and the Python around them (docs/performance.md, "Compiled decoding").
Inductor fuses those into a few C++ loops; with transformers' static KV cache the step has fixed
shapes, so ``model.generate`` compiles it once and replays it (its ``compile_config`` path).

A compiled graph does not see forward hooks added after it was traced (dynamo skips hook guards),
so steering cannot be a hook registered per generation there. Instead :func:`enable` registers, once,
a hook on every decoder block that adds ``slots.adds[block] * slots.gain``; :func:`steerlab.hooks.steer`
writes a generation's plain adds and the governor's gain tensor into the :class:`DecodeSlots` (zeros
and ones outside it). The graph reads those tensors afresh at every step, so changing vectors
changes its output without recompiling. Anything else that needs a hook (other operators, positions,
conditions on the text, live readings) registers hooks as before, and :func:`generate_settings` then
decodes eagerly for that call: the compiled graph runs only when the slot hooks are the model's only
hooks. A new batch size or cache length compiles again (once each).

Owns the compile settings and the slots; not the hooks' arithmetic (:mod:`steerlab.hooks`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .models import LoadedModel

ENV = "STEERLAB_COMPILE"
# The static cache's length is rounded up to a multiple of this, so most calls reuse one graph; attention reads
# the whole cache at every step (2 threads near idle: 35.8 tokens/s with 128 positions, 31.5 with 256).
CACHE_STEP = 128


@dataclass
class DecodeSlots:
    """The steering a compiled decode step adds, as tensors it reads at every call.

    ``adds[i]``: ``[rows or 1, 1, hidden]`` added to block ``i``'s output; ``gain``: ``[rows or 1, 1, 1]``
    multiplied into it (the governor's). Zeros and ones when nothing steers.
    """

    adds: list[torch.Tensor]
    gain: torch.Tensor
    compile_config: Any = None  # transformers' CompileConfig, one per model so its compiled call is kept
    handles: list[Any] = field(default_factory=list)

    def reset(self) -> None:
        self.adds = [torch.zeros_like(a[:1]) for a in self.adds]
        self.gain = torch.ones_like(self.gain[:1])

    @contextmanager
    def holding(self, adds: dict[int, torch.Tensor], gain: torch.Tensor | None, rows: int) -> Iterator[None]:
        """Inside: block ``i`` adds ``adds[i]`` (times ``gain``); the rest add zeros."""
        zero = self.adds[0]
        self.adds = [adds[i] if i in adds else zero.new_zeros(rows, 1, zero.shape[-1]) for i in range(len(self.adds))]
        self.gain = gain if gain is not None else self.gain.new_ones(rows, 1, 1)
        try:
            yield
        finally:
            self.reset()


def wanted(flag: bool | None) -> bool:
    """``flag`` if given, else ``STEERLAB_COMPILE`` (1/on/true)."""
    if flag is not None:
        return flag
    return os.environ.get(ENV, "").strip().lower() in ("1", "on", "true", "yes")


def enable(lm: LoadedModel) -> DecodeSlots:
    """Register the slot hooks on ``lm``'s blocks (once) and return its slots."""
    from transformers import CompileConfig

    from .hooks import slot_hooks

    if lm.slots is not None:
        return lm.slots
    slots = DecodeSlots(adds=[torch.zeros(1, 1, lm.hidden_size, device=lm.device, dtype=lm.dtype)] * lm.n_layers,
                        gain=torch.ones(1, 1, 1, device=lm.device, dtype=lm.dtype))
    config = CompileConfig(fullgraph=False, mode="default")  # "reduce-overhead" means CUDA graphs
    config._compile_all_devices = True  # type: ignore[assignment]  # transformers compiles only on GPUs unless told
    slots.compile_config = config
    slots.handles = slot_hooks(lm, slots)
    object.__setattr__(lm, "slots", slots)
    return slots


def _only_slot_hooks(lm: LoadedModel) -> bool:
    slot_ids = {h.id for h in lm.slots.handles} if lm.slots is not None else set()
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    for m in lm.model.modules():
        if m._forward_pre_hooks or any(k not in slot_ids for k in m._forward_hooks):
            return False
    return True


def generate_settings(lm: LoadedModel, kwargs: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    """``model.generate`` settings for compiled decoding where it applies, else for eager decoding.

    Compiled: the slots are enabled, no other hook is registered, one sequence per prompt, and the
    call neither passes a cache in nor returns one (the server's resumable slices decode eagerly).
    """
    if lm.slots is None:
        return {}
    if (not _only_slot_hooks(lm) or kwargs.get("num_beams", 1) != 1 or kwargs.get("num_return_sequences", 1) != 1
            or any(k in kwargs for k in ("cache", "past_key_values", "return_dict_in_generate"))):
        return {"disable_compile": True}  # a cache passed in or kept to resume from stays the dynamic one
    need = prompt_len + int(kwargs.get("max_new_tokens") or 64)
    return {"cache_implementation": "static", "compile_config": lm.slots.compile_config,
            "max_cache_len": -(-need // CACHE_STEP) * CACHE_STEP}
