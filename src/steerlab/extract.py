"""Contrast texts -> pooled activations -> a SteeringVector.

Owns tokenisation for extraction, batching, pooling (attention-masked, attention-sink aware)
and the residual-norm statistics that define the strength unit. Hooks come from
:mod:`steerlab.hooks`; direction estimators from :mod:`steerlab.methods`.

Pooling (``pooling=``):
  * ``mean``: mean over the text's tokens, leaving out its first real token. That position is
    an attention sink whose residual norm is ~150x the others on SmolLM2; including it
    swamps the mean.
  * ``last``: the last real token (correct under left *and* right padding).
  * ``window:K``: mean of the last K real tokens (first token still excluded when possible).
"""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .errors import SteeringError
from .hooks import capture, run_until_captured
from .layers import check_layers
from .methods import Method, get_method, mean_diff
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel


# ``method="mean_centred"`` (Jorgensen et al. 2023, "Improving Activation Steering in Language
# Models with Mean-Centring", arXiv:2312.03813): subtract the mean activation of the model's
# ordinary output. steerlab takes the direction mean(pos) - (mean(neg) + mean(own)) / 2: half the
# contrast (what separates the pairs), half the centring (what separates the positives from what
# the model says anyway). Measured on the built-in personas (docs/dose.md, "Third round").
MEAN_CENTRED = "mean_centred"
OWN_REPLY_PROMPTS = slice(4, 24)  # 20 shipped neutral prompts, none used by calibration or evaluations
OWN_REPLY_TOKENS = 48


def parse_pooling(pooling: str) -> tuple[str, int]:
    """``mean`` | ``last`` | ``window:K`` -> (kind, K)."""
    if pooling in ("mean", "last"):
        return pooling, 0
    if pooling.startswith("window:"):
        try:
            k = int(pooling.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "window", k
    raise SteeringError(f"unknown pooling {pooling!r}: use mean, last or window:K (K >= 1)")


def pooling_weights(mask: torch.Tensor, pooling: str, skip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token weights ``[B, T]`` summing to 1 per row, for a given attention ``mask``.

    ``skip[b]`` leading real tokens of row b are excluded (default 1: the attention sink).
    """
    kind, k = parse_pooling(pooling)
    mask = mask.bool()
    b, t = mask.shape
    pos = torch.arange(t).expand(b, t)
    first = mask.float().argmax(dim=1)  # first real token (left padding aware)
    last = torch.where(mask, pos, torch.full_like(pos, -1)).max(dim=1).values
    skip = torch.ones(b, dtype=torch.long) if skip is None else skip.long()
    start = first + skip
    if kind == "last":
        w = pos == last[:, None]
    else:
        w = mask & (pos >= start[:, None])
        if kind == "window":
            w &= pos > (last - k)[:, None]
    # Texts too short to have anything left fall back to their last token.
    empty = ~w.any(dim=1)
    w[empty] = pos[empty] == last[empty, None]
    w = w.float()
    return w / w.sum(dim=1, keepdim=True)


def _encode(lm: LoadedModel, texts: Sequence[str], max_length: int, chat: bool) -> tuple[dict, torch.Tensor]:
    """Tokenise a batch; return model inputs and the per-row count of leading tokens to skip."""
    tok = lm.tokenizer
    if chat:
        rendered = [lm.format_reply(t) for t in texts]
        full = [r[0] for r in rendered]
        prefix_lens = [len(tok(r[0][: r[1]], add_special_tokens=False)["input_ids"]) for r in rendered]
        enc = tok(full, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                  add_special_tokens=False)
        skip = torch.tensor([max(1, n) for n in prefix_lens])
    else:
        enc = tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        skip = torch.ones(len(texts), dtype=torch.long)
    return enc, skip


@torch.no_grad()
def pooled_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    layers: Sequence[int],
    *,
    pooling: str = "mean",
    batch_size: int = 16,
    max_length: int = 256,
    chat: bool = False,
    progress: bool = True,
    desc: str = "activations",
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, torch.Tensor], dict[int, tuple[float, int]]]:
    """Pooled block outputs ``{layer: [N, H]}`` (fp32, CPU) and per-layer (sum of token norms, count).

    One batched forward pass per ``batch_size`` texts, cut after the deepest layer.
    ``on_progress(done, total)`` is called after each batch with the number of texts done.
    """
    layers = check_layers(list(layers), lm.n_layers)
    parse_pooling(pooling)
    pooled: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    norm_sum = {layer: [0.0, 0] for layer in layers}
    batches = range(0, len(texts), batch_size)
    for i in tqdm(batches, desc=desc, disable=not progress, leave=False):
        enc, skip = _encode(lm, texts[i : i + batch_size], max_length, chat)
        mask = enc["attention_mask"]
        weights = pooling_weights(mask, pooling, skip).to(lm.device)
        # Tokens counted for the norm statistic: real tokens after the sink / prefix.
        stat_w = (pooling_weights(mask, "mean", skip) > 0).to(lm.device)
        with capture(lm, layers) as store:
            run_until_captured(lm, **{k: v.to(lm.device) for k, v in enc.items()})
        for layer in layers:
            h = store[layer].float()
            pooled[layer].append(torch.einsum("bt,bth->bh", weights, h).cpu())
            norms = h.norm(dim=-1)[stat_w]
            norm_sum[layer][0] += float(norms.sum())
            norm_sum[layer][1] += int(norms.numel())
        if on_progress is not None:
            on_progress(min(i + batch_size, len(texts)), len(texts))
    acts = {layer: torch.cat(chunks) for layer, chunks in pooled.items()}
    return acts, {layer: (s, int(n)) for layer, (s, n) in norm_sum.items()}


def contrast_hash(positive: Sequence[str], negative: Sequence[str]) -> str:
    """Stable short hash of a contrast set, recorded in vector metadata."""
    blob = json.dumps([list(positive), list(negative)], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_vector(
    lm: LoadedModel,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    method: str | Method = "mean_diff",
    pooling: str = "mean",
    chat: bool = False,
    batch_size: int = 16,
    max_length: int = 256,
    name: str = "vector",
    description: str = "",
    keywords: Sequence[str] = (),
    default_layers: Sequence[int] | None = None,
    default_strength: float = 1.0,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    on_pooled: Callable[[dict[int, torch.Tensor], dict[int, torch.Tensor]], None] | None = None,
    own_replies: Sequence[str] | None = None,
) -> SteeringVector:
    """Build a steering vector from contrast texts.

    ``layers``: where to compute directions (default: the middle layer); all of them come
    from the same batched passes. ``default_layers``: where the vector applies by default
    (default: all of ``layers``). ``chat=True`` renders each text as an assistant reply under
    the chat template and pools over the reply tokens only. ``on_progress(done, total)`` is
    called after each batch with the number of contrast texts (positive + negative) done.
    ``on_pooled(pos, neg)`` gets the pooled activations (``{layer: [N, H]}``) the directions came
    from, so a caller can reuse them (the build's doctor) instead of reading the texts again.
    ``method="mean_centred"`` also reads ``own_replies``, the model's ordinary output (default:
    :func:`model_replies`; see :data:`MEAN_CENTRED`).
    """
    if not positive or not negative:
        raise SteeringError("need at least one positive and one negative text")
    layers = check_layers(list(layers) if layers is not None else [lm.n_layers // 2], lm.n_layers)
    centred = method == MEAN_CENTRED
    method_name, fn = (MEAN_CENTRED, mean_diff) if centred else get_method(method)
    kw: dict[str, Any] = dict(pooling=pooling, batch_size=batch_size, max_length=max_length, chat=chat,
                              progress=progress)
    total = len(positive) + len(negative)
    pos_cb = neg_cb = None
    if on_progress is not None:
        pos_cb = lambda done, _n: on_progress(done, total)  # noqa: E731
        neg_cb = lambda done, _n: on_progress(len(positive) + done, total)  # noqa: E731
    pos, pos_norms = pooled_activations(lm, positive, layers, desc=f"{name} +", on_progress=pos_cb, **kw)
    neg, neg_norms = pooled_activations(lm, negative, layers, desc=f"{name} -", on_progress=neg_cb, **kw)
    if on_pooled is not None:
        on_pooled(pos, neg)
    own: dict[int, torch.Tensor] = {}
    if centred:
        replies = list(own_replies) if own_replies is not None else model_replies(lm)
        own, _ = pooled_activations(lm, replies, layers, desc=f"{name} own replies", **kw)
    directions, norms = {}, {}
    for layer in layers:
        d = fn(pos[layer], neg[layer]).float()
        if centred:  # mean(pos) - (mean(neg) + mean(own)) / 2: half contrast, half mean-centring
            d = 0.5 * (d + mean_diff(pos[layer], own[layer]).float())
        n = d.norm()
        if not torch.isfinite(n) or n == 0:
            raise SteeringError(f"layer {layer}: the contrast gives no direction (identical texts?)")
        directions[layer] = d / n
        s = pos_norms[layer][0] + neg_norms[layer][0]
        c = pos_norms[layer][1] + neg_norms[layer][1]
        norms[layer] = s / max(c, 1)
    return SteeringVector(
        directions=directions,
        norms=norms,
        model_id=lm.model_id,
        name=name,
        method=method_name,
        pooling=pooling + (":chat" if chat else ""),
        description=description,
        keywords=tuple(keywords),
        contrast_hash=contrast_hash(positive, negative),
        default_layers=tuple(check_layers(list(default_layers), lm.n_layers)) if default_layers else tuple(layers),
        default_strength=default_strength,
    )


def model_replies(lm: LoadedModel, prompts: Sequence[str] | None = None) -> list[str]:
    """The model's own greedy replies to neutral prompts: its ordinary output, which
    ``method="mean_centred"`` centres on. Default prompts: the shipped ones after the 4 that
    calibration uses and before the last 16 that evaluations hold out."""
    from .generate import GenerationOptions, generate

    use = list(prompts) if prompts is not None else neutral_prompts()[OWN_REPLY_PROMPTS]
    return generate(lm, use, None, options=GenerationOptions(max_new_tokens=OWN_REPLY_TOKENS))


def neutral_prompts(n: int | None = None) -> list[str]:
    """The first ``n`` shipped held-out prompts (varied topics, none about any persona)."""
    text = resources.files("steerlab").joinpath("data", "neutral_prompts.txt").read_text(encoding="utf-8")
    prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if n is not None and not 1 <= n <= len(prompts):
        raise SteeringError(f"asked for {n} held-out prompts; steerlab ships {len(prompts)} (use 1..{len(prompts)})")
    return prompts[:n] if n is not None else prompts


def measure_norms(lm: LoadedModel, layers: Sequence[int], texts: Sequence[str] | None = None) -> dict[int, float]:
    """Typical residual norm per layer (mean per-token L2 norm, sink excluded) on ``texts``.

    The same statistic :func:`build_vector` records, measured on the shipped neutral prompts by
    default: for vectors that come without contrast texts (an imported GGUF file, an ActAdd pair).
    """
    _, stats = pooled_activations(lm, list(texts or neutral_prompts()), list(layers), progress=False)
    return {layer: s / max(n, 1) for layer, (s, n) in stats.items()}
