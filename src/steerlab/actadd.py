"""Quick vectors from one pair of prompts, after ActAdd (Turner et al. 2023).

"Steering GPT-2-XL by adding an activation vector" builds its steering from a single prompt
pair such as ("Love", "Hate"): both prompts are tokenised the model's usual way (GPT-2 under
TransformerLens got a BOS in front; SmolLM2's tokenizer adds none), the shorter one is
right-padded with space tokens to equal length, both are run to the injection layer, and the
*per-position* difference ``h+(p) - h-(p)`` (an ``[n, hidden]`` tensor) times a coefficient is
added to the user prompt's residual stream at positions ``0..n-1`` of that layer -- the front
of the sequence, once, during the prompt's forward pass (later cached tokens are not touched; a
prompt shorter than ``n`` tokens is an error).

Two ways to use a pair here:

* :func:`actadd_generate` / :func:`actadd` -- the faithful per-position injection above, via
  :func:`steerlab.hooks.add_at_front`. It cannot be stored as a :class:`SteeringVector` (it is
  a ``[n, hidden]`` tensor tied to positions), so it is for experiments.
* :func:`build_pair_vector` -- a :class:`SteeringVector` (one direction per layer) that the rest
  of steerlab (store, server, sweeps, llama.cpp export) understands: the difference of the two
  prompts' residuals, reduced over positions (see ``reduce``), normalised, with the residual
  norm of each layer measured on the neutral prompts. This is the common single-vector
  approximation; docs/interop.md compares both on the real model.

Layer numbers follow steerlab's convention (layer i = output of block i). The paper's
"layer 6" (``resid_pre`` of block 6 = the input to block 6) is steerlab layer 5.
This module registers no hooks itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

import torch

from .errors import SteeringError
from .hooks import add_at_front, capture, run_until_captured
from .layers import check_layers
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

Reduce = Literal["mean", "last"]


def encode_raw(lm: LoadedModel, text: str, *, prepend_bos: bool | None = None) -> list[int]:
    """Token ids of ``text`` as ActAdd sees it: the tokenizer's own special tokens (None), or BOS forced on/off.

    The paper used TransformerLens, which puts GPT-2's BOS in front; the faithful equivalent
    for another model is whatever its tokenizer does by default (SmolLM2: no BOS).
    """
    tok = lm.tokenizer
    if prepend_bos is None:
        return list(tok(text)["input_ids"])
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not prepend_bos:
        return ids
    if tok.bos_token_id is None:
        raise SteeringError(f"{lm.model_id}'s tokenizer has no BOS token to prepend")
    return [int(tok.bos_token_id)] + ids


def pad_pair(lm: LoadedModel, positive: str, negative: str, *,
             prepend_bos: bool | None = None) -> tuple[list[int], list[int]]:
    """Both prompts' ids, the shorter right-padded with the space token (the paper's padding)."""
    if not positive.strip() or not negative.strip():
        raise SteeringError("both prompts of a pair must be non-empty")
    pos, neg = encode_raw(lm, positive, prepend_bos=prepend_bos), encode_raw(lm, negative, prepend_bos=prepend_bos)
    space = lm.tokenizer(" ", add_special_tokens=False)["input_ids"]
    if len(space) != 1:
        raise SteeringError(f"{lm.model_id}: ' ' is not one token, cannot pad the pair the ActAdd way")
    n = max(len(pos), len(neg))
    pos, neg = pos + space * (n - len(pos)), neg + space * (n - len(neg))
    if pos == neg:
        raise SteeringError("the two prompts are the same tokens: they give no direction")
    return pos, neg


@torch.no_grad()
def pair_residuals(
    lm: LoadedModel, positive: str, negative: str, *, layers: Sequence[int], prepend_bos: bool | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the ``[n, hidden]`` block outputs of the padded positive and negative prompt."""
    layers = check_layers(list(layers), lm.n_layers)
    pos, neg = pad_pair(lm, positive, negative, prepend_bos=prepend_bos)
    ids = torch.tensor([pos, neg], device=lm.device)
    with capture(lm, layers) as store:
        run_until_captured(lm, input_ids=ids, attention_mask=torch.ones_like(ids))
    return {layer: (store[layer][0].float().cpu(), store[layer][1].float().cpu()) for layer in layers}


def actadd_delta(lm: LoadedModel, positive: str, negative: str, *, layer: int, coefficient: float = 1.0,
                 prepend_bos: bool | None = None) -> torch.Tensor:
    """The paper's steering tensor ``coefficient * (h+ - h-)``, ``[n, hidden]``, at ``layer``."""
    (layer,) = check_layers([layer], lm.n_layers)
    hp, hn = pair_residuals(lm, positive, negative, layers=[layer], prepend_bos=prepend_bos)[layer]
    return coefficient * (hp - hn)


@contextmanager
def actadd(lm: LoadedModel, positive: str, negative: str, *, layer: int, coefficient: float = 1.0,
           prepend_bos: bool | None = None) -> Iterator[torch.Tensor]:
    """Inside the block, the model is steered the ActAdd way (prompts must start with the same BOS).

    Yields the ``[n, hidden]`` tensor being added. Encode prompts with :func:`encode_raw`.
    """
    delta = actadd_delta(lm, positive, negative, layer=layer, coefficient=coefficient, prepend_bos=prepend_bos)
    with add_at_front(lm, layer, delta):
        yield delta


@torch.no_grad()
def actadd_generate(
    lm: LoadedModel,
    prompt: str,
    positive: str | None = None,
    negative: str | None = None,
    *,
    layer: int = 0,
    coefficient: float = 1.0,
    max_new_tokens: int = 40,
    repetition_penalty: float = 1.0,
    prepend_bos: bool | None = None,
) -> str:
    """Greedy raw completion of ``prompt`` with per-position ActAdd (no pair: unsteered).

    Raw text, not the chat template: ActAdd aligns the steering with the first tokens of the
    sequence, which under a chat template would be the template's own tokens.
    """
    from .generate import GenerationOptions, generation_kwargs, run_generate

    ids = torch.tensor([encode_raw(lm, prompt, prepend_bos=prepend_bos)], device=lm.device)
    opts = GenerationOptions(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)  # greedy
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **generation_kwargs(lm, opts))
    if positive is None or negative is None:
        out = run_generate(lm, **kwargs)
    else:
        with actadd(lm, positive, negative, layer=layer, coefficient=coefficient, prepend_bos=prepend_bos):
            out = run_generate(lm, **kwargs)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _first_difference(a: list[int], b: list[int]) -> int:
    """Index of the first position where the token ids differ (residuals before it are identical)."""
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def default_pair_layer(lm: LoadedModel) -> int:
    """Default injection layer for pair vectors: about 1/8 of the depth, as the paper's layer 6 of 48."""
    return max(1, round(lm.n_layers / 8))


def build_pair_vector(
    lm: LoadedModel,
    positive: str,
    negative: str,
    *,
    layer: int,
    name: str = "pair",
    layers: Sequence[int] | None = None,
    reduce: Reduce = "mean",
    default_strength: float = 0.5,
    description: str = "",
    keywords: Sequence[str] = (),
) -> SteeringVector:
    """A :class:`SteeringVector` from one prompt pair (single-vector ActAdd approximation).

    Direction at each of ``layers`` (default: every layer, so any can be chosen later; ``layer``
    is the default one): the difference of the padded pair's residuals, either the ``mean`` over
    the positions where they differ (the attention-sink position 0 left out, as in extraction,
    unless it is the only one) or the ``last`` position. Residual norms are measured on the
    neutral prompts (:func:`steerlab.extract.measure_norms`). ``default_strength`` defaults to
    0.5 residual norms: added at *every* position, the pair's own difference (several residual
    norms at early layers, recorded as ``extra["difference_strength"]``) breaks the text.
    """
    from .extract import contrast_hash, measure_norms

    (layer,) = check_layers([layer], lm.n_layers)
    use = check_layers(list(layers), lm.n_layers) if layers is not None else list(range(lm.n_layers))
    if layer not in use:
        use = sorted({*use, layer})
    if reduce not in ("mean", "last"):
        raise SteeringError(f"reduce must be 'mean' or 'last', not {reduce!r}")
    ids_p, ids_n = pad_pair(lm, positive, negative)
    first = _first_difference(ids_p, ids_n)
    res = pair_residuals(lm, positive, negative, layers=use)
    norms = measure_norms(lm, use)
    directions, sizes = {}, {}
    for i, (hp, hn) in res.items():
        diff = (hp - hn)[first:]
        if reduce == "last" or len(diff) == 1:
            d = diff[-1]
        else:  # positions after the shared prefix, the attention sink (position 0) left out as in extraction
            d = (hp - hn)[max(first, 1):].double().mean(0).float()
        n = d.norm()
        if not torch.isfinite(n) or n == 0:
            raise SteeringError(f"layer {i}: the two prompts give no direction")
        directions[i] = d / n
        sizes[i] = float(n) / norms[i]
    return SteeringVector(
        directions=directions,
        norms=norms,
        model_id=lm.model_id,
        name=name,
        method=f"actadd_pair:{reduce}",
        pooling="pair",
        description=description or f"{positive!r} - {negative!r}",
        keywords=tuple(keywords),
        contrast_hash=contrast_hash([positive], [negative]),
        default_layers=(layer,),
        default_strength=float(default_strength),
        extra={"pair": [positive, negative], "reduce": reduce,
               "difference_strength": {str(i): round(v, 4) for i, v in sorted(sizes.items())}},
    )
