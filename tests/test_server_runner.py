"""The runner without HTTP: batching, per-job limits, cancellation, exclusive calls."""

from __future__ import annotations

import queue
import threading

import pytest
from helpers import random_vector

from steerlab import GenerationOptions, Steer, generate
from steerlab.extract import build_vector
from steerlab.server.runner import Busy, Delta, Done, Failed, GenJob, JobCancelled, Runner, batch_key

GREEDY = GenerationOptions(max_new_tokens=8, chat=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # shared cores: see conftest


@pytest.fixture
def runner(tiny_lm):
    r = Runner(tiny_lm, max_queue=8, max_batch_rows=8, batch_wait_s=0.01)
    r.start()
    yield r
    r.close()


def job(prompts, steering, options=GREEDY) -> tuple[GenJob, queue.Queue]:
    q: queue.Queue = queue.Queue()
    return GenJob(prompts=prompts, steering=steering, options=options, emit=q.put), q


def result(q: queue.Queue) -> Done | Failed:
    while True:
        ev = q.get(timeout=60)
        if not isinstance(ev, Delta):
            return ev


def hold(runner: Runner) -> threading.Event:
    gate, running = threading.Event(), threading.Event()
    runner.call(lambda: (running.set(), gate.wait(30)))
    assert running.wait(10)
    return gate


def test_jobs_waiting_together_run_as_one_batch_with_their_own_steering(runner, tiny_lm):
    vec = random_vector(tiny_lm, [1, 2], strength=3.0)
    specs = [(["the cat sat"], [[]], 3), (["the cat sat", "the cat sat"], [[], [Steer(vec)]], 8),
             (["money saved"], [[Steer(vec, strength=-2.0)]], 5)]
    # Reference runs first: once the worker runs, only the worker may touch the model.
    alone = [generate(tiny_lm, p, s, options=GenerationOptions(max_new_tokens=n, chat=False)) for p, s, n in specs]
    gate = hold(runner)
    jobs = []
    for prompts, steering, n in specs:
        jobs.append(job(prompts, steering, GenerationOptions(max_new_tokens=n, chat=False)))
        runner.submit(jobs[-1][0])
    gate.set()
    done = [result(q) for _, q in jobs]
    assert all(isinstance(d, Done) and (d.batch_jobs, d.batch_rows) == (3, 4) for d in done)
    for (_, _, n), d, ref in zip(specs, done, alone, strict=True):
        assert [r.text for r in d.rows] == ref
        assert all(r.tokens <= n for r in d.rows)
    assert runner.stats()["recent_batches"][-1] == {"jobs": 3, "rows": 4}


def test_deltas_add_up_to_the_text(runner, tiny_lm):
    j, q = job(["the future of technology is"], [[]], GenerationOptions(max_new_tokens=12, chat=False))
    runner.submit(j)
    deltas = []
    while not isinstance(ev := q.get(timeout=60), Done):
        deltas.append(ev.text)
    assert "".join(deltas).strip() == ev.rows[0].text and ev.rows[0].finish_reason in ("stop", "length")


def test_batch_keys():
    assert batch_key(GREEDY) == batch_key(GenerationOptions(max_new_tokens=99, chat=False, seed=5))
    assert batch_key(GenerationOptions(temperature=0.7, seed=1)) is None  # a seeded sample runs alone
    assert batch_key(GenerationOptions(temperature=0.7)) != batch_key(GenerationOptions(temperature=0.8))


def test_cancel_and_queue_bound_and_close(tiny_lm):
    runner = Runner(tiny_lm, max_queue=2, batch_wait_s=0)
    runner.start()
    gate = hold(runner)
    a, qa = job(["a"], [[]])
    b, qb = job(["b"], [[]])
    runner.submit(a)
    runner.submit(b)
    with pytest.raises(Busy) as info:
        runner.submit(job(["c"], [[]])[0])
    assert info.value.retry_after >= 1
    a.cancel.set()  # a cancelled job no longer takes a place in the queue
    c, qc = job(["c"], [[]])
    runner.submit(c)
    gate.set()
    assert isinstance(result(qa).error, JobCancelled)
    assert isinstance(result(qb), Done) and isinstance(result(qc), Done)
    gate = hold(runner)
    d, qd = job(["d"], [[]])
    runner.submit(d)
    threading.Timer(0.2, gate.set).start()
    runner.close()
    assert isinstance(result(qd).error, Busy)
    with pytest.raises(Busy):
        runner.submit(job(["e"], [[]])[0])


def test_calls_run_on_the_worker_between_batches(runner):
    j, q = job(["the cat sat"], [[]], GenerationOptions(max_new_tokens=20, chat=False))
    runner.submit(j)
    seen = runner.call(lambda: (threading.current_thread().name, j.finished)).result(60)
    assert seen == ("steerlab-runner", True)
    with pytest.raises(ZeroDivisionError):
        runner.call(lambda: 1 / 0).result(60)
    assert isinstance(result(q), Done)


def test_build_progress_callback(tiny_lm):
    calls = []
    build_vector(tiny_lm, ["a cat", "the cat sat", "cats purr"], ["a car", "the man sat"], layers=[1], batch_size=2,
                 progress=False, on_progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (3, 5), (5, 5)]
