"""Token readings: how strongly the residual stream carries a vector's concept, token by token.

A *reading* of token t for vector v is the projection of the block output at t on v's unit
direction, at each of v's active layers, turned into a z-score against the same projections
over the tokens of unsteered neutral text (``data/neutral_prompts.txt``): 0 means "as on a
typical neutral token", +3 means three neutral standard deviations towards the concept. The
per-layer z-scores are averaged and that average is standardised once more on the neutral
tokens, so a neutral token reads mean 0, standard deviation 1, whatever the number of layers.

The attention sink: the first position of a sequence has a residual norm ~150x the others
(~22,000 vs ~140 on SmolLM2), so it is never read. Every text is read after one extra sink
token (the tokenizer's BOS, else EOS), so the text's own first token gets a reading too.

Reading is forward passes of the *unsteered* model only (no generation, no steering): readings
of a steered reply say what the text carries, not the vector that was added while writing it.
Owns no hooks (it uses :func:`steerlab.hooks.capture`) and prints nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .errors import SteeringError
from .hooks import capture, run_until_captured
from .layers import check_layers
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

MAX_TOKENS = 2048  # per text read; longer texts are refused with a message


@dataclass(frozen=True)
class Baseline:
    """Neutral statistics of one vector's projections: per layer, then of the layer-averaged z."""

    layers: tuple[int, ...]
    mean: dict[int, float]
    std: dict[int, float]
    z_mean: float
    z_std: float
    n_tokens: int

    def score(self, proj: torch.Tensor) -> torch.Tensor:
        """``proj`` [T, len(layers)] (raw projections) -> readings [T]."""
        mu = torch.tensor([self.mean[x] for x in self.layers], dtype=proj.dtype)
        sd = torch.tensor([self.std[x] for x in self.layers], dtype=proj.dtype)
        z = ((proj - mu) / sd).mean(dim=1)
        return (z - self.z_mean) / self.z_std


@dataclass(frozen=True)
class TokenReading:
    """One token: its text piece (pieces concatenate to the text), char span and readings."""

    text: str
    start: int
    end: int
    values: dict[str, float]


@dataclass(frozen=True)
class TextReading:
    """Readings of every token of one text, for every vector read."""

    text: str
    tokens: tuple[TokenReading, ...]

    def values(self, name: str) -> list[float]:
        return [t.values[name] for t in self.tokens]

    def mean(self, name: str) -> float:
        """Mean reading over the text's tokens (nan for an empty text)."""
        vals = self.values(name)
        return sum(vals) / len(vals) if vals else float("nan")

    def peak(self, name: str) -> float:
        return max(self.values(name), default=float("nan"))

    def to_dict(self, *, digits: int = 3) -> dict:
        names = list(self.tokens[0].values) if self.tokens else []
        return {
            "text": self.text,
            "tokens": [{"text": t.text, "start": t.start, "end": t.end,
                        "read": {k: round(v, digits) for k, v in t.values.items()}} for t in self.tokens],
            "mean": {n: round(self.mean(n), digits) for n in names},
            "peak": {n: round(self.peak(n), digits) for n in names},
        }


def reading_layers(vec: SteeringVector, layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """The layers a vector is read at: ``layers`` if given (those it has), else its active layers."""
    if layers is None:
        return tuple(vec.active_layers)
    use = tuple(x for x in layers if x in vec.directions)
    if not use:
        raise SteeringError(f"{vec.name} has no direction at layers {list(layers)}; it has {vec.layers}")
    return use


def _sink_id(tok: Any) -> int:
    for ident in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if ident is not None:
            return int(ident)
    raise SteeringError("the tokenizer has no BOS, EOS or pad token to put in the attention-sink position")


def _tokenize(lm: LoadedModel, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and char spans that tile the text exactly."""
    enc = lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if len(ids) > MAX_TOKENS:
        raise SteeringError(f"text of {len(ids)} tokens: readings take at most {MAX_TOKENS}; read it in parts")
    starts = [0] + [max(o[0], 0) for o in offsets[1:]]
    # Monotone starts; each piece runs to the next start so the pieces concatenate to the text.
    for i in range(1, len(starts)):
        starts[i] = max(starts[i], starts[i - 1])
    spans = [(starts[i], starts[i + 1] if i + 1 < len(starts) else len(text)) for i in range(len(starts))]
    return ids, spans


@torch.no_grad()
def projections(lm: LoadedModel, texts: Sequence[str], dirs: dict[int, torch.Tensor], *,
                contexts: Sequence[str] | None = None,
                batch_size: int = 16) -> list[tuple[list[tuple[int, int]], dict[int, torch.Tensor]]]:
    """Per text: its token spans and, per layer, the projections ``[T, K]`` on ``dirs[layer]`` ``[K, H]``.

    ``contexts[i]`` (optional) is read before ``texts[i]`` but not reported: a prompt before its
    reply. Sequences are ``[sink] + context + text``, right-padded, batched; the pass stops
    after the deepest layer.
    """
    if not texts:
        return []
    layers = check_layers(list(dirs), lm.n_layers)
    sink = _sink_id(lm.tokenizer)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else sink
    rows = []
    for i, text in enumerate(texts):
        ids, spans = _tokenize(lm, text)
        ctx = lm.tokenizer(contexts[i], add_special_tokens=False)["input_ids"] if contexts and contexts[i] else []
        rows.append(([sink, *ctx, *ids], 1 + len(ctx), spans))
    out = []
    d = {layer: dirs[layer].to(device=lm.device, dtype=torch.float32) for layer in layers}
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        width = max(len(r[0]) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, (ids, _, _) in enumerate(chunk):
            input_ids[r, : len(ids)] = torch.tensor(ids)
            mask[r, : len(ids)] = 1
        with capture(lm, layers) as store:
            run_until_captured(lm, input_ids=input_ids.to(lm.device), attention_mask=mask.to(lm.device))
        proj = {layer: (store[layer].float() @ d[layer].T).cpu() for layer in layers}  # [B, T, K]
        for r, (ids, first, spans) in enumerate(chunk):
            out.append((spans, {layer: proj[layer][r, first : len(ids)] for layer in layers}))
    return out


def _direction_table(vectors: Sequence[SteeringVector], layers: Sequence[tuple[int, ...]]) -> dict[int, torch.Tensor]:
    """Per layer, the unit directions ``[K, H]`` of all vectors (zeros where a vector is not read)."""
    h = vectors[0].hidden_size
    table: dict[int, torch.Tensor] = {}
    for k, (vec, use) in enumerate(zip(vectors, layers)):
        for layer in use:
            t = table.setdefault(layer, torch.zeros(len(vectors), h))
            d = vec.directions[layer].float()
            t[k] = d / d.norm().clamp_min(1e-12)
    return table


class Reader:
    """Reads the concepts of some vectors in any text; holds their neutral baselines.

    The baselines (one batched pass over the neutral prompts) are computed when the reader is
    made; keep the reader to read many texts. Nothing is cached anywhere else.
    """

    def __init__(self, lm: LoadedModel, vectors: Sequence[SteeringVector], *, layers: Sequence[int] | None = None,
                 neutral: Sequence[str] | None = None, batch_size: int = 16) -> None:
        if not vectors:
            raise SteeringError("give at least one vector to read")
        names = [v.name for v in vectors]
        if len(set(names)) != len(names):
            raise SteeringError(f"vectors to read need distinct names, got {names}")
        if len({v.hidden_size for v in vectors} | {lm.hidden_size}) != 1:
            raise SteeringError(f"vectors of hidden size {sorted({v.hidden_size for v in vectors})} cannot read "
                                f"a model of hidden size {lm.hidden_size}: rebuild them for {lm.model_id}")
        self.lm = lm
        self.vectors = list(vectors)
        self.layers = [reading_layers(v, layers) for v in self.vectors]
        self.batch_size = batch_size
        self._dirs = _direction_table(self.vectors, self.layers)
        if neutral is None:
            from .evaluate import neutral_prompts

            neutral = neutral_prompts()
        self.baselines = self._baselines(list(neutral))

    @property
    def names(self) -> list[str]:
        return [v.name for v in self.vectors]

    def _raw(self, texts: Sequence[str], contexts: Sequence[str] | None) -> list[tuple[list, list[torch.Tensor]]]:
        """Per text: spans and, per vector, raw projections ``[T, len(vector layers)]``."""
        out = []
        for spans, proj in projections(self.lm, texts, self._dirs, contexts=contexts, batch_size=self.batch_size):
            per_vec = [torch.stack([proj[layer][:, k] for layer in use], dim=1) for k, use in enumerate(self.layers)]
            out.append((spans, per_vec))
        return out

    def _baselines(self, neutral: list[str]) -> list[Baseline]:
        raw = self._raw(neutral, None)
        result = []
        for k, use in enumerate(self.layers):
            allp = torch.cat([per_vec[k] for _, per_vec in raw]).double()  # [N, L]
            if allp.shape[0] < 2:
                raise SteeringError("the neutral texts need at least two tokens for a baseline")
            mu, sd = allp.mean(0), allp.std(0).clamp_min(1e-9)
            z = ((allp - mu) / sd).mean(1)
            result.append(Baseline(layers=use, mean=dict(zip(use, mu.tolist())), std=dict(zip(use, sd.tolist())),
                                   z_mean=float(z.mean()), z_std=float(z.std().clamp_min(1e-9)),
                                   n_tokens=allp.shape[0]))
        return result

    def read(self, texts: str | Sequence[str], *, contexts: Sequence[str] | None = None) -> list[TextReading]:
        """Readings of every token of each text (``contexts[i]``: unread text before ``texts[i]``)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if contexts is not None and len(contexts) != len(texts):
            raise SteeringError(f"{len(contexts)} contexts for {len(texts)} texts")
        out = []
        for text, (spans, per_vec) in zip(texts, self._raw(texts, contexts)):
            scores = [base.score(p.double()).tolist() for base, p in zip(self.baselines, per_vec)]
            tokens = tuple(TokenReading(text[s:e], s, e, {n: scores[k][i] for k, n in enumerate(self.names)})
                           for i, (s, e) in enumerate(spans))
            out.append(TextReading(text, tokens))
        return out

    def read_replies(self, prompts: Sequence[str], replies: Sequence[str], *, chat: bool | None = None
                     ) -> list[TextReading]:
        """Readings of generated ``replies`` in the context of their (formatted) ``prompts``."""
        contexts = [self.lm.format_prompt(p, chat=chat) for p in prompts]
        return self.read(list(replies), contexts=contexts)
