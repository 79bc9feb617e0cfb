"""Glue between the runner's worker thread and asyncio request handlers.

Owns: handing a job's events to the event loop, waiting for a result with the request's
time limit while watching for the client leaving, server-sent-event framing, and turning
runner failures into HTTP errors. Knows nothing about routes or the model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import HTTPException, Request

from ..errors import SteeringError
from .jobs import Busy, Delta, Done, Engine, Event, Failed, GenJob, JobCancelled, JobTimeout, is_oom, ran_past

POLL_S = 0.5  # how often a waiting handler checks whether its client is still there


class Channel:
    """Events of one job, delivered from the worker thread onto this loop's queue."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is stopping, nobody listens
            pass


def submit(runner: Engine, job: GenJob) -> None:
    """Queue ``job``; a full queue becomes 503 with Retry-After."""
    try:
        runner.submit(job)
    except Busy as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from None


OOM_MESSAGE = ("out of memory while generating: lower max_length / max_tokens or send fewer requests at once; "
               "if it persists, restart with a smaller --max-batch, a smaller --dtype (bfloat16/float16) "
               "or --device cpu")


def http_error(error: BaseException) -> HTTPException:
    """A runner failure as the HTTP error a client should see."""
    if isinstance(error, Busy):
        return HTTPException(503, str(error), headers={"Retry-After": str(error.retry_after)})
    if isinstance(error, JobTimeout):
        return HTTPException(504, str(error))
    if isinstance(error, JobCancelled):
        return HTTPException(499, str(error))
    if isinstance(error, SteeringError):
        return HTTPException(400, str(error))
    if is_oom(error):
        return HTTPException(503, OOM_MESSAGE, headers={"Retry-After": "5"})
    message = str(error)
    if len(message) > 300:
        message = message[:300] + "..."
    return HTTPException(500, f"generation failed: {type(error).__name__}: {message}")


def _timed_out(job: GenJob) -> Failed:
    return Failed(ran_past(job))


async def next_event(job: GenJob, channel: Channel, request: Request, gone: asyncio.Future | None = None) -> Event:
    """The job's next event; cancels the job when its time is up or the client has gone.

    ``gone``: a task that finishes when the client disconnects (non-streaming requests watch
    for it continuously, so a disconnect cancels the job at the next decode step even while
    tokens flow); without it the client is checked after ``POLL_S`` without an event.
    """
    while True:
        left = job.deadline - time.monotonic()
        if left <= 0:
            job.cancel.set()
            return _timed_out(job)
        if gone is None:
            try:
                return await asyncio.wait_for(channel.queue.get(), timeout=min(left, POLL_S))
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel.set()
                    return Failed(JobCancelled("the client disconnected"))
            continue
        if not channel.queue.empty():
            return channel.queue.get_nowait()
        getter = asyncio.ensure_future(channel.queue.get())
        try:
            await asyncio.wait({getter, gone}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled():
            return getter.result()
        if gone.done():
            job.cancel.set()
            return Failed(JobCancelled("the client disconnected"))


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone (the body was read already, so only a disconnect arrives)."""
    while True:
        message = await request.receive()
        if message.get("type") == "http.disconnect":
            return


async def collect(job: GenJob, channel: Channel, request: Request) -> Done:
    """Wait for the job's result (non-streaming requests); failures raise HTTP errors."""
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        while True:
            event = await next_event(job, channel, request, gone)
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise http_error(event.error)
    finally:
        gone.cancel()
        job.cancel.set()  # no-op when done; stops the work if this handler was cancelled


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event frame (``event:`` line omitted when None, as OpenAI streams do)."""
    body = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {body}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def stream_events(job: GenJob, channel: Channel, request: Request, *,
                        first: list[bytes], delta: Callable[[Delta], bytes | None],
                        done: Callable[[Done], list[bytes]], error: Callable[[HTTPException], list[bytes]]
                        ) -> AsyncIterator[bytes]:
    """Frames for a streaming response; the job is cancelled if the client goes away."""
    try:
        for frame in first:
            yield frame
        while True:
            event = await next_event(job, channel, request)
            if isinstance(event, Delta):
                if piece := delta(event):
                    yield piece
            elif isinstance(event, Done):
                for frame in done(event):
                    yield frame
                return
            else:
                if isinstance(event.error, JobCancelled):
                    return
                for frame in error(http_error(event.error)):
                    yield frame
                return
    finally:
        job.cancel.set()
