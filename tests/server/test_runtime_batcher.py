"""The serving core on real onnxruntime sessions of exported models."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from rnnserve.server.batcher import Batcher, Group
from rnnserve.server.errors import (
    BatchFailed,
    DeadlineExpired,
    DeviceUnavailable,
    InvalidChunk,
    ModelNotFound,
    Overloaded,
)
from rnnserve.server.pool import ZERO, PoolState
from rnnserve.server.runtime import ModelRegistry, RuntimeOptions
from rnnserve.server.sessions import MemorySessionStore

from .binding import warm_up_runs


@pytest.fixture(scope="module")
def registry(repo):
    return ModelRegistry(repo, RuntimeOptions(device="cpu", intra_op_threads=1))


def test_registry_serves_the_highest_version_and_names_what_exists(registry) -> None:
    assert [m.key for m in registry] == [("feat", 1), ("text", 1), ("text", 2)]
    assert registry.get("text").version == 2
    assert registry.get("text", 1).version == 1
    with pytest.raises(ModelNotFound, match=r"model 'nope' not found; available: \['feat', "):
        registry.get("nope")
    with pytest.raises(ModelNotFound, match=r"no version 9; available: \[1, 2\]"):
        registry.get("text", 9)
    assert all(m.provider == "CPUExecutionProvider" for m in registry)


def test_demanding_cuda_without_it_is_a_clear_error(repo) -> None:
    try:
        ModelRegistry(repo, RuntimeOptions(device="cuda"))
    except DeviceUnavailable as exc:
        assert "cuda" in str(exc).lower()
    else:
        pytest.skip("this machine really has CUDA for onnxruntime")


def test_chunks_are_checked_against_the_metadata(registry) -> None:
    text, feat = registry.get("text"), registry.get("feat")
    with pytest.raises(InvalidChunk, match="takes uint8 input"):
        text.check_chunk(np.zeros(4, dtype=np.int64))
    with pytest.raises(InvalidChunk, match=r"chunks shaped \['time', 20\]"):
        feat.check_chunk(np.zeros((4, 21), dtype=np.float32))
    with pytest.raises(InvalidChunk, match="empty chunk"):
        text.check_chunk(np.zeros(0, dtype=np.uint8))
    with pytest.raises(InvalidChunk, match="NaN"):
        feat.check_chunk(np.full((2, 20), np.nan, dtype=np.float32))


def _whole(runtime, x):
    outs, states = runtime.run([x], [runtime.zero_state()])
    return outs[0][0], states[0]


async def _stream(batcher, store, runtime, x, cuts):
    session = store.create(runtime.name, runtime.version, PoolState(runtime.pool))
    ys = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        chunk = runtime.check_chunk(x[a:b])
        outs, new_row, _ = await batcher.step(store.get(session.id).state.row, chunk)
        store.update(session, PoolState(runtime.pool, new_row), session.next_seq + 1)
        ys.append(outs[0])
        await asyncio.sleep(random.random() * 0.002)  # interleave sessions differently
    return np.concatenate(ys), session


def test_warm_up_prepares_each_runner_thread_and_batches_run_only_there(repo) -> None:
    """onnxruntime's CUDA provider keeps a captured CUDA graph with the thread that
    captured it: with graphs, warm-up runs every batch size on each runner thread (here
    asked for on the CPU, which has no graphs), and the batches run on those threads
    alone (a pool of threads could start fresh ones); without, on one runner thread."""
    runtime = ModelRegistry(repo, RuntimeOptions(device="cpu", intra_op_threads=1,
                                                 batch_buckets=(2, 4, 8))).get("feat")
    threads: list[str] = []
    run_rows = runtime.run_rows

    def recorded(*args, **kw):
        threads.append(threading.current_thread().name)
        return run_rows(*args, **kw)

    runtime.run_rows = recorded  # type: ignore[method-assign]
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((12, 20)).astype(np.float32) for _ in range(24)]

    async def main():
        store = MemorySessionStore()
        batcher = Batcher(runtime, max_batch_size=8, max_delay_s=0.002, runners=3)
        assert await batcher.warm_up(8) > 0  # no graphs: one thread
        assert len(threads) == 6 and threads[0].startswith("ort-feat-")
        threads.clear()
        assert await batcher.warm_up(8, every_thread=True) > 0
        warmed = list(threads)
        threads.clear()
        batcher.start()
        results = await asyncio.gather(*(_stream(batcher, store, runtime, x, [0, 1, 5, 12])
                                         for x in xs))
        await batcher.stop()
        return warmed, results

    warmed, results = asyncio.run(main())
    names = sorted(set(warmed))
    assert len(names) == 3 and all(n.startswith("ort-feat-") for n in names)
    # each thread: the buckets 2, 4, 8 (batch sizes 1..8 are padded to them) at 1 and 4 steps
    assert all(warmed.count(n) == 6 for n in names)
    assert set(threads) <= set(names) and len(threads) >= 3
    for x, (y, _) in zip(xs, results, strict=True):
        assert np.abs(y - _whole(runtime, x)[0]).max() <= 1e-5


def test_runners_sharing_a_thread_time_and_check_deadlines_when_it_is_theirs(repo) -> None:
    """With CUDA graphs a model's runners share one thread: a group waiting for it is
    neither timed nor checked against its deadline until the thread is free (a step
    whose deadline passed behind another batch's run was run, and that wait counted as
    compute time). Here on the CPU, the runtime told it has graphs."""
    runtime = ModelRegistry(repo, RuntimeOptions(device="cpu", intra_op_threads=1)).get("feat")
    runtime.options = replace(runtime.options, cuda_graphs=True)  # one thread for both
    run_rows = runtime.run_rows

    def slow(*args, **kw):
        time.sleep(0.2)
        return run_rows(*args, **kw)

    runtime.run_rows = slow  # type: ignore[method-assign]
    batches: list[tuple[list[float], float]] = []
    x = np.zeros((4, 20), dtype=np.float32)

    async def main():
        batcher = Batcher(runtime, max_batch_size=1, max_delay_s=0, runners=2,
                          on_batch=lambda waits, s: batches.append((waits, s)))
        batcher.start()
        first = asyncio.ensure_future(batcher.step(ZERO, x))
        await asyncio.sleep(0.02)  # the first runs; the second waits for the thread
        second = batcher.step(ZERO, x, expires=time.perf_counter() + 0.1)
        results = await asyncio.gather(first, second, return_exceptions=True)
        await batcher.stop()
        return results

    first, second = asyncio.run(main())
    assert not isinstance(first, BaseException)
    runtime.pool.free(first[1])
    assert isinstance(second, DeadlineExpired), second
    assert len(batches) == 1 and 0.19 < batches[0][1] < 0.39  # not both runs' 0.4 s


@pytest.mark.parametrize(("name", "runners"), [("text", 1), ("feat", 1), ("feat", 3)])
def test_32_interleaved_sessions_match_their_whole_sequence_runs(registry, name,
                                                                 runners) -> None:
    runtime = registry.get(name)
    rng = np.random.default_rng(11)
    random.seed(11)
    inputs, cuts = [], []
    for _ in range(32):
        t = int(rng.integers(12, 60))
        if runtime.meta.input.kind == "utf8_bytes":
            inputs.append(rng.integers(0, 256, t, dtype=np.uint8))
        else:
            inputs.append(rng.standard_normal((t, 20)).astype(np.float32))
        k = int(rng.integers(1, 8))
        cuts.append([0, *sorted(rng.choice(np.arange(1, t), k, replace=False).tolist()), t])

    async def main():
        store = MemorySessionStore()
        sizes = []
        batcher = Batcher(runtime, max_batch_size=16, max_delay_s=0.003, runners=runners,
                          on_batch=lambda waits, s: sizes.append(len(waits)))
        batcher.start()
        results = await asyncio.gather(*(_stream(batcher, store, runtime, x, c)
                                         for x, c in zip(inputs, cuts, strict=True)))
        await batcher.stop()
        return results, sizes, batcher

    results, sizes, batcher = asyncio.run(main())
    assert max(sizes) > 1, "no batch ever held more than one session"
    assert batcher.steps == sum(len(c) - 1 for c in cuts) and max(sizes) <= 16
    for x, (y, session) in zip(inputs, results, strict=True):
        y_whole, s_whole = _whole(runtime, x)
        assert np.abs(y - y_whole).max() <= 1e-5
        for got, want in zip(session.state.arrays, s_whole, strict=True):
            assert np.abs(got - want).max() <= 1e-5


def test_a_failed_run_fails_its_batch_and_the_batcher_goes_on(registry) -> None:
    runtime = registry.get("text")
    good = runtime.check_chunk(np.arange(5, dtype=np.uint8))
    used = runtime.pool.used
    beyond = -runtime.pool.capacity - 1000  # no such pool row: the gather fails

    async def main():
        batcher = Batcher(runtime, max_batch_size=8, max_delay_s=0.01)
        batcher.start()
        r = await asyncio.gather(batcher.step(ZERO, good),
                                 batcher.step(beyond, good), return_exceptions=True)
        after = await batcher.step(ZERO, good)
        await batcher.stop()
        return r, after

    (first, second), after = asyncio.run(main())
    assert isinstance(first, BatchFailed) and isinstance(second, BatchFailed)
    assert "failed to run" in str(first)
    np.testing.assert_array_equal(after[0][0], _whole(runtime, good)[0])
    assert runtime.pool.used == used + 1  # the new rows of the failed batch came back


def test_tagged_steps_are_answered_after_their_batch_commits(registry) -> None:
    """The commit hook (the shared store's write) gets a group's tagged steps at once;
    their callers wait for it and get its per-step refusal; untagged steps do not wait;
    the runner is free meanwhile, so the next batch runs while one commits."""
    runtime = registry.get("text")
    x = runtime.check_chunk(np.arange(5, dtype=np.uint8))
    want, want_state = _whole(runtime, x)
    used = runtime.pool.used

    async def main():
        calls: list[list[object]] = []
        release = asyncio.Event()

        async def commit(items):
            calls.append([tag for tag, _, _ in items])
            for _, outs, st in items:
                np.testing.assert_array_equal(outs[0], want)
                assert [s.shape for s in st] == [s.shape for s in runtime.zero_state()]
                np.testing.assert_array_equal(st[0], want_state[0])
            if len(calls) == 1:
                await release.wait()
            return [ValueError(f"refused {tag}") if tag == "b" else None
                    for tag, _, _ in items]

        batcher = Batcher(runtime, max_batch_size=8, max_delay_s=0.02, commit=commit)
        batcher.start()
        z = lambda: ZERO  # noqa: E731
        first = [asyncio.ensure_future(batcher.step(z(), x, tag=t)) for t in ("a", "b")]
        plain = asyncio.ensure_future(batcher.step(z(), x))
        while not calls:
            await asyncio.sleep(0.001)
        plain_out = await asyncio.wait_for(plain, 5)  # not held by the commit
        assert not any(f.done() for f in first)
        second = await asyncio.wait_for(batcher.step(z(), x, tag="c"), 5)  # runner free
        assert calls[1] == ["c"] and not any(f.done() for f in first)
        release.set()
        results = await asyncio.gather(*first, return_exceptions=True)
        await batcher.stop()
        return calls, plain_out, second, results

    calls, plain_out, second, (a, b) = asyncio.run(main())
    assert calls[0] == ["a", "b"]
    np.testing.assert_array_equal(plain_out[0][0], want)
    np.testing.assert_array_equal(second[0][0], want)
    np.testing.assert_array_equal(a[0][0], want)
    assert isinstance(b, ValueError) and str(b) == "refused b"
    # the refused step's new row came back; the others' rows are their callers' to keep
    assert runtime.pool.used == used + 3
    np.testing.assert_array_equal(runtime.pool.read([a[1]])[0][0], want_state[0])
    for done in (a, plain_out, second):
        runtime.pool.free(done[1])


def test_a_failing_commit_fails_its_steps_and_the_batcher_goes_on(registry) -> None:
    runtime = registry.get("text")
    x = runtime.check_chunk(np.arange(3, dtype=np.uint8))

    async def main():
        fail = True

        async def commit(items):
            if fail:
                raise RuntimeError("store exploded: secret detail")
            return [None] * len(items)

        batcher = Batcher(runtime, max_batch_size=4, max_delay_s=0.01, commit=commit)
        batcher.start()
        r = await asyncio.gather(*(batcher.step(ZERO, x, tag=i)
                                   for i in range(3)), return_exceptions=True)
        fail = False
        after = await batcher.step(ZERO, x, tag=9)
        await batcher.stop()
        return r, after

    r, after = asyncio.run(main())
    assert all(isinstance(e, BatchFailed) for e in r) and len({id(e) for e in r}) == 3
    assert "secret" not in str(r[0]) and "nothing advanced" in str(r[0])
    np.testing.assert_array_equal(after[0][0], _whole(runtime, x)[0])


def test_a_full_queue_answers_overloaded_at_once(registry) -> None:
    runtime = registry.get("text")
    x = runtime.check_chunk(np.arange(3, dtype=np.uint8))

    async def main():
        batcher = Batcher(runtime, max_queue=2)  # consumer not started: the queue fills
        waiting = [asyncio.ensure_future(batcher.step(ZERO, x, keep=False))
                   for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="retry"):
            await batcher.step(ZERO, x)
        batcher.start()
        done = await asyncio.gather(*waiting)
        await batcher.stop()
        return done

    assert len(asyncio.run(main())) == 2


def test_steps_queued_as_a_group_share_one_future_and_keep_their_own_results(
        registry) -> None:
    """A group (one StreamMany request's steps): each step's slot gets its own result,
    the group's one future is done once the last slot is; a slot given up before its
    run is skipped (its row unpinned, nothing run for it) and still counts as done."""
    runtime = registry.get("text")
    xs = [runtime.check_chunk(np.arange(k, k + 5, dtype=np.uint8)) for k in range(4)]
    used = runtime.pool.used

    async def main():
        batcher = Batcher(runtime, max_batch_size=8, max_delay_s=0.01)
        group = Group()
        slots = [batcher.submit(ZERO, x, group=group) for x in xs]
        batcher.abandon(slots[2])  # its caller went away before the batch ran
        assert slots[2].cancelled() and not group.future.done()
        batcher.start()
        await asyncio.wait_for(group.future, 10)
        steps = batcher.steps
        await batcher.stop()
        return slots, steps

    slots, steps = asyncio.run(main())
    assert steps == 3 and all(s.done() for s in slots)
    with pytest.raises(asyncio.CancelledError):
        slots[2].result()
    for i in (0, 1, 3):
        outputs, row, _ = slots[i].result()
        np.testing.assert_array_equal(outputs[0], _whole(runtime, xs[i])[0])
        runtime.pool.free(row)
    assert runtime.pool.used == used


def test_auto_device_serves_on_what_onnxruntime_really_gives(repo) -> None:
    registry = ModelRegistry(repo, RuntimeOptions(device="auto", intra_op_threads=1))
    obtained = {m.provider for m in registry}
    assert obtained <= {"CPUExecutionProvider", "CUDAExecutionProvider"} and len(obtained) == 1
    for m in registry:
        assert m.provider == m.session.get_providers()[0]


def test_warm_up_runs_every_batch_size_at_two_lengths(registry) -> None:
    rt = registry.get("feat")
    real = rt.run_rows
    calls = []

    def counting(xs, rows, out_rows=None, want_states=False):
        calls.append((len(xs), xs[0].shape[0], set(rows), out_rows))
        return real(xs, rows, out_rows, want_states)

    rt.run_rows = counting
    before = [a.copy() for a in rt.pool.read(range(rt.pool.capacity))]
    try:
        assert rt.warm_up(5) > 0
    finally:
        del rt.run_rows
    assert calls == [(b, t, {ZERO}, None) for t in (1, 4) for b in range(1, 6)]
    after = rt.pool.read(range(rt.pool.capacity))
    for a, b in zip(before, after, strict=True):  # only the trash row was written
        np.testing.assert_array_equal(np.delete(a, 1, axis=0), np.delete(b, 1, axis=0))


def test_warm_up_runs_the_buckets_batches_are_padded_to(repo) -> None:
    """Buckets 8, 16, 32 and batches up to 12: sizes 9 to 12 run padded to 16, which
    must be warmed too (it once was not: only buckets up to max_batch were)."""
    rt = ModelRegistry(repo, RuntimeOptions(device="cpu", batch_buckets=(8, 16, 32))).get("feat")
    assert sorted(set(warm_up_runs(rt, 12))) == [(8, 1), (8, 4), (16, 1), (16, 4)]


def test_cuda_buckets_apply_only_where_cuda_was_obtained(repo) -> None:
    """The server's auto buckets (pow2 on CUDA) reach a model only if it runs on CUDA:
    one on the CPU (device cpu, or auto that ends there) runs every batch at its own
    size, or at the buckets given for every device."""
    opts = RuntimeOptions(device="cpu", cuda_batch_buckets=(1, 2, 4, 8))
    rt = ModelRegistry(repo, opts).get("feat")
    assert rt.buckets == () and rt.padded_size(3) == 3
    listed = ModelRegistry(repo, RuntimeOptions(device="cpu", batch_buckets=(8,),
                                                cuda_batch_buckets=(2, 4))).get("feat")
    assert listed.buckets == (8,) and listed.padded_size(3) == 8


def test_answer_bytes_are_what_a_run_answers(repo) -> None:
    """The bound check_chunk refuses chunks by (their answer must fit in a message) is
    the bytes a run really gives, and max_steps inverts it."""
    registry = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    for rt in registry:
        for t in (1, 7, 40):
            x = (np.zeros((t, 20), np.float32) if rt.meta.input.kind != "utf8_bytes"
                 else np.zeros(t, np.uint8))
            outs, _ = rt.run([x], [rt.zero_state()])
            assert rt.answer_bytes(t) == sum(o.nbytes for o in outs[0]), (rt.name, t)
        per = rt.answer_bytes(1)
        assert rt.max_steps(10 * per) == 10 and rt.max_steps(per - 1) == 0
    limited = ModelRegistry(repo, RuntimeOptions(device="cpu", max_answer_bytes=4096))
    rt = limited.get("text")
    rt.check_chunk(np.zeros(4096 // rt.answer_bytes(1), np.uint8))
    with pytest.raises(InvalidChunk, match=r"at most 4 steps"):
        rt.check_chunk(np.zeros(5, np.uint8))


def test_a_step_given_up_while_its_batch_runs_leaves_no_step_or_row_behind(repo) -> None:
    """A fixed pool (what --cuda-graphs gives) out of rows, and a step given up while an
    earlier chunk-length group of its batch ran: the batch once died there (the full
    pool's refusal was set on the given-up step's future), leaving the later groups
    unanswered and their rows pinned for good."""
    import time

    registry = ModelRegistry(repo, RuntimeOptions(device="cpu", pool_rows=6))
    rt = registry.get("feat")
    pool = rt.pool
    pool.growable = False
    real = rt.run_rows

    def slow(*args, **kw):
        time.sleep(0.3)
        return real(*args, **kw)

    rt.run_rows = slow

    def x(t: int) -> np.ndarray:
        return np.zeros((t, 20), np.float32)

    async def main():
        session_row, other_row = pool.alloc(), pool.alloc()  # two live sessions
        batcher = Batcher(rt, max_batch_size=16, max_delay_s=0.05)
        batcher.start()
        first = batcher.submit(ZERO, x(1))  # group T=1 takes the 5th row
        live = batcher.submit(session_row, x(2))  # group T=2: the 6th, the last
        gone = batcher.submit(ZERO, x(2))  # ...would find none
        later = batcher.submit(ZERO, x(3))  # group T=3: none left either
        await asyncio.sleep(0.15)  # group T=1 runs
        batcher.abandon(gone)
        done, pending = await asyncio.wait([first, live, later], timeout=5)
        await batcher.stop()
        return session_row, other_row, first, live, later, pending

    session_row, other_row, first, live, later, pending = asyncio.run(main())
    assert not pending
    for future in (first, live):
        pool.free(future.result()[1])
    assert later.exception() is not None  # the pool was full: a clear refusal
    pool.free(session_row)
    pool.free(other_row)
    assert pool.used == 0 and not pool._pins, (pool.used, pool._pins)
