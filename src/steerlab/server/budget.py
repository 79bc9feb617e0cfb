"""Prompt bounds in tokens: what a request's prompt costs, counted before it is queued.

Character limits are only a cheap first cut (4,000 emoji are ~16,000 tokens). Every
generating endpoint counts its rendered prompt here, with a private copy of the tokenizer
(the runner's worker owns the model's tokenizer; a fast tokenizer changes its own padding
state while encoding, so sharing it across threads is unsafe), and refuses with 400 a prompt
over ``max_prompt_tokens`` or one that, with the tokens asked for, does not fit the model's
context. The count also tells the runner what a job costs (see :mod:`steerlab.server.runner`).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from fastapi import HTTPException


def context_length(lm: Any) -> int | None:
    """The model's context in tokens, from its config; None when unknown (or not loaded: vLLM's side)."""
    model = getattr(lm, "model", None)  # a DeferredModel (vLLM) has none: the weights may not be loaded
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class PromptBudget:
    """Counts prompt tokens the way :func:`steerlab.generate.encode_prompts` will encode them."""

    def __init__(self, lm: Any, *, max_prompt_tokens: int, context: int | None) -> None:
        tok = lm.tokenizer
        self._template = tok  # apply_chat_template renders text only (no tokenizer state is touched)
        backend = getattr(tok, "backend_tokenizer", None)
        self._backend = copy.deepcopy(backend) if backend is not None else None
        self._slow = copy.deepcopy(tok) if backend is None else None
        self._lock = threading.Lock()  # a slow tokenizer copy is not known to be thread-safe
        self.has_chat_template = bool(getattr(tok, "chat_template", None))
        self.max_prompt_tokens = max_prompt_tokens
        self.context = context

    def render(self, prompt: str, chat: bool | None) -> tuple[str, bool]:
        """The text the model will see, and whether the chat template made it."""
        use_chat = self.has_chat_template if chat is None else bool(chat)
        if not use_chat:
            return prompt, False
        text = self._template.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return text, True

    def count(self, text: str, *, special: bool) -> int:
        """Tokens of ``text`` (``special``: with the tokenizer's own BOS/EOS, as raw prompts are encoded)."""
        if self._backend is not None:
            return len(self._backend.encode(text, add_special_tokens=special).ids)
        with self._lock:
            return len(self._slow.encode(text, add_special_tokens=special))  # type: ignore[union-attr]

    def prompt_tokens(self, prompt: str, chat: bool | None) -> int:
        text, templated = self.render(prompt, chat)
        return self.count(text, special=not templated)

    def check(self, n_prompt: int, max_new_tokens: int, *, field: str = "prompt", new_field: str = "max_length") -> int:
        """``n_prompt`` when it fits; else an HTTP 400 saying what to shorten."""
        if n_prompt > self.max_prompt_tokens:
            raise HTTPException(400, f"{field} is {n_prompt} tokens; this server accepts at most "
                                     f"{self.max_prompt_tokens} (shorten it; the operator sets --max-prompt-tokens)")
        if self.context is not None and n_prompt + max_new_tokens > self.context:
            raise HTTPException(400, f"{field} ({n_prompt} tokens) + {new_field} ({max_new_tokens}) exceeds the "
                                     f"model's context of {self.context} tokens: shorten the {field} or ask for "
                                     f"at most {max(0, self.context - n_prompt)} new tokens")
        return n_prompt
