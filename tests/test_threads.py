"""The CPU thread count: from the user, else from the cores free at start."""

from __future__ import annotations

import pytest

from steerlab import threads


@pytest.mark.parametrize(("cores", "load", "want"), [(2, 0.0, 2), (2, 0.7, 1), (2, 3.2, 1), (16, 5.4, 11), (4, 0.4, 4)])
def test_free_cores_leave_busy_cores_alone(cores, load, want):
    assert threads.free_cores(cores, load) == want


def test_the_user_decides_first(monkeypatch):
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.choose(5) == (5, "--threads")
    assert threads.choose() == (3, threads.ENV)
    monkeypatch.setenv(threads.ENV, "two")
    with pytest.raises(ValueError, match="STEERLAB_THREADS='two': give a whole number"):
        threads.choose()
    monkeypatch.delenv(threads.ENV)
    n, why = threads.choose()
    assert 1 <= n <= threads.usable_cores() and why.endswith("cores free")


def test_apply_sets_torch(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.ENV, "1")
        assert threads.apply() == (1, threads.ENV) and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
