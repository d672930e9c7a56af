"""A batch split into chunk-length groups that run one after another: what holds for
a step of a later group (its deadline, the metrics of the run it is in)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rnnserve.server.batcher import Batcher
from rnnserve.server.errors import DeadlineExpired
from rnnserve.server.pool import ZERO
from rnnserve.server.runtime import ModelRuntime, RuntimeOptions


@pytest.fixture
def slow_feat(repo):
    """feat v1 whose runs take 0.3 s each (on top of the real run)."""
    rt = ModelRuntime(repo / "feat" / "1" / "model.onnx", "feat", 1,
                      RuntimeOptions(device="cpu", intra_op_threads=1))
    real = rt.run_rows
    ran: list[int] = []

    def slow(xs, *args, **kw):
        time.sleep(0.3)
        ran.append(len(xs))
        return real(xs, *args, **kw)

    rt.run_rows = slow  # type: ignore[method-assign]
    rt.ran = ran  # type: ignore[attr-defined]
    return rt


def _x(t: int) -> np.ndarray:
    return np.zeros((t, 20), np.float32)


def test_a_step_whose_deadline_passes_while_an_earlier_group_runs_never_runs(
        slow_feat) -> None:
    """README: a chunk with its own timeout that has not run by then fails with
    DEADLINE_EXCEEDED, its session unchanged. A step of the batch's second group whose
    deadline came while the first group ran was run all the same."""
    rt = slow_feat
    pool = rt.pool

    async def main():
        batcher = Batcher(rt, max_batch_size=16, max_delay_s=0.05)
        batcher.start()
        first = batcher.submit(ZERO, _x(1))  # group T=1: runs 0.3 s
        late = batcher.submit(ZERO, _x(2), expires=time.perf_counter() + 0.15)
        await asyncio.wait([first, late], timeout=5)
        await batcher.stop()
        return first, late

    first, late = asyncio.run(main())
    pool.free(first.result()[1])
    assert isinstance(late.exception(), DeadlineExpired), late.exception()
    assert rt.ran == [1]  # the late step never ran
    assert pool.used == 0 and not pool._pins


def test_the_batch_metrics_count_only_the_steps_that_ran(slow_feat) -> None:
    """rnnserve_batch_size is 'session steps in one onnxruntime run' and queue_wait one
    observation per step that started: a step given up while an earlier group of its
    batch ran is in neither."""
    rt = slow_feat
    pool = rt.pool
    seen: list[int] = []

    async def main():
        batcher = Batcher(rt, max_batch_size=16, max_delay_s=0.05,
                          on_batch=lambda waits, s: seen.append(len(waits)))
        batcher.start()
        first = batcher.submit(ZERO, _x(1))
        stay = batcher.submit(ZERO, _x(2))
        gone = batcher.submit(ZERO, _x(2))
        await asyncio.sleep(0.15)  # group T=1 runs
        batcher.abandon(gone)
        await asyncio.wait([first, stay], timeout=5)
        await batcher.stop()
        return first, stay

    first, stay = asyncio.run(main())
    for f in (first, stay):
        pool.free(f.result()[1])
    assert rt.ran == [1, 1]
    assert seen == [1, 1], seen
    assert pool.used == 0 and not pool._pins
