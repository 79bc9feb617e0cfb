"""Logit lens of a direction: which tokens it promotes and suppresses, read through the unembedding.

``logits = W_U · norm(d)`` where ``norm`` is the model's final norm applied to the direction
alone (its bias, if any, removed: a bias is the same for every direction and would only add
the same tokens everywhere) and ``W_U`` the output embedding. The top tokens are what adding the
direction pushes the next-token distribution towards; the bottom ones, away from. Most
meaningful at late layers (the lens reads a middle layer as if it were the last). Knows nothing
about hooks or generation; one matrix product per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import SteeringError
from .vectors import SteeringVector

if TYPE_CHECKING:
    from .models import LoadedModel

_NORM_PATHS = ("model.norm", "model.language_model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
               "model.decoder.final_layer_norm", "model.final_layernorm", "transformer.norm_f")


@dataclass(frozen=True)
class LensRow:
    """Promoted and suppressed tokens of one layer's direction, with their logits."""

    layer: int
    promoted: tuple[tuple[str, float], ...]
    suppressed: tuple[tuple[str, float], ...]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "promoted": [[t, round(v, 3)] for t, v in self.promoted],
                "suppressed": [[t, round(v, 3)] for t, v in self.suppressed]}


def lens_layers(vec: SteeringVector, layers: Sequence[int] | None = None) -> list[int]:
    """The layers read (default: the active ones) plus the vector's deepest layer, where the lens is clearest."""
    use = [x for x in (layers or vec.active_layers) if x in vec.directions] or vec.active_layers
    return sorted({*use, max(vec.layers)})


def final_norm(model: nn.Module) -> nn.Module | None:
    """The model's final norm before the unembedding (None if it has none we know of)."""
    for path in _NORM_PATHS:
        obj: object = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module):
            return obj
    return None


def _wordlike(tok: Any, vocab: int) -> torch.Tensor:
    """``[vocab]`` bool: tokens that decode to readable text with a letter or digit (not special,
    not byte fragments, not whitespace): the lens lists only tokens a reader can make sense of."""
    special = set(tok.all_special_ids)
    keep = torch.zeros(vocab, dtype=torch.bool)
    for i, piece in enumerate(tok.batch_decode([[i] for i in range(vocab)])):
        keep[i] = i not in special and "\ufffd" not in piece and any(c.isalnum() for c in piece)
    return keep


def _display(tok: Any, ident: int) -> str:
    text = tok.decode([ident])
    return text if text.strip() else repr(text)


@torch.no_grad()
def logit_lens(lm: LoadedModel, vec: SteeringVector, *, layers: Sequence[int] | None = None, k: int = 8,
               readable: bool = True) -> list[LensRow]:
    """Top-``k`` promoted and suppressed tokens of ``vec``'s direction per layer (default: its active layers).

    ``readable``: list only tokens with a letter or digit (no special tokens, byte pieces or spaces).
    """
    use = list(layers) if layers is not None else vec.active_layers
    missing = [x for x in use if x not in vec.directions]
    if missing:
        raise SteeringError(f"{vec.name} has no direction at layers {missing}; it has {vec.layers}")
    if vec.hidden_size != lm.hidden_size:
        raise SteeringError(f"{vec.name} has hidden size {vec.hidden_size}, the model {lm.hidden_size}")
    head = lm.model.get_output_embeddings()
    if head is None:
        raise SteeringError(f"{type(lm.model).__name__} has no output embedding to read a direction through")
    weight = head.weight.detach().float()
    norm = final_norm(lm.model)
    d = torch.stack([vec.directions[x].float() for x in use]).to(weight.device)
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if norm is not None:
        dtype = next(norm.parameters(), weight).dtype
        h = norm(d.to(dtype)).float()
        bias = getattr(norm, "bias", None)
        if isinstance(bias, torch.Tensor):
            h = h - bias.float()
    else:
        h = d
    logits = h @ weight.T  # [L, V]
    tok = lm.tokenizer
    if readable:
        logits[:, ~_wordlike(tok, logits.shape[1])] = float("nan")
    rows = []
    for i, layer in enumerate(use):
        row = logits[i].clone()
        top = torch.topk(torch.nan_to_num(row, nan=-float("inf")), k)
        bottom = torch.topk(torch.nan_to_num(-row, nan=-float("inf")), k)
        rows.append(LensRow(layer,
                            tuple((_display(tok, int(j)), float(v)) for v, j in zip(top.values, top.indices)),
                            tuple((_display(tok, int(j)), -float(v)) for v, j in zip(bottom.values, bottom.indices))))
    return rows
