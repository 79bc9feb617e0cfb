"""The coherence governor: per row, lower the steering while the text is breaking, restore it after.

Steered text breaks in a recognisable way: the model stops being sure of its next token. On the
embedded model the greedy next-token entropy of fluent replies averages 1.4-2.7 nats, of broken
ones (symbol and word soup) 6-7 nats from the first tokens on (docs/dose.md). The governor reads
the entropy of each row's next-token distribution at every decoding step (the logits the step
computed anyway: no second forward pass), keeps a short moving average, and

* multiplies that row's steering gain by ``DOWN`` when the average is above ``high``, or when the
  row just repeated a 4-gram of its own reply (a loop);
* raises the gain back by ``UP`` (up to 1) when the average is below ``low``.

The gain is a ``[rows, 1, 1]`` tensor that :func:`steerlab.hooks.steer` multiplies into every
steering term of the row, so the next step is steered less. Rows without the governor keep
gain 1. ``gains`` records, per row, the gain used for every generated token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

HIGH = 4.5  # nats: above this moving average the row is breaking
LOW = 3.5  # nats: below it the row has recovered
# Models differ in how sure they are of fluent text (unsteered greedy replies to the calibration
# prompts, penalty 1.2: SmolLM2-135M-Instruct 2.11 nats, Gemma 3 270M base 3.10). A vector whose
# calibration measured its model's entropy gets thresholds at these margins above it instead.
HIGH_MARGIN = 2.4
LOW_MARGIN = 1.4
DOWN = 0.6
UP = 0.15
EMA = 0.5  # weight of the newest step in the moving average
LOOP_N = 4


class Governor(LogitsProcessor):
    """A logits processor that writes each governed row's steering gain for the next step."""

    def __init__(self, rows: Sequence[bool], *, device: torch.device, dtype: torch.dtype, high: float = HIGH,
                 low: float = LOW) -> None:
        self.on = torch.tensor([bool(r) for r in rows])
        self.gain = torch.ones(len(rows), 1, 1, device=device, dtype=dtype)
        self.high, self.low = high, low
        self.ema: torch.Tensor | None = None
        self.gains: list[list[float]] = [[] for _ in rows]
        self.entropy = torch.zeros(len(rows))  # summed next-token entropy per row (all rows, governed or not)
        self.steps = 0
        self._prompt_len: int | None = None

    @classmethod
    def for_model(cls, rows: Sequence[bool], base_entropy: float | None, *, device: torch.device,
                  dtype: torch.dtype) -> Governor:
        """Thresholds relative to the model's measured fluent entropy (the fixed ones without it)."""
        if base_entropy is None:
            return cls(rows, device=device, dtype=dtype)
        return cls(rows, device=device, dtype=dtype, high=base_entropy + HIGH_MARGIN, low=base_entropy + LOW_MARGIN)

    def mean_entropy(self) -> list[float]:
        """Per row, the mean next-token entropy (nats) over the steps seen."""
        return (self.entropy / max(self.steps, 1)).tolist()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        n = self.gain.shape[0]
        if input_ids.shape[0] != n:  # beams or several returns per prompt: the governor does not apply
            return scores
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
        g = self.gain[:, 0, 0].float().cpu()
        for r in range(n):
            self.gains[r].append(round(float(g[r]), 3))
        logp = torch.log_softmax(scores.float(), dim=-1)
        h = -(logp.exp() * logp).sum(-1).cpu()
        self.entropy += h
        self.steps += 1
        self.ema = h if self.ema is None else EMA * h + (1 - EMA) * self.ema
        loops = _loops(input_ids[:, self._prompt_len :])
        down = (self.ema > self.high) | loops
        up = self.ema < self.low
        new = torch.where(down, g * DOWN, torch.where(up, (g + UP).clamp(max=1.0), g))
        new = torch.where(self.on, new, torch.ones_like(new))
        self.gain.copy_(new.to(self.gain)[:, None, None])
        return scores

    def summary(self) -> list[dict]:
        """Per row: lowest gain, mean gain and how many steps ran below full steering."""
        out: list[dict] = []
        for r, gs in enumerate(self.gains):
            if not bool(self.on[r]) or not gs:
                out.append({})
                continue
            out.append({"min_gain": min(gs), "mean_gain": round(sum(gs) / len(gs), 3),
                        "steps_lowered": sum(1 for x in gs if x < 0.999), "steps": len(gs)})
        return out


def _loops(reply: torch.Tensor) -> torch.Tensor:
    """Rows whose last ``LOOP_N`` tokens already occurred earlier in their reply."""
    rows, t = reply.shape
    if t < 2 * LOOP_N:
        return torch.zeros(rows, dtype=torch.bool)
    last = reply[:, -LOOP_N:]
    windows = reply[:, :-LOOP_N].unfold(1, LOOP_N, 1)  # [rows, t - 2N + 1, N]
    return (windows == last[:, None, :]).all(-1).any(-1).cpu()
