"""Generate, compare and stream text with per-row steering, on top of :mod:`steerlab.hooks`.

Every call is one batched ``model.generate``: rows may carry different steering (``compare``
is a two-row batch: base and steered). Prompts are left-padded so all rows end together.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .compiled import generate_settings
from .conditional import TextGate, condition_vectors, decide, text_gate_for
from .cpu_matmul import decode_matmuls
from .defaults import REPETITION_PENALTY
from .governor import Governor
from .hooks import RowSteering, steer, steering_rows
from .spec import Resolved, resolve_rows

if TYPE_CHECKING:
    from .models import LoadedModel


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling settings shared by all rows of a batch."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    chat: bool | None = None  # None: use the chat template when the model has one
    positions: str | int | None = None  # None: each entry's own (default "all"); see steerlab.spec
    norm_preserve: bool = False
    repetition_penalty: float = REPETITION_PENALTY
    governor: bool | None = None  # None: each entry's own (a vector's default); see steerlab.governor


class _Cancel(StoppingCriteria):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextDeltas:
    """One row's text as it grows: the new part after each token, never half a character.

    The one incremental detokeniser: :func:`stream`, the server's runner and the vLLM runner use it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.sent = ""

    def delta(self, ids: list[int]) -> str:
        """The text added since the last call ('' while a multi-byte character is incomplete)."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def final(self, ids: list[int]) -> tuple[str, str]:
        """(the tail not sent yet, the whole text) once the row is done."""
        text = self.tok.decode(ids, skip_special_tokens=True)
        tail = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent = text
        return tail, text


class _RowStreamer(BaseStreamer):
    """Pushes ``(row, text_delta)`` for every row of a batch as tokens arrive."""

    def __init__(self, tokenizer: Any, rows: int, out: queue.Queue) -> None:
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.texts = [TextDeltas(tokenizer) for _ in range(rows)]
        self.out = out
        self.prompt_seen = False
        self.done = [False] * rows
        self.eos = set(eos_ids(tokenizer))

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        for r, t in enumerate(value.reshape(len(self.ids), -1)[:, -1].tolist()):
            if self.done[r]:
                continue
            if t in self.eos:
                self.done[r] = True
                continue
            self.ids[r].append(t)
            if delta := self.texts[r].delta(self.ids[r]):
                self.out.put((r, delta))

    def end(self) -> None:
        pass


def eos_ids(tok: Any) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS and the chat templates' end-of-turn tokens."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    for special in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        tid = tok.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid is not None:
            ids.add(tid)
    return sorted(ids)


def governor_for(lm: LoadedModel, resolved: Sequence[Sequence[Resolved]], n_rows: int) -> Governor | None:
    """A governor for the rows with an entry it governs (:attr:`Resolved.governed`; None when no row has one)."""
    rows = resolved if len(resolved) == n_rows else [resolved[0]] * n_rows
    governed = [any(r.governed for r in row) for row in rows]
    if not any(governed):
        return None
    measured = [r.steer.vector.extra.get("base_entropy") for row in rows for r in row if r.governed]
    base = next((float(e) for e in measured if e is not None), None)
    return Governor.for_model(governed, base, device=lm.device, dtype=lm.dtype)


@contextmanager
def steering_session(lm: LoadedModel, resolved: Sequence[Sequence[Resolved]], n_rows: int, kwargs: dict,
                     report: dict | None = None, resume: bool = False
                     ) -> Iterator[tuple[Governor | None, TextGate | None]]:
    """Steering hooks for one ``model.generate`` call, with the governor and text conditions it needs.

    Adds their logits processors to ``kwargs``; ``report["live"]`` / ``report["gate"]`` get them
    while they run. The gate's watch hooks are entered first, so they read before steering.
    ``resume``: a later slice of the same batch (:mod:`steerlab.server.slices`): keep the gate of
    ``report`` with what it has read so far.
    """
    gov = governor_for(lm, resolved, n_rows)
    gate = (report or {}).get("gate") if resume else None
    gate = gate or text_gate_for(lm, resolved, n_rows, eos_ids(lm.tokenizer))
    procs = [p for p in (gov, gate) if p is not None]
    if procs:
        kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), *procs])
    if report is not None:
        report.update({k: v for k, v in (("live", gov), ("gate", gate)) if v is not None})
    with gate.watching() if gate is not None else nullcontext(), \
            steer(lm, resolved, gain=gov.gain if gov else None, gate=gate.gate if gate else None):
        yield gov, gate  # the caller generates through run_generate (the CPU matmul context)


def generation_kwargs(lm: LoadedModel, opts: GenerationOptions) -> dict:
    """``model.generate`` settings for ``opts`` (sampling, eos ids, repetition penalty)."""
    sample = opts.temperature > 0
    kwargs = dict(
        max_new_tokens=opts.max_new_tokens,
        do_sample=sample,
        pad_token_id=lm.tokenizer.pad_token_id,
        eos_token_id=eos_ids(lm.tokenizer),
        repetition_penalty=opts.repetition_penalty,
    )
    if sample:
        kwargs.update(temperature=opts.temperature, top_p=opts.top_p, top_k=0)
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def run_generate(lm: LoadedModel, **kwargs: Any) -> Any:
    """The one call of ``model.generate`` (every generation path comes here): inside the CPU
    decode-matmul context, which is measured once per model (:mod:`steerlab.cpu_matmul`), and
    through the compiled decode step where the model has one (:mod:`steerlab.compiled`).
    Steering contexts wrap this call; ``kwargs`` are ``model.generate``'s (see :func:`generation_kwargs`)."""
    ids = kwargs.get("input_ids")
    kwargs = {**kwargs, **generate_settings(lm, kwargs, ids.shape[-1] if ids is not None else 0)}
    with decode_matmuls(lm):
        return lm.model.generate(**kwargs)  # type: ignore[operator]  # PreTrainedModel's stub lacks GenerationMixin


def encode_prompts(lm: LoadedModel, prompts: Sequence[str], chat: bool | None) -> dict[str, torch.Tensor]:
    """Format (chat template or raw) and left-pad a batch of prompts."""
    use_chat = lm.has_chat_template if chat is None else chat
    texts = [lm.format_prompt(p, chat=use_chat) for p in prompts]
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                       add_special_tokens=not use_chat)
    return {k: v.to(lm.device) for k, v in enc.items()}


@torch.no_grad()
def generate(
    lm: LoadedModel,
    prompts: str | Sequence[str],
    steering: Sequence[RowSteering] | RowSteering | None = None,
    *,
    options: GenerationOptions | None = None,
    streamer: BaseStreamer | None = None,
    cancel: threading.Event | None = None,
    report: dict | None = None,
) -> list[str]:
    """Generate one completion per prompt in a single batch.

    ``steering``: None; one list of vectors/doses for every row; or one list per row.
    ``report``: a dict to fill with what was applied per row (``"steering"``), whether each
    condition fired (``"conditions"``, entries with ``Steer(when=)``) and, when the governor ran,
    its per-row summary and per-token gains (``"governor"``, ``"gains"``).
    """
    opts = options or GenerationOptions()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        return []
    rows = steering_rows(steering, len(prompts))
    enc = encode_prompts(lm, prompts, opts.chat)
    if opts.seed is not None:
        torch.manual_seed(opts.seed)
    kwargs = generation_kwargs(lm, opts)
    if cancel is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([_Cancel(cancel)])
    resolved = resolve_rows(rows, lm.n_layers, positions=opts.positions, governor=opts.governor,
                            operator="add_norm" if opts.norm_preserve else None)
    outcomes: list[list[dict]] = [[] for _ in prompts]
    if condition_vectors(resolved):  # one reading pass over the prompts decides prompt conditions
        resolved, outcomes = decide(lm, prompts, resolved if len(resolved) == len(prompts) else resolved * len(prompts))
    live: dict = report if report is not None else {}
    with steering_session(lm, resolved, len(prompts), kwargs, live) as (gov, gate):
        out = run_generate(lm, **enc, streamer=streamer, **kwargs)
    if report is not None:
        report["steering"] = [[r.describe() for r in row] for row in resolved]
        if gate is not None:
            outcomes = [a + b for a, b in zip(outcomes, gate.summary())]
        if any(outcomes):
            report["conditions"] = outcomes
        if gov is not None:
            report["governor"], report["gains"] = gov.summary(), gov.gains
    new = out[:, enc["input_ids"].shape[1] :]
    return [lm.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]


def compare(
    lm: LoadedModel,
    prompt: str,
    steering: RowSteering,
    *,
    options: GenerationOptions | None = None,
) -> tuple[str, str]:
    """Base and steered completion of one prompt, as one two-row batch."""
    base, steered = generate(lm, [prompt, prompt], [[], list(steering)], options=options)
    return base, steered


def stream(
    lm: LoadedModel,
    prompts: Sequence[str],
    steering: Sequence[RowSteering] | RowSteering | None = None,
    *,
    options: GenerationOptions | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[tuple[int, str]]:
    """Yield ``(row, text_delta)`` as tokens are generated (generation runs in a thread).

    Closing the iterator early cancels the generation.
    """
    q: queue.Queue = queue.Queue()
    cancel = cancel or threading.Event()
    streamer = _RowStreamer(lm.tokenizer, len(prompts), q)
    done = object()
    error: list[BaseException] = []

    def work() -> None:
        try:
            generate(lm, prompts, steering, options=options, streamer=streamer, cancel=cancel)
        except BaseException as exc:  # re-raised in the consumer
            error.append(exc)
        finally:
            q.put(done)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            yield item
    finally:
        cancel.set()
        thread.join()
    if error:
        raise error[0]
