"""One request must not starve the others: scheduling order, batch token budget, per-step
time limits, cancelling a non-streaming request when its client leaves, and honest counters.

A forward pre-hook that sleeps makes the tiny model slow (a known time per decode step), so
"within one step" can be measured without a real model.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from types import SimpleNamespace
from urllib.parse import urlsplit

import httpx
import pytest

from steerlab import GenerationOptions
from steerlab.server import ServerSettings, create_app
from helpers import serve_in_thread
from steerlab.server.runner import Delta, Done, Failed, GenJob, JobTimeout, Runner
from steerlab.store import VectorStore

from helpers import SLOW_STEP_S as STEP_S  # noqa: E402



def _job(prompt: str, n: int, penalty: float = 1.2, timeout_s: float = 60.0, tokens: int = 4):
    events: queue.Queue = queue.Queue()
    opts = GenerationOptions(max_new_tokens=n, chat=False, repetition_penalty=penalty)

    def emit(ev):  # noqa: ANN001, ANN202
        events.put((time.monotonic(), ev))

    return GenJob(prompts=[prompt], steering=[[]], options=opts, emit=emit, timeout_s=timeout_s,
                  prompt_tokens=tokens), events


def _end(events: queue.Queue) -> tuple[float, Done | Failed, float | None]:
    """(when it ended, how, when its first token came)."""
    first = None
    while True:
        t, ev = events.get(timeout=60)
        if isinstance(ev, Delta):
            first = first or t
        else:
            return t, ev, first


def _hold(runner: Runner) -> threading.Event:
    gate, running = threading.Event(), threading.Event()
    runner.call(lambda: (running.set(), gate.wait(30)))
    assert running.wait(10)
    return gate


def test_short_jobs_overtake_a_long_one_that_arrived_first(slow_lm):
    runner = Runner(slow_lm, max_queue=8, batch_wait_s=0.0)
    runner.start()
    try:
        gate = _hold(runner)
        long_job, long_events = _job("the cat sat", 60, penalty=1.3)  # another batch key: it cannot share a batch
        runner.submit(long_job)
        shorts = []
        for i in range(3):
            job, events = _job(f"money saved {i}", 2)
            runner.submit(job)
            shorts.append(events)
        gate.set()
        long_end, long_result, long_first = _end(long_events)
        short_ends = [_end(e) for e in shorts]
        assert isinstance(long_result, Done) and all(isinstance(r, Done) for _, r, _ in short_ends)
        # every short request was answered before the long one produced its first token
        assert max(t for t, _, _ in short_ends) < long_first < long_end
    finally:
        runner.close()


def test_a_long_prompt_does_not_pad_a_whole_batch(slow_lm):
    runner = Runner(slow_lm, max_queue=8, batch_wait_s=0.0, max_batch_tokens=64)
    runner.start()
    try:
        gate = _hold(runner)
        long_job, long_events = _job("the cat sat on the mat " * 8, 2, tokens=50)
        short_job, short_events = _job("the cat", 2, tokens=3)
        other_job, other_events = _job("the dog", 2, tokens=3)
        for j in (long_job, short_job, other_job):
            runner.submit(j)
        gate.set()
        results = [_end(e)[1] for e in (long_events, short_events, other_events)]
        assert results[0].batch_rows == 1  # 2 rows x 50 tokens > 64: the long prompt runs alone
        assert results[1].batch_rows == results[2].batch_rows == 2  # the two short ones share a batch
    finally:
        runner.close()


def test_the_time_limit_holds_inside_generation(slow_lm):
    runner = Runner(slow_lm, max_queue=8, batch_wait_s=0.0)
    runner.start()
    try:
        job, events = _job("the cat sat", 200, timeout_s=0.6)  # 200 steps would take ~6 s
        t0 = time.monotonic()
        runner.submit(job)
        end, result, _ = _end(events)
        assert isinstance(result, Failed) and isinstance(result.error, JobTimeout)
        assert end - t0 < 0.6 + 5 * STEP_S
        for _ in range(100):
            if not runner.stats()["busy"]:
                break
            time.sleep(0.01)
        assert time.monotonic() - t0 < 0.6 + 10 * STEP_S and runner.stats()["timed_out"] == 1
    finally:
        runner.close()


@pytest.fixture(scope="module")
def server(slow_lm, tmp_path_factory):
    store = VectorStore(tmp_path_factory.mktemp("fair-vectors"), slow_lm)
    app = create_app(slow_lm, store, ServerSettings(batch_wait_s=0.0))
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(url=url, client=client, runner=app.state.studio.runner)


def _wait_idle(runner: Runner, timeout: float = 30) -> float:
    t0 = time.monotonic()
    while runner.stats()["busy"] or runner.stats()["pending"]:
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"the worker stayed busy: {runner.stats()}")
        time.sleep(0.005)
    return time.monotonic()


def test_a_non_streaming_request_stops_within_a_step_of_its_client_leaving(server):
    before = server.runner.stats()["cancelled"]
    u = urlsplit(server.url)
    body = b'{"prompt": "the cat sat", "max_length": 200, "chat": false, "temperature": 0}'
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        for _ in range(200):  # tokens flow: the worker is generating
            if server.runner.stats()["busy"]:
                break
            time.sleep(0.01)
        time.sleep(0.3)
        assert server.runner.stats()["busy"]
        left = time.monotonic()
    stopped = _wait_idle(server.runner)
    # ~190 steps were left (~6 s); it stops within a few steps of the disconnect
    assert stopped - left < 0.2 + 5 * STEP_S, stopped - left
    assert server.runner.stats()["cancelled"] == before + 1


def test_answered_requests_are_not_counted_as_cancelled(server):
    before = server.runner.stats()
    for stream in (False, True, False):
        r = server.client.post("/generate", json={"prompt": "the cat", "max_length": 2, "chat": False,
                                                  "temperature": 0, "stream": stream})
        assert r.status_code == 200
    _wait_idle(server.runner)
    after = server.runner.stats()
    assert after["cancelled"] == before["cancelled"] and after["jobs"] == before.get("jobs", 0) + 3
    health = server.client.get("/health").json()["runner"]
    assert health["cancelled"] == after["cancelled"]


@pytest.mark.parametrize("positions", ["all", "generated"])
def test_a_running_long_batch_yields_to_a_short_job_and_resumes_exactly(slow_lm, positions):
    from helpers import random_vector

    from steerlab import Steer

    vec = random_vector(slow_lm, [1, 2], strength=3.0)
    runner = Runner(slow_lm, max_queue=8, batch_wait_s=0.0, slice_s=0.2)
    runner.start()
    try:
        def long_job():  # noqa: ANN202
            events: queue.Queue = queue.Queue()
            opts = GenerationOptions(max_new_tokens=60, chat=False, positions=positions)
            return GenJob(prompts=["the cat sat", "toronto has"], steering=[[Steer(vec)], []], options=opts,
                          emit=lambda ev: events.put((time.monotonic(), ev)), prompt_tokens=4), events

        job, events = long_job()
        runner.submit(job)
        _, alone, _ = _end(events)  # the reference: the same batch with nobody waiting
        assert runner.stats().get("yielded", 0) == 0 and alone.rows[0].tokens == 60
        job, events = long_job()
        runner.submit(job)
        time.sleep(0.6)  # ~20 steps in: a short job arrives (another batch key: it cannot join)
        short, short_events = _job("money saved", 2, penalty=1.3)
        sent = time.monotonic()
        runner.submit(short)
        short_end, short_result, _ = _end(short_events)
        long_end, resumed, _ = _end(events)
        assert isinstance(short_result, Done) and short_end < long_end
        # it waited at most about one slice, not the ~40 steps the long batch had left
        assert short_end - sent < 0.2 + 8 * STEP_S, short_end - sent
        assert runner.stats()["yielded"] >= 1 and runner.stats()["resumed"] >= 1
        assert [r.text for r in resumed.rows] == [r.text for r in alone.rows]  # same tokens as in one go
        assert [r.tokens for r in resumed.rows] == [r.tokens for r in alone.rows]
    finally:
        runner.close()


def test_a_long_prompt_yields_between_prefill_chunks_with_the_same_tokens(slow_lm, monkeypatch):
    from steerlab.server import slices

    monkeypatch.setattr(slices, "PREFILL_CHUNK", 8)  # 8-token chunks: the tiny model's prompts are short
    runner = Runner(slow_lm, max_queue=8, batch_wait_s=0.0, slice_s=0.1)
    runner.start()
    try:
        prompt = "the cat sat on the mat and purred in the warm sun " * 6  # ~70 tokens: ~9 chunks
        job, events = _job(prompt, 40, tokens=70)
        runner.submit(job)
        _, alone, _ = _end(events)
        job, events = _job(prompt, 40, tokens=70)
        runner.submit(job)
        time.sleep(0.15)  # inside the chunked prefill
        short, short_events = _job("money saved", 2, penalty=1.3)
        runner.submit(short)
        short_end, _, _ = _end(short_events)
        long_end, resumed, long_first = _end(events)
        assert short_end < long_first  # answered before the long prompt's first token
        assert runner.stats()["yielded"] >= 1
        assert resumed.rows[0].text == alone.rows[0].text
    finally:
        runner.close()


def test_a_short_job_is_not_held_back_by_the_long_job_it_shares_a_batch_with(slow_lm):
    """The probe's 504s: a short request batched with a long (abandoned) one was paused with it and
    ranked as the long one, so newer requests kept overtaking it. A batch ranks as its most urgent job."""
    runner = Runner(slow_lm, max_queue=64, batch_wait_s=0.0, slice_s=0.1)
    runner.start()
    try:
        gate = _hold(runner)
        short, short_events = _job("the cat sat", 12)
        long_job, _ = _job("money saved", 200)  # the same batch key: they share a batch
        runner.submit(short)
        runner.submit(long_job)
        gate.set()
        t0 = time.monotonic()
        others = []
        while short_events.empty() or not any(isinstance(e, (Done, Failed)) for _, e in list(short_events.queue)):
            if time.monotonic() - t0 > 10:
                break
            job, ev = _job(f"other {len(others)}", 4, penalty=1.3)  # a stream of short jobs of another key
            runner.submit(job)
            others.append(ev)
            time.sleep(0.05)
        end, result, _ = _end(short_events)
        assert isinstance(result, Done) and result.rows[0].tokens == 12
        assert end - t0 < 2.5, end - t0  # ~12 steps of its own plus a few overtaking jobs, not 200 steps
        long_job.cancel.set()
    finally:
        runner.close()
