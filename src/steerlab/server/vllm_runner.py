"""The runner of ``steerlab serve --engine vllm``: each job's rows become vLLM requests.

Same surface as :class:`~steerlab.server.runner.Runner` (start, submit, call, stats,
engine_info, close), so the routes do not know which engine answers. There is no batch to
gather here: vLLM's scheduler runs the rows of all concurrent requests together (continuous
batching, with per-row steering by vllm-lens), so a compare's base and steered rows and
every other client's rows share its batches token by token.

Lives on the server's event loop: ``start()`` (from the app's lifespan) creates the engine,
``submit()`` (from request handlers) starts one task per job. Vector builds (``call``) run on
the transformers model in one worker thread beside generation.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from ..engines.vllm_engine import condition_problem
from ..errors import SteeringError
from ..generate import TextDeltas
from .jobs import Busy, Delta, Done, Failed, GenJob, JobCancelled, RowResult, ran_past

if TYPE_CHECKING:
    from ..engines.vllm_engine import AsyncVLLMEngine, VLLMModel
    from ..models import LoadedModel

WATCH_S = 0.25  # how often a running job checks its client and its deadline


class DeferredModel:
    """The transformers side of a vLLM server: the model's facts now, its weights on first use.

    Routes need only the facts (id, layers, hidden size, tokenizer, chat template), which
    ``facts`` (a :class:`~steerlab.engines.vllm_engine.VLLMModel`) read from the config. Code that
    runs the model (a vector build, a reading) asks for the weights explicitly with
    :meth:`loaded`, which loads them with ``load()`` once (a few seconds for the embedded model; on
    CPU by default, beside vLLM's copy). A :class:`~steerlab.models.ModelInfo`, as is
    :class:`~steerlab.models.LoadedModel`.
    """

    def __init__(self, facts: VLLMModel, load: Callable[[], LoadedModel]) -> None:
        self.model_id: str = facts.model_id
        self.n_layers: int = facts.n_layers
        self.hidden_size: int = facts.hidden_size
        self.tokenizer: Any = facts.tokenizer
        self.has_chat_template: bool = facts.has_chat_template
        self._load = load
        self._lm: LoadedModel | None = None
        self._lock = threading.Lock()

    def loaded(self) -> LoadedModel:
        """The transformers :class:`~steerlab.models.LoadedModel` (loaded on the first call)."""
        with self._lock:
            if self._lm is None:
                self._lm = self._load()
            return self._lm


class VLLMRunner:
    """Hands jobs to an :class:`~steerlab.engines.vllm_engine.AsyncVLLMEngine` made by ``make_engine``."""

    def __init__(self, make_engine: Callable[[], Any], *, max_queue: int = 32) -> None:
        self._make_engine = make_engine
        self.engine: AsyncVLLMEngine | None = None
        self.max_queue = max_queue  # jobs in flight (vLLM queues and batches them) before 503
        self._tasks: set[asyncio.Task] = set()
        self._rows_in_flight = 0
        self._builds = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steerlab-build")
        self._counts: collections.Counter = collections.Counter()
        self._closed = False

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        if self.engine is None:
            self.engine = self._make_engine()

    def shutdown(self) -> None:
        """Refuse new work and stop running jobs (they answer 503); never blocks (a signal handler calls it)."""
        self._closed = True
        for task in list(self._tasks):
            task.get_loop().call_soon_threadsafe(task.cancel)

    def close(self) -> None:
        """Refuse new work, stop running jobs, stop vLLM."""
        self.shutdown()
        self._builds.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.close()

    # ---- submitting ---------------------------------------------------------------------
    def submit(self, job: GenJob) -> None:
        """Start the job (call from the event loop); raise :class:`Busy` past ``max_queue`` jobs.

        Steering is translated first, so bad steering raises here (a 400) before anything runs;
        conditions vLLM cannot honour (on the text) are refused first, whatever the engine object.
        """
        if self._closed or self.engine is None:
            raise Busy("the server is shutting down")
        for row in job.steering:
            for entry in row:
                if (why := condition_problem(entry.steer)) is not None:
                    raise SteeringError(why)
        if len(self._tasks) >= self.max_queue:
            self._counts["refused"] += 1
            raise Busy(f"the server is busy ({len(self._tasks)} requests in flight); try again shortly")
        prepared = [self.engine.prepare(p, row, job.options) for p, row in zip(job.prompts, job.steering, strict=True)]
        task = asyncio.get_running_loop().create_task(self._run(job, prepared))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` (a vector build on the transformers model) in the build thread."""
        if self._closed:
            raise Busy("the server is shutting down")
        self._counts["calls"] += 1
        return self._builds.submit(fn)

    def engine_info(self) -> dict[str, str]:
        engine = self.engine
        return {"engine": "vllm", "device": getattr(engine, "device", "starting"),
                "dtype": getattr(engine, "dtype", "auto")}

    def stats(self) -> dict[str, Any]:
        return {"in_flight": len(self._tasks), "rows_in_flight": self._rows_in_flight,
                "max_queue": self.max_queue, **dict(self._counts)}

    # ---- one job --------------------------------------------------------------------------
    async def _run(self, job: GenJob, prepared: list) -> None:
        started = time.monotonic()
        self._counts["jobs"] += 1
        jobs_together, rows_together = len(self._tasks), self._rows_in_flight + len(prepared)
        self._rows_in_flight += len(prepared)
        results: list[RowResult | None] = [None] * len(prepared)
        first_token: list[float] = []
        base_id = uuid.uuid4().hex
        engine = self.engine
        if engine is None:  # submit() refuses jobs before start()
            raise Busy("the server is starting")

        async def row(r: int) -> None:
            ids: list[int] = []
            text = TextDeltas(engine.tokenizer)
            reason = None
            async for new, finish in engine.stream(prepared[r], f"steerlab-{base_id}-{r}"):
                if new:
                    if not first_token:
                        first_token.append(time.monotonic())
                    ids += new
                    if delta := text.delta(ids):
                        job.emit(Delta(r, delta))
                reason = finish or reason
            tail, whole = text.final(ids)
            if tail:
                job.emit(Delta(r, tail))
            results[r] = RowResult(text=whole.strip(), tokens=len(ids),
                                   prompt_tokens=len(prepared[r][0]["prompt_token_ids"]),
                                   finish_reason="length" if reason == "length" else "stop")

        tasks = [asyncio.create_task(row(r)) for r in range(len(prepared))]
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, timeout=WATCH_S, return_when=asyncio.FIRST_EXCEPTION)
                for t in done:
                    if (failure := t.exception()) is not None:
                        raise failure
                if job.cancel.is_set():
                    self._counts["cancelled"] += 1
                    raise JobCancelled("cancelled by the client")
                if time.monotonic() > job.deadline:
                    self._counts["timed_out"] += 1
                    raise ran_past(job)
            now = time.monotonic()
            job.end(Done(rows=[r for r in results if r is not None], batch_jobs=jobs_together, batch_rows=rows_together,
                         queued_s=started - job.created,
                         first_token_s=first_token[0] - job.created if first_token else None,
                         total_s=now - job.created))
        except asyncio.CancelledError:
            job.end(Failed(Busy("the server is shutting down")))
            raise
        except Exception as exc:  # reported to the client
            job.end(Failed(exc))
        finally:
            for t in tasks:  # cancelling a row's stream aborts its vLLM request
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._rows_in_flight -= len(prepared)
