"""``method="optimize"``: a direction trained by gradient, starting from the mean difference.

In the spirit of bi-directional preference optimisation (BiPO: Cao et al. 2024, "Personalized
Steering of Large Language Models: Versatile Steering Vectors Through Bi-directional Preference
Optimization", arXiv:2406.00045): the vector ``v`` is a trainable tensor per layer, and each step
samples contrast pairs, renders each side as the assistant's reply to a neutral prompt, and makes
the positive reply likelier than the negative one *relative to the unsteered model*, in both
directions (with ``+v`` the positive should win, with ``-v`` the negative):

    loss = -log sigmoid(beta * d * [(log p_v(pos) - log p_0(pos)) - (log p_v(neg) - log p_0(neg))])
           + kl_weight * KL(p_0 || p_v) on the unsteered model's own replies to neutral prompts

with ``d`` = +1 / -1 per pair (half each) and ``p_v`` the model steered by ``d * v``. The KL term
keeps the vector from buying likelihood with damage to ordinary text (the fluency that the dose
window measures). Log-probabilities are sums over reply tokens. Only ``v`` is trained; the
model's weights are frozen. The result is a plain :class:`SteeringVector` (unit directions, the
trained length as its default strength), so GGUF export, the vLLM engine and calibration work
unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .errors import SteeringError
from .evaluate import neutral_prompts
from .hooks import add_trainable
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

STEPS = 24
PAIRS_PER_STEP = 4
# Adam moves every coordinate by about ``lr`` per step, so the step's length is ``lr x sqrt(hidden)``.
# The rate is therefore set per vector as a share of its starting length: at 0.1 one step moves the
# vector by about a tenth of its length. (A fixed 0.02 per coordinate moved a 0.1-long vector at 576
# dimensions by 0.48 per step: after 40 steps the direction was Adam's noise, cosine 0.00-0.03 to the
# mean difference it started from, and carried no concept; measured on SmolLM2, tabby_cats.)
STEP_SHARE = 0.1
BETA = 0.1
KL_WEIGHT = 1.0
REPLY_TOKENS = 32  # of each contrast text, rendered as a reply: the cost of a step grows with it
NEUTRAL_PROMPTS = 6
NEUTRAL_TOKENS = 20


def _batch(lm: LoadedModel, prompt_texts: Sequence[tuple[str, str]]) -> dict:
    """Token ids of (prompt, reply) rows, right-padded, with a mask of the reply tokens."""
    tok = lm.tokenizer
    rows = []
    for prompt, text in prompt_texts:
        head = tok(lm.format_prompt(prompt, chat=lm.has_chat_template),
                   add_special_tokens=not lm.has_chat_template)["input_ids"]
        body = tok(text, add_special_tokens=False)["input_ids"][:REPLY_TOKENS]
        rows.append((head, body))
    width = max(len(h) + len(b) for h, b in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    reply = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (h, b) in enumerate(rows):
        ids[i, : len(h) + len(b)] = torch.tensor(h + b)
        mask[i, : len(h) + len(b)] = 1
        reply[i, len(h) : len(h) + len(b)] = True
    return {"ids": ids.to(lm.device), "mask": mask.to(lm.device), "reply": reply.to(lm.device)}


def _token_logp(lm: LoadedModel, b: dict) -> torch.Tensor:
    """Log-probs ``[rows, T-1, vocab]`` of every next token (position t predicts t + 1)."""
    logits = lm.model(input_ids=b["ids"], attention_mask=b["mask"], use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _reply_logp(logp: torch.Tensor, b: dict) -> torch.Tensor:
    """Summed log-prob of each row's reply tokens."""
    tgt = b["ids"][:, 1:]
    per = logp.gather(-1, tgt[..., None])[..., 0]
    return (per * b["reply"][:, 1:]).sum(-1)


def _train(lm: LoadedModel, params: dict, norms: dict, opt: torch.optim.Optimizer, positive: Sequence[str],
           negative: Sequence[str], prompts: Sequence[str], rng: random.Random, nb: dict, ref_neutral: torch.Tensor, *,
           steps: int, n: int, beta: float, kl_weight: float, progress: bool,
           on_step: Callable[[int, float], None] | None, name: str) -> dict:
    """The optimisation loop (model weights frozen by the caller); returns the trained vectors."""
    from tqdm.auto import tqdm

    use = list(params)
    neutral_rows = nb["ids"].shape[0]
    bar = tqdm(range(steps), desc=f"{name} optimize", disable=not progress, leave=False)
    for step in bar:
        idx = rng.sample(range(n), min(PAIRS_PER_STEP, n))
        rows = [(rng.choice(prompts), positive[i]) for i in idx] + [(rng.choice(prompts), negative[i]) for i in idx]
        b = _batch(lm, rows)
        k = len(idx)
        d = torch.tensor([1.0 if j % 2 == 0 else -1.0 for j in range(k)], device=lm.device)
        with torch.no_grad():
            ref = _reply_logp(_token_logp(lm, b), b)
        deltas = {layer: params[layer] * norms[layer] for layer in use}
        with add_trainable(lm, deltas, torch.cat([d, d])):
            lp = _reply_logp(_token_logp(lm, b), b)
        margin = (lp[:k] - ref[:k]) - (lp[k:] - ref[k:])
        loss = -torch.nn.functional.logsigmoid(beta * d * margin).mean()
        with add_trainable(lm, deltas, torch.ones(neutral_rows, device=lm.device)):
            steered = _token_logp(lm, nb)
        m = nb["reply"][:, 1:]
        kl = ((ref_neutral.exp() * (ref_neutral - steered)).sum(-1) * m).sum() / m.sum().clamp_min(1)
        total = loss + kl_weight * kl
        opt.zero_grad()
        total.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", kl=f"{kl.item():.3f}")
        if on_step:
            on_step(step, float(total.detach()))
    with torch.no_grad():
        return {layer: params[layer].detach().float().cpu() for layer in use}


def optimize_vector(lm: LoadedModel, start: SteeringVector, positive: Sequence[str], negative: Sequence[str], *,
                    layers: Sequence[int] | None = None, steps: int = STEPS, strength: float | None = None,
                    lr: float | None = None, beta: float = BETA, kl_weight: float = KL_WEIGHT, seed: int = 0,
                    progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> SteeringVector:
    """Train ``start``'s direction at ``layers`` (default: its active layers) on the contrast pairs."""
    n = min(len(positive), len(negative))
    if n < 2:
        raise SteeringError("method='optimize' needs at least 2 contrast pairs")
    use = list(layers or start.active_layers)
    s0 = start.default_strength if strength is None else strength
    rng = random.Random(seed)
    prompts = neutral_prompts()[:8]
    # the unsteered model's replies to neutral prompts: the text the KL term keeps intact
    from .generate import GenerationOptions, generate

    kl_prompts = prompts[:NEUTRAL_PROMPTS]
    neutral = list(zip(kl_prompts, generate(lm, kl_prompts, None,
                                            options=GenerationOptions(max_new_tokens=NEUTRAL_TOKENS))))
    nb = _batch(lm, neutral)
    with torch.no_grad():
        ref_neutral = _token_logp(lm, nb)
    params = {layer: torch.nn.Parameter((start.directions[layer].float() / start.directions[layer].norm()
                                         * s0).to(lm.device)) for layer in use}
    norms = {layer: float(start.norms[layer]) for layer in use}
    if lr is None:  # a share of the starting length per step (see STEP_SHARE)
        lr = STEP_SHARE * s0 / math.sqrt(start.hidden_size)
    opt = torch.optim.Adam(params.values(), lr=lr)
    frozen = [(p, p.requires_grad) for p in lm.model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        trained = _train(lm, params, norms, opt, positive, negative, prompts, rng, nb, ref_neutral, steps=steps, n=n,
                         beta=beta, kl_weight=kl_weight, progress=progress, on_step=on_step, name=start.name)
    finally:
        for p, was in frozen:
            p.requires_grad_(was)
    lengths = [float(v.norm()) for v in trained.values()]
    directions = dict(start.directions)
    directions.update({layer: v / v.norm().clamp_min(1e-12) for layer, v in trained.items()})
    measured = ("windows", "baselines", "spreads", "governor", "default_dose")  # of the old direction
    kept = {k: v for k, v in start.extra.items() if k not in measured}
    return replace(start, directions=directions, method="optimize", default_layers=tuple(use),
                   default_strength=round(sum(lengths) / len(lengths), 4),
                   extra={**kept, "optimize": {"steps": steps, "beta": beta, "kl_weight": kl_weight,
                                                      "lr": lr, "start_strength": s0, "layers": use,
                                                      "cosine_to_start": [round(float(
                                                          (directions[x] @ start.directions[x].float())
                                                          / start.directions[x].float().norm()), 4) for x in use]}})
