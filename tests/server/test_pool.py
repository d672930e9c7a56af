"""The device-resident state pool on the CPU: the same code, graph and binding as on CUDA.

The pooled graph must compute exactly what the exported model computes; new states must
land in fresh rows in place (the pool's buffer is never replaced or copied by a step);
no state may leave the pool on a step unless a checkpoint asks for it; padding rows must
never touch a live row; rows must come back when steps fail, are cancelled or refused.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.client import AsyncClient
from rnnserve.server import runtime as runtime_module
from rnnserve.server.batcher import Batcher
from rnnserve.server.errors import DeviceUnavailable
from rnnserve.server.pool import FIRST, TRASH, ZERO, PoolFull, PoolSpec, PoolState, StatePool
from rnnserve.server.runtime import ModelRegistry, ModelRuntime, RuntimeOptions, providers_for
from rnnserve.server.sessions import MemorySessionStore

from .binding import CountingSession
from .serving import metric_value, start_server
from .test_grpc_api import mixed_jobs, whole_run


@pytest.fixture(scope="module")
def registry(repo):
    return ModelRegistry(repo, RuntimeOptions(device="cpu", intra_op_threads=1))


def _chunks(rt: ModelRuntime, rng: np.random.Generator, n: int, t: int) -> list[np.ndarray]:
    if rt.meta.input.kind == "utf8_bytes":
        return [rng.integers(0, 256, t, dtype=np.uint8) for _ in range(n)]
    return [rng.standard_normal((t, 20)).astype(np.float32) for _ in range(n)]


def _random_states(rt: ModelRuntime, rng: np.random.Generator, n: int) -> list[list[np.ndarray]]:
    return [[rng.standard_normal(s.row_shape).astype(s.dtype) for s in rt.pool.specs]
            for _ in range(n)]


def _snapshot(rt: ModelRuntime) -> list[np.ndarray]:
    return [a.copy() for a in rt.pool.read(range(rt.pool.capacity))]


@pytest.mark.parametrize("name", ["text", "feat"])
def test_the_pooled_graph_computes_what_the_exported_model_computes(registry, repo,
                                                                    name) -> None:
    rt = registry.get(name)
    plain = ort.InferenceSession(str(rt.path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(5)
    xs, states = _chunks(rt, rng, 5, 7), _random_states(rt, rng, 5)
    feeds = {rt.meta.input.name: np.stack(xs)}
    for j, pair in enumerate(rt.meta.states):
        feeds[pair.input] = np.stack([s[j] for s in states])
    names = rt.data_output_names + [p.output for p in rt.meta.states]
    want = plain.run(names, feeds)

    rows = [rt.pool.alloc() for _ in xs]
    out_rows = [rt.pool.alloc() for _ in xs]
    try:
        for row, st in zip(rows, states, strict=True):
            rt.pool.write(row, st)
        outputs, host = rt.run_rows(xs, rows, out_rows, want_states=True)
        assert host is not None
        n_out = len(rt.data_output_names)
        for i in range(len(xs)):
            for k in range(n_out):
                np.testing.assert_array_equal(outputs[i][k], want[k][i])
            for j in range(len(rt.meta.states)):
                np.testing.assert_array_equal(host[i][j], want[n_out + j][i])
        # the new states are in the fresh rows; the rows read from are as they were
        for j, (got_new, got_old) in enumerate(zip(rt.pool.read(out_rows), rt.pool.read(rows),
                                                   strict=True)):
            np.testing.assert_array_equal(got_new, want[n_out + j])
            np.testing.assert_array_equal(got_old, np.stack([s[j] for s in states]))
    finally:
        for row in rows + out_rows:
            rt.pool.free(row)


def test_a_step_writes_in_place_and_touches_only_its_new_rows(registry) -> None:
    rt = registry.get("feat")
    rng = np.random.default_rng(6)
    rows = [rt.pool.alloc() for _ in range(12)]
    for row, st in zip(rows, _random_states(rt, rng, 12), strict=True):
        rt.pool.write(row, st)
    before = _snapshot(rt)
    pointers = [v.data_ptr() for v in rt.pool.values]
    xs = _chunks(rt, rng, 3, 4)
    rt.run_rows(xs, rows[:3], rows[3:6])
    assert [v.data_ptr() for v in rt.pool.values] == pointers  # the same buffers
    after = _snapshot(rt)
    written = set(rows[3:6])
    for a, b in zip(before, after, strict=True):
        for r in range(rt.pool.capacity):
            if r not in written:
                np.testing.assert_array_equal(a[r], b[r], err_msg=f"row {r}")
        assert not np.array_equal(a[rows[3]], b[rows[3]])
    for row in rows:
        rt.pool.free(row)


def test_a_run_of_chunks_of_several_lengths_is_refused_and_touches_nothing(registry) -> None:
    """Chunks of 3 and 5 steps hold as many values as two of 4: joined into one batch
    they would run misaligned. The run refuses them before anything runs."""
    rt = registry.get("feat")
    rng = np.random.default_rng(8)
    rows = [rt.pool.alloc() for _ in range(4)]
    before = _snapshot(rt)
    xs = _chunks(rt, rng, 1, 3) + _chunks(rt, rng, 1, 5)
    with pytest.raises(ValueError, match=r"one length, got \[3, 5\]"):
        rt.run_rows(xs, rows[:2], rows[2:])
    for a, b in zip(before, _snapshot(rt), strict=True):
        np.testing.assert_array_equal(a, b)
    for row in rows:
        rt.pool.free(row)


@pytest.mark.parametrize("commit", [False, True])
def test_states_leave_the_pool_only_for_a_checkpoint(registry, commit) -> None:
    """Without a shared store no state output is copied to the host on any step; with
    one, each batch copies its new states once, for the records it writes."""
    rt = registry.get("feat")
    log: list[tuple[str, str]] = []
    rng = np.random.default_rng(7)
    xs = _chunks(rt, rng, 6, 8)
    states = {p.output for p in rt.meta.states}

    async def keep(items):
        return [None] * len(items)

    async def main():
        store = MemorySessionStore()
        batcher = Batcher(rt, max_batch_size=8, max_delay_s=0.01,
                          commit=keep if commit else None)
        batcher.start()

        async def stream(x):
            session = store.create(rt.name, rt.version, PoolState(rt.pool))
            for a in range(0, 8, 2):
                out, row, host = await batcher.step(session.state.row, x[a:a + 2],
                                                    tag="t" if commit else None)
                assert (host is not None) == commit
                store.update(session, PoolState(rt.pool, row), session.next_seq + 1)
            store.close(session.id)

        await asyncio.gather(*(stream(x) for x in xs))
        await batcher.stop()
        return batcher.batches

    rt.session = CountingSession(rt.session, log)
    try:
        batches = asyncio.run(main())
    finally:
        rt.session = rt.session._real
    assert log.count(("run", "")) == batches
    host_states = [n for n, where in log if n in states]
    assert len(host_states) == (batches * len(states) if commit else 0)
    assert {where for n, where in log if n.startswith("rnnserve_pool_")} == {"ortvalue:cpu"}


def test_padding_rows_read_zeros_and_never_touch_a_live_row(repo) -> None:
    rt = ModelRuntime(repo / "feat" / "1" / "model.onnx", "feat", 1,
                      RuntimeOptions(device="cpu", intra_op_threads=1, batch_buckets=(4, 8)))
    rng = np.random.default_rng(8)
    rows = [rt.pool.alloc() for _ in range(20)]
    for row, st in zip(rows, _random_states(rt, rng, 20), strict=True):
        rt.pool.write(row, st)
    before = _snapshot(rt)
    xs = _chunks(rt, rng, 5, 3)  # padded to 8
    assert rt.padded_size(5) == 8 and rt.padded_size(3) == 4 and rt.padded_size(9) == 9
    got, _ = rt.run_rows(xs, rows[:5], rows[10:15])
    after = _snapshot(rt)
    for a, b in zip(before, after, strict=True):
        for r in range(rt.pool.capacity):
            if r not in (TRASH, *rows[10:15]):
                np.testing.assert_array_equal(a[r], b[r], err_msg=f"row {r}")
        assert not b[ZERO].any()
    plain = ModelRuntime(rt.path, "feat", 1, RuntimeOptions(device="cpu", intra_op_threads=1))
    check = [plain.pool.alloc() for _ in range(5)]
    for row, r in zip(check, rows[:5], strict=True):
        plain.pool.write(row, [a[r] for a in before])
    want, _ = plain.run_rows(xs, check)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g[0], w[0])


def test_the_pool_grows_keeping_every_row_and_a_fixed_one_refuses(repo) -> None:
    path = repo / "text" / "2" / "model.onnx"
    rt = ModelRuntime(path, "text", 2, RuntimeOptions(device="cpu", pool_rows=4))
    rng = np.random.default_rng(9)
    written = {}
    for st in _random_states(rt, rng, 40):
        row = rt.pool.alloc()
        rt.pool.write(row, st)
        written[row] = st
    assert rt.pool.resizes >= 3 and rt.pool.capacity >= 42 and rt.pool.used == 40
    assert sorted(written) == list(range(FIRST, FIRST + 40))
    for row, st in written.items():
        for got, want in zip(rt.pool.read([row]), st, strict=True):
            np.testing.assert_array_equal(got[0], want)
    fixed = ModelRuntime(path, "text", 2, RuntimeOptions(device="cpu", pool_rows=4))
    fixed.pool.growable = False
    fixed.pool.alloc(), fixed.pool.alloc()
    with pytest.raises(PoolFull, match="all in use"):
        fixed.pool.alloc()


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_grown_pool_holds_in_memory_the_rows_written_and_no_copy_of_the_old() -> None:
    """Host memory of a pool on the CPU: rows never written hold none, read or not (a
    pool doubles, and its top half waits for sessions), and growth keeps nothing of the
    old buffers or of the copy between them (before, onnxruntime's arena kept the
    copy's temporary, as large as the old pool: 0.55 x the state of 100,000 idle
    speech-small sessions, docs/benchmarks.md)."""
    spec = PoolSpec("h", "h_out", (1024,), np.dtype(np.float32))  # 4 KiB a row
    pool = StatePool([spec], rows=64)
    rows = 16384  # 64 MiB
    pool.acquire(rows)
    pool.release()
    pool.buffers[0][FIRST:rows] = 1.0
    written = _resident_bytes()
    pool.acquire(rows + 1)  # grows: doubles, the old rows copied
    pool.release()
    grown = _resident_bytes()
    assert pool.capacity >= 2 * rows and pool.resizes == 2
    assert grown - written < 16 << 20, f"{(grown - written) >> 20} MiB more resident"
    # reading rows never written (the copy to a CUDA device reads them all) costs none;
    # reductions only, no temporary as large as the rows (`x == 1.0` would take 16 MiB,
    # which the allocator may keep: the suite's earlier tests decide)
    kept = pool.buffers[0][FIRST:rows]
    assert kept.min() == 1.0 == kept.max()
    assert not pool.buffers[0][rows:].any() and not pool.buffers[0][:FIRST].any()
    read = _resident_bytes()
    assert read - grown < 16 << 20, f"{(read - grown) >> 20} MiB more resident on a read"


def test_rows_are_handed_out_while_a_run_holds_the_pool_and_the_run_needing_them_grows_it(
        repo) -> None:
    """The event loop hands out rows (``alloc``) and never waits for a run to end; a run
    whose rows lie beyond the buffers grows them (in its worker thread), after the runs
    in flight, keeping every row; its own steps are exact."""
    path = repo / "feat" / "1" / "model.onnx"
    rt = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", pool_rows=8))
    plain = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu"))
    pool, cap = rt.pool, rt.pool.capacity
    rng = np.random.default_rng(12)
    old_rows = [pool.alloc() for _ in range(cap - FIRST)]
    old_states = _random_states(rt, rng, len(old_rows))
    for row, st in zip(old_rows, old_states, strict=True):
        pool.write(row, st)
    pool.acquire(cap)  # a run in flight on the buffers
    new_rows = [pool.alloc() for _ in range(3 * cap)]  # does not wait for it
    assert pool.capacity == cap and min(new_rows) == cap and pool.resizes == 0
    xs = _chunks(rt, rng, len(old_rows), 3)
    got: list = []
    runner = threading.Thread(target=lambda: got.append(
        rt.run_rows(xs, old_rows, new_rows[:len(old_rows)], want_states=True)))
    runner.start()
    runner.join(0.5)
    assert runner.is_alive() and pool.capacity == cap  # it waits for the run in flight
    pool.release()
    runner.join(30)
    assert not runner.is_alive() and got
    assert pool.resizes == 1 and pool.capacity == 2 * cap  # doubled, enough for the run
    outputs, new_states = got[0]
    want, want_states = plain.run(xs, old_states)
    for g, w in zip(outputs, want, strict=True):
        np.testing.assert_allclose(g[0], w[0], rtol=0, atol=1e-6)
    for row, st, wst in zip(new_rows[:len(old_rows)], new_states, want_states,
                              strict=True):
        for a, b, c in zip(pool.read([row]), st, wst, strict=True):
            np.testing.assert_array_equal(a[0], b)
            np.testing.assert_allclose(b, c, rtol=0, atol=1e-6)
    for row, st in zip(old_rows, old_states, strict=True):  # copied on growth
        for a, b in zip(pool.read([row]), st, strict=True):
            np.testing.assert_array_equal(a[0], b)
    for row in new_rows[len(old_rows):]:  # rows no run wrote yet read as zeros (a read
        assert not any(a.any() for a in pool.read([row]))  # beyond the buffers grows them
    assert pool.capacity >= max(new_rows) + 1


def test_a_row_a_queued_step_reads_is_not_reused_before_it_ran(registry) -> None:
    pool = registry.get("text").pool
    row = pool.alloc()
    pool.pin(row)  # its step waits for a batch
    pool.free(row)  # and its session ends meanwhile
    other = pool.alloc()
    assert other != row
    pool.unpin(row)  # the run read it: now it is free
    assert pool.alloc() == row
    pool.free(row), pool.free(other)
    pool.free(ZERO), pool.free(TRASH)  # reserved rows are never handed out
    handed = [pool.alloc() for _ in range(3)]
    assert min(handed) >= FIRST
    for r in handed:
        pool.free(r)


def test_bucketed_runs_from_fixed_buffers_survive_pool_growth(repo) -> None:
    """Buckets run from buffers bound once per shape (what CUDA graphs replay); after the
    pool grows the new pools are bound; outputs and states equal unbucketed runs."""
    path = repo / "feat" / "1" / "model.onnx"
    fixed = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", intra_op_threads=1,
                                                           batch_buckets=(4, 8), pool_rows=4))
    plain = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", intra_op_threads=1))
    rng = np.random.default_rng(10)
    xs = [_chunks(plain, rng, 6, 3) for _ in range(5)]
    got, want = [], []
    for rt, sink in ((fixed, got), (plain, want)):
        rows = [ZERO] * 6
        for x in xs:
            out_rows = [rt.pool.alloc() for _ in range(6)]  # the pool grows on the way
            outputs, states = rt.run_rows(x, rows, out_rows, want_states=True)
            sink.append((outputs, states))
            for r in rows:
                rt.pool.free(r)
            rows = out_rows
    assert fixed.pool.resizes >= 2 and set(fixed._bound) == {(8, 3, 20)}
    for (go, gs), (wo, ws) in zip(got, want, strict=True):
        for a, b in zip(go + gs, wo + ws, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)


def test_a_resize_binds_the_new_buffers_to_every_binding_holding_the_old(repo) -> None:
    """The bindings of a runtime (fixed buffers per run shape, each runner thread's own)
    hold the pool's buffers: a growth or a shrink binds the new ones to them at once, so
    the old buffers are let go (on CUDA they held device memory until each run shape ran
    again, after a shrink perhaps never), and runs after it stay exact."""
    path = repo / "feat" / "1" / "model.onnx"
    rt = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", intra_op_threads=1,
                                                        batch_buckets=(4,), pool_rows=4))
    plain = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", intra_op_threads=1))
    rng = np.random.default_rng(12)

    def holders() -> list[ort.IOBinding]:  # white box: the runtime's bindings
        return [b.binding for b in rt._bound.values()] + [rt._local.binding]

    def held() -> list[set[int]]:  # the addresses each holds (pools and fixed outputs)
        return [{v.data_ptr() for v in h.get_outputs()} for h in holders()]

    xs = _chunks(rt, rng, 5, 3)
    rt.run_rows(xs[:4], [ZERO] * 4)  # a bucket: fixed buffers
    rt.run_rows(xs, [ZERO] * 5)  # beyond the buckets: this thread's binding
    rows = [rt.pool.alloc() for _ in range(40)]  # beyond the 4 rows: the run grows it
    rt.run_rows(xs, [ZERO] * 5, rows[-5:])
    first = {v.data_ptr() for v in rt.pool.values}
    assert all(first <= h for h in held())  # grown: the new buffers bound at the growth
    rt.run_rows(xs, rows[-5:], rows[:5])  # the live rows at the bottom
    grown = rt.pool.capacity
    for row in rows[5:]:
        rt.pool.free(row)
    state = rt.pool.read(rows[:5])
    target = rt.pool.trim_target()
    assert target and rt.pool.shrink(target) and rt.pool.capacity < grown
    now = {v.data_ptr() for v in rt.pool.values}
    assert not now & first and all(now <= h and not first & h for h in held())
    np.testing.assert_array_equal(rt.pool.read(rows[:5]), state)
    got, _ = rt.run_rows(xs[:4], rows[:4])
    want, _ = plain.run(xs[:4], [[a[i] for a in state] for i in range(4)])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g[0], w[0], atol=1e-6)
    for row in rows[:5]:
        rt.pool.free(row)


def test_run_shapes_with_fixed_buffers_are_capped(repo, monkeypatch) -> None:
    monkeypatch.setattr(runtime_module, "MAX_BOUND_SHAPES", 2)
    rt = ModelRuntime(repo / "text" / "2" / "model.onnx", "text", 2,
                      RuntimeOptions(device="cpu", batch_buckets=(2,)))
    rng = np.random.default_rng(11)
    for t in (3, 4, 5, 6):  # chunk lengths a client chose: two get fixed buffers
        x = _chunks(rt, rng, 2, t)
        got, _ = rt.run_rows(x, [ZERO, ZERO])
        want, _ = ModelRuntime(rt.path, "text", 2, RuntimeOptions(device="cpu")).run_rows(
            x, [ZERO, ZERO])
        np.testing.assert_array_equal(got[1][0], want[1][0])
    assert len(rt._bound) == 2


def test_the_cap_on_fixed_buffers_holds_for_runner_threads_at_once(repo, monkeypatch) -> None:
    """Runner threads meeting new chunk lengths at the same moment: no more run shapes
    get fixed buffers than the cap (each thread saw room before any had bound)."""
    monkeypatch.setattr(runtime_module, "MAX_BOUND_SHAPES", 2)
    rt = ModelRuntime(repo / "text" / "2" / "model.onnx", "text", 2,
                      RuntimeOptions(device="cpu", intra_op_threads=1, batch_buckets=(2,)))
    rng = np.random.default_rng(12)
    chunks = [_chunks(rt, rng, 2, t) for t in range(3, 11)]
    start = threading.Barrier(len(chunks))

    def run(x):
        start.wait()
        return rt.run_rows(x, [ZERO, ZERO])[0]

    with ThreadPoolExecutor(len(chunks)) as ex:
        got = list(ex.map(run, chunks))
    assert len(rt._bound) == 2
    plain = ModelRuntime(rt.path, "text", 2, RuntimeOptions(device="cpu"))
    for x, g in zip(chunks, got, strict=True):
        np.testing.assert_array_equal(g[1][0], plain.run_rows(x, [ZERO, ZERO])[0][1][0])


def test_cuda_graphs_are_refused_without_cuda_and_buckets() -> None:
    with pytest.raises(DeviceUnavailable, match="CUDA graphs need"):
        providers_for(RuntimeOptions(device="cpu", cuda_graphs=True, batch_buckets=(8,)))
    with pytest.raises(DeviceUnavailable, match="CUDA graphs need"):
        providers_for(RuntimeOptions(device="cuda", cuda_graphs=True))


def test_a_server_with_buckets_and_a_small_pool_streams_exactly(repo, tmp_path) -> None:
    """Through the real server: padded batches from fixed buffers, a pool that starts at
    4 rows and grows under 24 concurrent sessions; every session exact, every row back."""
    server = start_server(repo, tmp_path / "server.log", "--batch-buckets", "4,8",
                          "--pool-rows", "4", "--max-batch-size", "8",
                          "--max-batch-delay-ms", "3")
    jobs = mixed_jobs(np.random.default_rng(12), 24, 40)

    async def one(client, name, x, cuts):
        ys = []
        async with client.stream(name) as s:
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                ys.append((await s.send(x[a:b], end=b == len(x)))["logits"])
        return np.concatenate(ys)

    async def main():
        async with AsyncClient(server.target) as client:
            return await asyncio.gather(*(one(client, *job) for job in jobs))

    try:
        results = asyncio.run(asyncio.wait_for(main(), 60))
        text = server.metrics()
    finally:
        assert server.stop() == 0
    for (name, x, _), y in zip(jobs, results, strict=True):
        want = whole_run(repo, name, 2 if name == "text" else 1, x)
        assert float(np.abs(y - want).max()) <= 1e-5
    assert metric_value(text, "rnnserve_state_pool_rows") == 0
    assert metric_value(text, "rnnserve_state_pool_capacity_rows", model="feat") >= 8
    assert metric_value(text, "rnnserve_batch_size_bucket", le="1.0") < \
        metric_value(text, "rnnserve_batch_size_count")  # batches held several sessions


def test_a_full_fixed_pool_refuses_steps_and_moves_with_a_retry_hint(repo) -> None:
    """A fixed pool (as with CUDA graphs) out of rows: the steps that find none get
    RESOURCE_EXHAUSTED with a retry hint, the others run, and every row comes back."""
    rt = ModelRuntime(repo / "text" / "2" / "model.onnx", "text", 2,
                      RuntimeOptions(device="cpu", pool_rows=4))
    rt.pool.growable = False  # two rows to hand out
    x = rt.check_chunk(np.arange(4, dtype=np.uint8))

    async def main():
        batcher = Batcher(rt, max_batch_size=4, max_delay_s=0.01)
        batcher.start()
        got = await asyncio.gather(*(batcher.step(ZERO, x) for _ in range(3)),
                                   return_exceptions=True)
        await batcher.stop()
        return got

    got = asyncio.run(main())
    refused = [g for g in got if isinstance(g, BaseException)]
    ran = [g for g in got if not isinstance(g, BaseException)]
    assert len(refused) == 1 and len(ran) == 2  # the one that found no row
    e = refused[0]
    assert isinstance(e, PoolFull) and e.code == "RESOURCE_EXHAUSTED"
    assert e.retry_after_ms == 1000 and "--pool-rows" in str(e)
    for _, row, _ in ran:
        rt.pool.free(row)
    assert rt.pool.used == 0
    want, _ = rt.run([x], [rt.zero_state()])
    for outputs, _, _ in ran:
        np.testing.assert_array_equal(outputs[0], want[0][0])
    a, b = rt.pool.alloc(), rt.pool.alloc()
    with pytest.raises(PoolFull):
        rt.pool.alloc()
    rt.pool.free(a), rt.pool.free(b)


def test_rows_are_handed_out_lowest_first_and_the_pool_shrinks_keeping_live_rows(
        repo) -> None:
    """After a burst the pool gives its memory back: the rows in use fit in a quarter of
    the buffers, so they shrink (after the run in flight) to twice those rows, keeping
    every live row's state; a row beyond them later grows the pool again, exactly."""
    path = repo / "feat" / "1" / "model.onnx"
    rt = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu", pool_rows=8))
    plain = ModelRuntime(path, "feat", 1, RuntimeOptions(device="cpu"))
    pool = rt.pool
    rng = np.random.default_rng(44)
    rows = [pool.alloc() for _ in range(100)]
    assert rows == list(range(FIRST, FIRST + 100))
    states = _random_states(rt, rng, len(rows))
    for row, st in zip(rows, states, strict=True):
        pool.write(row, st)  # grows the pool: 8 -> 16 -> ... -> 128 rows
    assert pool.capacity == 128 and pool.trim_target() == 0  # all in use
    live = {rows[1]: states[1], rows[4]: states[4]}
    high = rows[90]  # an idle session high up
    for row in rows:
        if row not in live and row != high:
            pool.free(row)
    assert pool.alloc() == rows[0]  # the lowest free row first
    pool.free(rows[0])
    assert pool.trim_target() == 0  # the idle session high up holds the buffers
    pool.free(high)
    target = pool.trim_target()  # the top of the rows handed out is now rows[4]
    assert target == max(pool.first_rows, 2 * (rows[4] + 1)) == 14
    assert pool.used == 2
    before = pool.resizes
    pool.acquire(pool.capacity)  # a run in flight: the shrink waits for it
    done: list[bool] = []
    shrinker = threading.Thread(target=lambda: done.append(pool.shrink(target)))
    shrinker.start()
    shrinker.join(0.5)
    assert shrinker.is_alive() and pool.capacity == 128
    pool.release()
    shrinker.join(30)
    assert done == [True] and pool.capacity == target and pool.resizes == before + 1
    for row, st in live.items():
        for a, b in zip(pool.read([row]), st, strict=True):
            np.testing.assert_array_equal(a[0], b)
    assert pool.shrink(target) is False  # nothing more to give back
    # the live sessions step on, into rows the smaller pool must grow for
    new_rows = [pool.alloc() for _ in range(2)]
    far = [pool.alloc() for _ in range(40)][-2:]  # beyond the buffers now
    xs = _chunks(rt, rng, 2, 3)
    outputs, _ = rt.run_rows(xs, list(live), far, want_states=True)
    assert pool.capacity >= far[-1] + 1
    want, want_states = plain.run(xs, list(live.values()))
    for g, w in zip(outputs, want, strict=True):
        np.testing.assert_allclose(g[0], w[0], rtol=0, atol=1e-6)
    for row, wst in zip(far, want_states, strict=True):
        for a, b in zip(pool.read([row]), wst, strict=True):
            np.testing.assert_allclose(a[0], b, rtol=0, atol=1e-6)
    assert new_rows == [FIRST, FIRST + 2]  # the lowest free ones (rows[1] is live)


def test_a_server_gives_pool_memory_back_after_a_burst(repo, tmp_path) -> None:
    """Through the real server: 120 sessions grow the pool, 118 of them close; the two
    left step on (settling in low rows) and the pool shrinks under them, exactly."""
    server = start_server(repo, tmp_path / "server.log", "--pool-shrink-s", "0.2",
                          "--max-batch-delay-ms", "2")
    rng = np.random.default_rng(45)
    x = rng.standard_normal((12, 20)).astype(np.float32)
    want = whole_run(repo, "feat", 1, x)

    async def main() -> tuple[list[np.ndarray], float, float]:
        async with AsyncClient(server.target) as client:
            burst = [client.stream("feat") for _ in range(120)]
            for s in burst:
                await s.__aenter__()
            await asyncio.gather(*(s.send(x[:1]) for s in burst))
            peak = metric_value(server.metrics(), "rnnserve_state_pool_capacity_rows",
                                model="feat")
            kept, gone = burst[:2], burst[2:]
            for s in gone:
                await s.send(x[1:2], end=True)
                await s.__aexit__(None, None, None)
            parts = [await s.send(x[1:4]) for s in kept]
            capacity = peak
            for _ in range(100):  # the server looks every 0.2 s
                await asyncio.sleep(0.1)
                capacity = metric_value(server.metrics(),
                                        "rnnserve_state_pool_capacity_rows", model="feat")
                if capacity < peak:
                    break
            ys = []
            for s, first in zip(kept, parts, strict=True):
                rest = await s.send(x[4:], end=True)
                await s.__aexit__(None, None, None)
                ys.append(np.concatenate([first["logits"], rest["logits"]]))
            return ys, peak, capacity

    try:
        ys, peak, capacity = asyncio.run(asyncio.wait_for(main(), 60))
        text = server.metrics()
    finally:
        assert server.stop() == 0
    assert peak >= 128 and capacity == 64  # back to the first size
    for y in ys:
        assert float(np.abs(y - want[1:]).max()) <= 1e-5
    assert metric_value(text, "rnnserve_state_pool_rows") == 0
    assert "state pool shrunk from" in (tmp_path / "server.log").read_text()


def test_a_pool_whose_arena_shrink_onnxruntime_refuses_still_resizes_and_says_so(
        caplog) -> None:
    """After a resize's copy the pool asks onnxruntime to shrink the device's arena (on
    CUDA, ``gpu:N``). An onnxruntime that finds no arena there refuses the whole run;
    the copy then runs again without asking, once for good, with a warning: a resize
    never fails for the memory it meant to save. Here the CPU's arena is asked for, which
    the pool's helper sessions run without, so onnxruntime refuses as it would."""
    spec = PoolSpec("h", "h_out", (3,), np.dtype(np.float32))
    pool = StatePool([spec], rows=8, shrink_arena="cpu:0")
    pool.acquire(6)
    pool.release()
    pool.buffers[0][FIRST:6] = np.arange(12, dtype=np.float32).reshape(4, 3)
    with caplog.at_level(logging.WARNING, logger="rnnserve.pool"):
        pool.acquire(9)  # grows: the copy is refused, then runs without the option
        pool.release()
    assert pool.resizes == 1 and pool.capacity >= 9 and pool.shrink_arena == ""
    refused = [r.getMessage() for r in caplog.records if "refused to shrink" in r.getMessage()]
    assert len(refused) == 1 and "cpu:0" in refused[0], refused
    np.testing.assert_array_equal(pool.buffers[0][FIRST:6],
                                  np.arange(12, dtype=np.float32).reshape(4, 3))
    assert not pool.buffers[0][6:].any() and not pool.buffers[0][:FIRST].any()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnnserve.pool"):
        pool.acquire(pool.capacity + 1)  # grows again: not asked, not refused
        pool.release()
    assert pool.resizes == 2 and not caplog.records
    np.testing.assert_array_equal(pool.buffers[0][FIRST:6],
                                  np.arange(12, dtype=np.float32).reshape(4, 3))


def test_a_pool_on_the_cpu_asks_no_arena_to_shrink() -> None:
    spec = PoolSpec("h", "h_out", (3,), np.dtype(np.float32))
    assert StatePool([spec], rows=8).shrink_arena == ""


def test_only_onnxruntime_s_refusal_of_the_shrink_counts_as_one() -> None:
    """The refusal is told by onnxruntime's own words, not by any mention of an arena:
    a device out of memory names its arena's source file, and must fail the resize
    (the shrink request kept) rather than be retried as a refusal. (That the real
    refusal is told so, the test above shows: its resize goes through.)"""
    from rnnserve.server.pool import refused_shrink

    assert refused_shrink(RuntimeError(
        "Error in execution: Did not find an arena based allocator registered for "
        "device-id combination in the memory arena shrink list: gpu:0"))
    oom = RuntimeError(
        "Error in execution: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:359 "
        "void* onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) "
        "Failed to allocate memory for requested buffer of size 268435456")
    assert not refused_shrink(oom)

    class OutOfMemory:  # the copy's session failing as a device out of memory would
        def __init__(self, real: ort.InferenceSession) -> None:
            self.real = real

        def io_binding(self) -> ort.IOBinding:
            return self.real.io_binding()

        def run_with_iobinding(self, *_: object) -> None:
            raise oom

    spec = PoolSpec("h", "h_out", (3,), np.dtype(np.float32))
    pool = StatePool([spec], rows=8, shrink_arena="gpu:0")
    real = pool._copy
    pool._copy = OutOfMemory(real)  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="Failed to allocate"):
        pool.acquire(9)  # grows: the copy fails, and the resize with it
    assert pool.shrink_arena == "gpu:0" and pool.resizes == 0 and pool.capacity == 8
    pool._copy = real  # the pool goes on (on the CPU without the device's option)
    pool.shrink_arena, pool._copy_options = "", ort.RunOptions()
    pool.acquire(9)
    pool.release()
    assert pool.resizes == 1 and pool.capacity >= 9
