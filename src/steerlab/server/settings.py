"""The server's settings: everything the app needs besides the model and the vectors.

``steerlab serve`` builds one from its options and environment; tests build their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .limits import MAX_PROMPT_TOKENS


@dataclass(frozen=True)
class ServerSettings:
    """Everything the app needs besides the model and the vectors."""

    strength: float | None = None  # STRENGTH: replaces every vector's default strength
    max_queue: int = 32  # waiting jobs before 503
    max_batch_rows: int = 16  # rows (prompts) in one batched generation
    batch_wait_s: float = 0.01  # how long the worker waits for more jobs to batch with
    request_timeout_s: float = 120.0  # per request, queueing included
    max_prompt_tokens: int = MAX_PROMPT_TOKENS  # a request's rendered prompt; the model's context bounds it too
    max_batch_tokens: int = 8192  # padded prompt tokens (rows x longest prompt) in one batch
    allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback that mutating requests may use
    build_batch_size: int = 4  # contrast texts per forward pass when building (progress granularity)
    api_key: str | None = field(default=None, repr=False)  # STEERLAB_API_KEY: required on mutating endpoints
    api_key_all: bool = False  # STEERLAB_API_KEY_ALL=1: the key is required everywhere but / and /health
    public: bool = False  # bound to a non-loopback address: without a key, mutating endpoints are refused
