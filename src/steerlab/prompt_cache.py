"""The unsteered model's view of a sweep's prompts, computed once: perplexity and fast generation.

A sweep generates and scores many replies to the same held-out prompts. :class:`PromptCache`
runs the *unsteered* model over those prompts once and keeps its key/value cache;
:func:`perplexities` then scores a reply by running only the reply's tokens on top of it, and
:func:`generate_from_cache` generates with ``positions="generated"`` (where the prompt, but
for its last token, is never steered) by running only the last prompt token and the new ones.
Both give the same numbers as the plain paths (tested). Knows nothing about scores or sweeps.

Transformers renamed the cache argument (``past_key_values`` -> ``cache``, 5.x) and the
meaning of ``crop(n)``; this module handles both.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .errors import SteeringError

if TYPE_CHECKING:
    from torch import nn
    from .generate import GenerationOptions
    from .models import LoadedModel


def _cache_arg(model: nn.Module) -> str:
    """Transformers renamed ``past_key_values`` to ``cache`` (5.x); use whichever forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class PromptCache:
    """The unsteered model's KV cache of a fixed list of prompts, computed once.

    A sweep scores every cell's replies to the same prompts: with this cache the scoring pass
    runs only the reply tokens (the prompt part is most of the cost). Build it outside any
    steering context.
    """

    @torch.no_grad()
    def __init__(self, lm: LoadedModel, prompts: Sequence[str], *, chat: bool | None = None) -> None:
        use_chat = lm.has_chat_template if chat is None else chat
        self.chat = use_chat
        self.index = {p: i for i, p in enumerate(dict.fromkeys(prompts))}
        enc = lm.tokenizer([lm.format_prompt(p, chat=use_chat) for p in self.index], return_tensors="pt",
                           padding=True, padding_side="left", add_special_tokens=not use_chat)
        self.ids = enc["input_ids"].to(lm.device)
        self.mask = enc["attention_mask"].to(lm.device)
        self.lengths = self.mask.sum(-1)
        out = lm.model(input_ids=self.ids, attention_mask=self.mask,
                       position_ids=(self.mask.cumsum(-1) - 1).clamp_min(0), use_cache=True, logits_to_keep=1)
        self.kv = out["cache"] if "cache" in out else out.past_key_values
        self.first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # predicts each reply's 1st token

    def rows(self, prompts: Sequence[str], *,
             drop_last: bool = False) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cache copy, prompt mask, prompt lengths, first-token log-probs, ids) for a batch of rows.

        ``drop_last``: the cache without the prompts' last token (left padding puts every
        prompt's last token in the last column), for generation to run that token itself.
        """
        idx = torch.tensor([self.index[p] for p in prompts], device=self.mask.device)
        kv = copy.deepcopy(self.kv)
        if drop_last:
            kv.crop(-1)  # drop the last position (both transformers 4.x and 5.x read -1 so)
        kv.reorder_cache(idx)
        return kv, self.mask[idx], self.lengths[idx], self.first_logp[idx], self.ids[idx]


@torch.no_grad()
def generate_from_cache(lm: LoadedModel, cache: PromptCache, prompts: Sequence[str], steering: Sequence, *,
                        options: GenerationOptions) -> list[str]:
    """:func:`steerlab.generate.generate` with ``positions="generated"``, greedy, reusing the prefill.

    With ``positions="generated"`` the prompt's tokens before the last one are never steered, so
    their keys and values are the cached unsteered ones: each row runs only its last prompt
    token (steered, as the hook steers it in a full prefill) and the new tokens.
    """
    from .generate import generation_kwargs, run_generate
    from .hooks import steer

    if options.positions != "generated" or options.temperature > 0:
        raise SteeringError("generate_from_cache is for greedy generation with positions='generated'")
    kv, mask, _, _, ids = cache.rows(prompts, drop_last=True)
    tok = lm.tokenizer
    with steer(lm, list(steering), positions="generated", norm_preserve=options.norm_preserve):
        out = run_generate(lm, input_ids=ids, attention_mask=mask, **generation_kwargs(lm, options),
                           **{_cache_arg(lm.model): kv})
    return [tok.decode(row, skip_special_tokens=True).strip() for row in out[:, ids.shape[1] :]]


@torch.no_grad()
def perplexities(lm: LoadedModel, prompts: Sequence[str], texts: Sequence[str], *, chat: bool | None = None,
                 batch_size: int = 16, cache: PromptCache | None = None) -> list[float]:
    """Perplexity of each ``texts[i]`` as the reply to ``prompts[i]`` under ``lm`` as it is.

    Call it outside any steering context to score under the unsteered model. The prompt is
    formatted exactly as :func:`steerlab.generate.generate` formats it; empty texts get ``nan``.
    ``cache`` (a :class:`PromptCache` holding these prompts) skips recomputing the prompts.
    """
    tok = lm.tokenizer
    use_chat = cache.chat if cache is not None else lm.has_chat_template if chat is None else chat
    out: list[float] = []
    for i in range(0, len(texts), batch_size):
        ps, ts = list(prompts[i : i + batch_size]), list(texts[i : i + batch_size])
        t_ids = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in ts]
        n_text = [len(x) for x in t_ids]
        if max(n_text) == 0:
            out.extend(float("nan") for _ in ts)
            continue
        logp = cached_reply_logp(lm, cache, ps, t_ids) if cache is not None else _full_logp(lm, ps, t_ids, use_chat)
        for r, n in enumerate(n_text):
            out.append(math.exp(-float(logp[r, :n].mean())) if n else float("nan"))
    return out


def _full_logp(lm: LoadedModel, prompts: list[str], t_ids: list[list[int]], use_chat: bool) -> torch.Tensor:
    """Log-prob of each reply token ``[B, T]`` (left-aligned), prompt and reply in one pass."""
    tok = lm.tokenizer
    ids = [tok(lm.format_prompt(p, chat=use_chat), add_special_tokens=not use_chat)["input_ids"] + t
           for p, t in zip(prompts, t_ids)]
    width, keep = max(len(x) for x in ids), max(len(t) for t in t_ids) + 1
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=lm.device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=lm.device)
    logits = lm.model(input_ids=input_ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                      logits_to_keep=keep).logits.float()[:, -keep:-1]  # position t predicts token t + 1
    logp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, -keep + 1 :, None])[..., 0]
    # right-align -> left-align each row's reply tokens
    out = torch.zeros(len(ids), keep - 1, device=lm.device)
    for r, t in enumerate(t_ids):
        if t:
            out[r, : len(t)] = logp[r, -len(t) :]
    return out


def cached_reply_logp(lm: LoadedModel, cache: PromptCache, prompts: Sequence[str],
                      t_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Log-prob of each reply token ``[B, T]`` (left-aligned, 0 past a reply's end) under ``lm`` as it
    is, running only the reply tokens on top of the cached prompts. A ``capture`` around the call
    sees the reply tokens' residuals, laid out the same way."""
    kv, p_mask, p_len, first, _ = cache.rows(prompts)
    width = max(len(t) for t in t_ids)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([list(t) + [pad] * (width - len(t)) for t in t_ids], device=lm.device)
    t_mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in t_ids], device=lm.device)
    mask = torch.cat([p_mask, t_mask], dim=1)
    pos = p_len[:, None] + torch.arange(width, device=lm.device)[None]
    logits = lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **{_cache_arg(lm.model): kv}).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([first.gather(-1, ids[:, :1]), logp], dim=1)
