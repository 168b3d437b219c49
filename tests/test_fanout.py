"""The Ray fan-out every stage uses: results in item order, at most ``limit`` items in flight,
a task's UserError raised as the caller's own, nothing submitted after a failure, and no
cancellation that could abort Ray's core worker (the process survives a failed fan-out)."""

from __future__ import annotations

import sys

import pytest

from pipeline.fanout import fan_out
from shards.errors import DataError


@pytest.fixture
def ray_local(ray_local):
    """The session's local Ray, with this module's task functions sent by value (its workers
    cannot import a test module)."""
    ray_local.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray_local
    ray_local.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _square(x: int) -> int:
    import time

    time.sleep(0.05 * (x % 3))  # finish out of order
    return x * x


def _fail_on(x: int, bad: int, kind: str) -> int:
    if x == bad:
        raise DataError(f"item {x} is bad") if kind == "user" else ZeroDivisionError("boom")
    return x


def test_results_in_item_order_single_refs_and_lists(ray_local):
    ray = ray_local
    sq = ray.remote(num_cpus=0.5)(_square)
    assert fan_out(list(range(8)), lambda x: sq.remote(x), limit=4, desc="t") == [x * x for x in range(8)]
    pairs = fan_out([1, 2, 3], lambda x: [sq.remote(x), sq.remote(x + 10)], limit=2, desc="t")
    assert pairs == [[1, 121], [4, 144], [9, 169]]


def test_at_most_limit_items_in_flight(ray_local):
    ray = ray_local
    sq = ray.remote(num_cpus=0.5)(_square)
    submitted: list = []

    def submit(x: int):
        if submitted:  # limit 1: the previous item is finished before the next is submitted
            ready, _ = ray.wait([submitted[-1]], timeout=0)
            assert ready, f"item {x} submitted while item {x - 1} still runs"
        submitted.append(sq.remote(x))
        return submitted[-1]

    assert fan_out(list(range(5)), submit, limit=1, desc="t") == [0, 1, 4, 9, 16]


@pytest.mark.parametrize("kind", ["user", "other"])
def test_a_failure_stops_the_fan_out(ray_local, kind):
    ray = ray_local
    task = ray.remote(num_cpus=0.5)(_fail_on)
    submitted: list[int] = []

    def submit(x: int):
        submitted.append(x)
        return task.remote(x, 2, kind)

    if kind == "user":
        with pytest.raises(DataError, match="^item 2 is bad$"):
            fan_out(list(range(6)), submit, limit=1, desc="t")
    else:
        with pytest.raises(ray.exceptions.RayTaskError, match="boom"):
            fan_out(list(range(6)), submit, limit=1, desc="t")
    assert submitted == [0, 1, 2]
    # the driver is intact: Ray still runs tasks for it
    assert ray.get(task.remote(7, 2, kind)) == 7
