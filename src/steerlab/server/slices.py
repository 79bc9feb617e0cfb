"""Generation in slices: a batch can stop after any decode step and resume later from its KV cache.

The runner uses this so a long batch yields the model to short requests that are waiting and
then continues where it stopped, with the same tokens it would have produced in one go (the
resumed call recomputes nothing: its first step is the one the stopped call did not take).
A long prompt is prefilled in chunks of ``PREFILL_CHUNK`` tokens, so even a maximal prompt can
yield between chunks (one forward pass over 2,000 tokens takes seconds on a CPU). Steering over
the chunks follows ``positions``: every position for ``all``; none for ``generated`` (the last
chunk goes through ``generate``, whose hook steers the position that predicts the first token).
The generation settings are :func:`steerlab.generate.generate`'s (``generation_kwargs``, the resolved
steering entries with their operators, the coherence governor); this module only adds the cache
hand-over. A resumed slice starts a fresh governor (gain 1) for its rows.
Knows nothing about jobs or HTTP.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..generate import GenerationOptions, encode_prompts, generation_kwargs, run_generate, steering_session
from ..hooks import steer
from ..spec import resolve_rows

if TYPE_CHECKING:
    from transformers.generation.streamers import BaseStreamer
    from ..models import LoadedModel


@dataclass(frozen=True)
class SliceState:
    """A batch between slices: every token so far, its mask, the cache, how many new tokens were made."""

    ids: torch.Tensor
    mask: torch.Tensor
    cache: Any | None
    generated: int
    prefilled: int = 0  # prompt positions already in the cache (chunked prefill)


class _Stop(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def begin(lm: LoadedModel, prompts: list[str], opts: GenerationOptions) -> SliceState:
    """Encode the batch (left-padded, as generate() does); seed the sampler once, here."""
    enc = encode_prompts(lm, prompts, opts.chat)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    return SliceState(ids=enc["input_ids"], mask=enc["attention_mask"], cache=None, generated=0)


PREFILL_CHUNK = 256  # prompt tokens per prefill forward pass; the last chunk (<= this) goes through generate


@torch.no_grad()
def prefill(lm: LoadedModel, state: SliceState, steering: list[list], opts: GenerationOptions, *,
            keep_going: Callable[[], bool], chunk: int | None = None) -> SliceState:
    """Put all but the last ``chunk`` prompt tokens into the cache, a chunk at a time, while ``keep_going()``."""
    chunk = chunk or PREFILL_CHUNK
    total = state.ids.shape[1]
    if state.generated or total - state.prefilled <= chunk:
        return state
    positions = (state.mask.long().cumsum(-1) - 1).clamp(min=0)
    cache, done = state.cache, state.prefilled
    resolved = resolve_rows(steering, lm.n_layers, positions=opts.positions,
                            operator="add_norm" if opts.norm_preserve else None)
    # entries steering only generated positions leave the prompt alone; "from N" entries use position ids
    # text gates start closed
    rows = [[r for r in row if r.positions != "generated" and not r.gated] for row in resolved]
    with steer(lm, rows):
        while total - done > chunk and keep_going():
            end = done + chunk
            kw = {"cache" if _NEW_CACHE_NAME else "past_key_values": cache} if cache is not None else {}
            out = lm.model(input_ids=state.ids[:, done:end], attention_mask=state.mask[:, :end],
                           position_ids=positions[:, done:end], use_cache=True, logits_to_keep=1, **kw)
            cache = getattr(out, "cache", None) if _NEW_CACHE_NAME else out.past_key_values
            done = end
    return replace(state, cache=cache, prefilled=done)


@torch.no_grad()
def run(lm: LoadedModel, state: SliceState, steering: list[list], opts: GenerationOptions, *,
        streamer: BaseStreamer | None,
        stop: threading.Event, max_new_tokens: int, report: dict | None = None) -> SliceState:
    """Generate up to ``max_new_tokens`` more (fewer when ``stop`` is set); the state to resume from.

    ``report`` gets the governor under ``"live"`` and the text conditions' gate under ``"gate"`` while
    they run (as :func:`steerlab.generate.generate`); a resumed slice keeps the gate (and what it read)."""
    kwargs: dict[str, Any] = generation_kwargs(lm, replace(opts, max_new_tokens=max_new_tokens))
    resolved = resolve_rows(steering, lm.n_layers, positions=opts.positions,
                            operator="add_norm" if opts.norm_preserve else None)
    if state.cache is not None:  # transformers 5 calls it `cache`; 4.x `past_key_values`
        kwargs["cache" if _NEW_CACHE_NAME else "past_key_values"] = state.cache
    with steering_session(lm, resolved, state.ids.shape[0], kwargs, report, resume=state.generated > 0):
        out = run_generate(lm, input_ids=state.ids, attention_mask=state.mask, streamer=streamer,
                                stopping_criteria=StoppingCriteriaList([_Stop(stop)]),
                                return_dict_in_generate=True, use_cache=True, **kwargs)
    new = out.sequences.shape[1] - state.ids.shape[1]
    mask = torch.cat([state.mask, state.mask.new_ones(state.mask.shape[0], new)], dim=1)
    cache = getattr(out, "cache", None) if _NEW_CACHE_NAME else out.past_key_values
    return replace(state, ids=out.sequences, mask=mask, cache=cache, generated=state.generated + new)


def _uses_cache_name() -> bool:
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" in {f.name for f in fields(GenerateDecoderOnlyOutput)}


_NEW_CACHE_NAME = _uses_cache_name()
