"""Blocks in the batcher (``submit_block``, a packed request's chunks): they run in one
batch beside single steps with the same results, are taken whole, count their sessions,
and give back every row when they fail, expire or are abandoned."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from rnnserve.server.batcher import Batcher, Group
from rnnserve.server.errors import DeadlineExpired, Overloaded
from rnnserve.server.pool import PoolFull
from rnnserve.server.runtime import ModelRegistry, ModelRuntime, RuntimeOptions


@pytest.fixture
def registry(repo):
    return ModelRegistry(repo, RuntimeOptions(device="cpu", intra_op_threads=1,
                                              batch_buckets=(4, 8)))


def _rows(rt: ModelRuntime, states: list[list[np.ndarray]]) -> list[int]:
    rows = [rt.pool.alloc() for _ in states]
    for row, state in zip(rows, states, strict=True):
        rt.pool.write(row, state)
    return rows


def _states(rt: ModelRuntime, rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    return [[rng.standard_normal(a.shape).astype(a.dtype) for a in rt.zero_state()]
            for _ in range(n)]


@pytest.mark.parametrize("size", [4, 7, 10])  # a bucket, padded to one, beyond them
def test_blocks_and_single_steps_in_one_run_match_runs_of_their_own(registry, size) -> None:
    rt = registry.get("feat")
    rng = np.random.default_rng(51)
    xs = rng.standard_normal((size, 5, 20)).astype(np.float32)
    states = _states(rt, rng, size)
    want_out, want_states = rt.run(list(xs), states)
    runs: list[int] = []
    real = rt.run_rows

    def counting(xs_, rows, *args):
        runs.append(len(rows))
        return real(xs_, rows, *args)

    rt.run_rows = counting  # type: ignore[method-assign]

    async def main():
        batcher = Batcher(rt, max_batch_size=16, max_delay_s=0.05)
        batcher.start()
        rows = _rows(rt, states)
        group = Group()
        cut = size // 3  # a single step, a block, a single step, a block
        single = batcher.submit(rows[0], xs[0])
        first = batcher.submit_block(rows[1:cut + 1], xs[1:cut + 1], None, group)
        other = batcher.submit(rows[cut + 1], xs[cut + 1])
        second = batcher.submit_block(rows[cut + 2:], xs[cut + 2:], None, group)
        assert batcher.queue_depth == size
        await asyncio.gather(single, other, group.future)
        await batcher.stop()
        return rows, single.result(), first.result(), other.result(), second.result()

    try:
        rows, single, first, other, second = asyncio.run(main())
    finally:
        del rt.run_rows
    assert runs == [size]  # one run for all of them
    got_out = [single[0][0], *first[0][0], other[0][0], *second[0][0]]
    new_rows = [single[1], *first[1], other[1], *second[1]]
    assert len(set(new_rows) | set(rows)) == 2 * size  # fresh rows, the old ones intact
    for got, want in zip(got_out, want_out, strict=True):
        assert np.abs(got - want[0]).max() <= 1e-5
    for row, old, want in zip(new_rows, rows, want_states, strict=True):
        for got, w in zip(rt.pool.read([row]), want, strict=True):
            assert np.abs(got[0] - w).max() <= 1e-5
        assert rt.pool.read([old])[0].any()  # not overwritten
    for row in rows + new_rows:
        rt.pool.free(row)
    assert rt.pool.used == 0


def test_a_block_is_taken_whole_and_counts_its_sessions(registry) -> None:
    """A block larger than what is left of a batch waits for the next one (never split
    across runs); a block larger than a batch runs alone; the queue bound counts a
    block's sessions."""
    rt = registry.get("feat")
    x = np.zeros((12, 2, 20), np.float32)
    sizes: list[int] = []

    async def main():
        batcher = Batcher(rt, max_batch_size=8, max_delay_s=0.02, max_queue=24,
                          on_batch=lambda waits, s: sizes.append(len(waits)))
        group = Group()
        a = batcher.submit_block([0] * 5, x[:5], None, group)
        b = batcher.submit_block([0] * 5, x[:5], None, group)  # 10 > 8: next batch
        c = batcher.submit_block([0] * 12, x, None, group)  # more than a batch: alone
        with pytest.raises(Overloaded, match="22 steps queued .at most 24."):
            batcher.submit_block([0] * 3, x[:3], None, group)  # 25 > 24
        batcher.start()
        await group.future
        await batcher.stop()
        return [s.result()[1] for s in (a, b, c)]

    for rows in asyncio.run(main()):
        for row in rows:
            rt.pool.free(row)
    assert sizes == [5, 5, 12]
    assert rt.pool.used == 0


def test_a_block_that_expires_fails_or_is_abandoned_gives_back_every_row(registry) -> None:
    rt = registry.get("feat")
    pool = rt.pool
    x = np.zeros((3, 2, 20), np.float32)

    async def main():
        batcher = Batcher(rt, max_batch_size=8, max_delay_s=0.1)
        batcher.start()
        rows = _rows(rt, _states(rt, np.random.default_rng(52), 3))
        group = Group()
        expired = batcher.submit_block(rows, x, time.perf_counter() + 0.01, group)
        await group.future
        assert isinstance(expired.exception(), DeadlineExpired)
        # abandoned before it runs: never runs, its rows unpinned
        group = Group()
        gone = batcher.submit_block(rows, x, None, group)
        batcher.abandon(gone)
        # abandoned after it ran: its new rows freed
        group = Group()
        ran = batcher.submit_block(rows, x, None, group)
        await group.future
        batcher.abandon(ran)
        await batcher.stop()
        return rows

    rows = asyncio.run(main())
    assert pool.used == 3  # only the three rows the test holds
    for row in rows:
        pool.free(row)


def test_a_block_that_finds_too_few_rows_fails_whole(repo) -> None:
    rt = ModelRuntime(repo / "feat" / "1" / "model.onnx", "feat", 1,
                      RuntimeOptions(device="cpu", intra_op_threads=1))
    rt.pool.growable = False
    held = [rt.pool.alloc() for _ in range(rt.pool.capacity - 2 - 2)]  # 2 rows left
    x = np.zeros((3, 2, 20), np.float32)

    async def main():
        batcher = Batcher(rt, max_batch_size=8, max_delay_s=0.0)
        batcher.start()
        group = Group()
        block = batcher.submit_block([0, 0, 0], x, None, group)
        await group.future
        await batcher.stop()
        return block

    block = asyncio.run(main())
    assert isinstance(block.exception(), PoolFull)
    assert rt.pool.used == len(held)  # the two rows it took are back
