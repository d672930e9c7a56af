"""The CUDA execution provider: skipped (visibly) where onnxruntime cannot get CUDA.

On a GPU machine: chunked streaming with carried state on CUDA equals the whole
sequence on the CPU within 1e-4 (fp32, TF32 off), for several batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.server.errors import DeviceUnavailable
from rnnserve.server.runtime import CUDA, ModelRegistry, RuntimeOptions, providers_for

from .binding import CountingSession, warm_up_runs


def test_cuda_options_keep_fp32_exact() -> None:
    """TF32 moved an LSTM's state by 1.2e-3 from the CPU's over 40 steps on an H100;
    the CUDA provider is always asked for plain fp32 (measured: 1.2e-6)."""
    try:
        providers = providers_for(RuntimeOptions(device="cuda", device_id=0))
    except DeviceUnavailable:
        pytest.skip("this onnxruntime has no CUDA provider")
    name, options = providers[0]
    assert name == CUDA and options["use_tf32"] == 0 and options["device_id"] == 0


def _driver_loads() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def test_cuda_sync_without_a_driver_is_a_clear_error() -> None:
    """--cuda-sync other than auto sets the context's flags through the driver: without
    one the error says so, and auto never touches it."""
    from rnnserve.server.runtime import set_cuda_sync

    with pytest.raises(DeviceUnavailable, match="unknown cuda_sync"):
        set_cuda_sync("sleep")
    set_cuda_sync("auto")  # CUDA's own choice: nothing to set, no driver needed
    if _driver_loads():
        pytest.skip("a CUDA driver loads here: the requires_cuda test covers it")
    with pytest.raises(DeviceUnavailable, match=r"needs the CUDA driver \(libcuda.so.1\)"):
        set_cuda_sync("blocking")


@pytest.mark.requires_cuda
def test_cuda_sync_blocking_sets_the_context_and_serves_exactly(cuda_registry, repo) -> None:
    """In a process of its own (a context's flags are the process's): a model loaded
    with cuda_sync blocking leaves the device's primary context with the blocking flag
    (read back through the driver) and its runs equal the CPU's."""
    import json
    import subprocess
    import sys

    code = f"""
import ctypes, json, numpy as np
from rnnserve.server.runtime import ModelRegistry, RuntimeOptions
reg = ModelRegistry({str(repo)!r}, RuntimeOptions(device="cuda", cuda_sync="blocking"))
cpu = ModelRegistry({str(repo)!r}, RuntimeOptions(device="cpu"))
lib = ctypes.CDLL("libcuda.so.1")
dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
lib.cuDeviceGet(ctypes.byref(dev), 0)
lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active))
rng, worst = np.random.default_rng(3), 0.0
for rt in reg:
    c = cpu.get(rt.name, rt.version)
    if rt.meta.input.kind == "utf8_bytes":
        xs = [rng.integers(0, 256, 9, dtype=np.uint8) for _ in range(8)]
    else:
        xs = [rng.standard_normal((9, 20)).astype(np.float32) for _ in range(8)]
    got, _ = rt.run(xs, [rt.zero_state()] * 8)
    want, _ = c.run(xs, [c.zero_state()] * 8)
    worst = max(worst, max(float(np.abs(g[0] - w[0]).max()) for g, w in zip(got, want)))
print(json.dumps({{"flags": flags.value, "active": active.value, "worst": worst}}))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["active"] == 1 and got["flags"] & 7 == 4, got  # CU_CTX_SCHED_BLOCKING_SYNC
    assert got["worst"] <= 1e-4, got


@pytest.fixture(scope="module")
def cuda_registry(repo):
    try:
        return ModelRegistry(repo, RuntimeOptions(device="cuda"))
    except DeviceUnavailable as exc:
        pytest.skip(f"no CUDA for onnxruntime here: {exc}")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_chunked_on_cuda_equals_whole_on_cpu(cuda_registry, repo, batch) -> None:
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    rng = np.random.default_rng(batch)
    for gpu_rt in cuda_registry:
        assert gpu_rt.provider == CUDA
        cpu_rt = cpu.get(gpu_rt.name, gpu_rt.version)
        assert gpu_rt.warm_up(4) > 0
        if gpu_rt.meta.input.kind == "utf8_bytes":
            xs = [rng.integers(0, 256, 40, dtype=np.uint8) for _ in range(batch)]
        else:
            xs = [rng.standard_normal((40, 20)).astype(np.float32) for _ in range(batch)]
        whole, _ = cpu_rt.run(xs, [cpu_rt.zero_state()] * batch)
        states = [gpu_rt.zero_state()] * batch
        parts: list[list[np.ndarray]] = [[] for _ in range(batch)]
        for a, b in [(0, 1), (1, 4), (4, 17), (17, 40)]:
            outs, states = gpu_rt.run([x[a:b] for x in xs], states)
            for i in range(batch):
                parts[i].append(outs[i][0])
        for i in range(batch):
            diff = float(np.abs(np.concatenate(parts[i]) - whole[i][0]).max())
            assert diff <= 1e-4, f"{gpu_rt.name} v{gpu_rt.version} batch {batch}: {diff:.2e}"


def _inputs(rt, rng, batch: int, t: int) -> list[np.ndarray]:
    if rt.meta.input.kind == "utf8_bytes":
        return [rng.integers(0, 256, t, dtype=np.uint8) for _ in range(batch)]
    return [rng.standard_normal((t, 20)).astype(np.float32) for _ in range(batch)]


def _stream_rows(rt, xs, cuts) -> tuple[list[np.ndarray], list[int]]:
    """Chunks through pool rows only (the state never leaves the device)."""
    rows = [0] * len(xs)  # the zero row
    parts: list[list[np.ndarray]] = [[] for _ in xs]
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        out_rows = [rt.pool.alloc() for _ in xs]
        outs, host = rt.run_rows([x[a:b] for x in xs], rows, out_rows)
        assert host is None
        for i, o in enumerate(outs):
            parts[i].append(o[0])
        for r in rows:
            rt.pool.free(r)
        rows = out_rows
    return [np.concatenate(p) for p in parts], rows


@pytest.mark.requires_cuda
def test_states_stay_on_the_gpu_between_steps(cuda_registry, repo) -> None:
    """The pools live in GPU memory; chained steps through rows bind no state output to
    the host and keep the pools' addresses; results match the CPU within 1e-4."""
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    rng = np.random.default_rng(3)
    for rt in cuda_registry:
        assert {v.device_name() for v in rt.pool.values} == {"cuda"}
        pointers = [v.data_ptr() for v in rt.pool.values]
        xs = _inputs(rt, rng, 16, 40)
        log: list[tuple[str, str]] = []
        rt.session = CountingSession(rt.session, log)
        try:
            got, rows = _stream_rows(rt, xs, [0, 1, 4, 17, 40])
        finally:
            rt.session = rt.session._real
        assert [v.data_ptr() for v in rt.pool.values] == pointers
        states = {p.output for p in rt.meta.states}
        assert not [n for n, _ in log if n in states], log
        assert {w for n, w in log if n.startswith("rnnserve_pool_")} == {"ortvalue:cuda"}
        ref = cpu.get(rt.name, rt.version)
        whole, final = ref.run(xs, [ref.zero_state()] * len(xs))
        for i, y in enumerate(got):
            assert float(np.abs(y - whole[i][0]).max()) <= 1e-4
        for j, a in enumerate(rt.pool.read(rows)):  # the one host copy, at the end
            assert float(np.abs(a - np.stack([f[j] for f in final])).max()) <= 1e-4
        for r in rows:
            rt.pool.free(r)


@pytest.mark.requires_cuda
def test_a_model_on_cuda_takes_the_cuda_buckets(repo) -> None:
    """Device auto on a GPU: the model gets the server's CUDA buckets (pow2 by default),
    so warm-up runs those sizes, not every size up to the largest batch."""
    try:
        reg = ModelRegistry(repo, RuntimeOptions(device="auto", cuda_batch_buckets=(2, 8)))
    except DeviceUnavailable as exc:
        pytest.skip(f"no CUDA for onnxruntime here: {exc}")
    rt = reg.get("feat")
    if rt.provider != "CUDAExecutionProvider":
        pytest.skip("device auto did not obtain CUDA here")
    assert rt.buckets == (2, 8) and [rt.padded_size(n) for n in (1, 3, 9)] == [2, 8, 9]
    assert sorted({size for size, _ in warm_up_runs(rt, 8)}) == [2, 8]  # not 1..8


@pytest.mark.requires_cuda
def test_cuda_graphs_replay_each_bucket_exactly(repo) -> None:
    """One captured graph per (bucket, chunk shape), replayed with new chunks and rows;
    padding never touches a live row; results equal the CPU within 1e-4."""
    try:
        graphs = ModelRegistry(repo, RuntimeOptions(device="cuda", cuda_graphs=True,
                                                    batch_buckets=(4, 8), pool_rows=256))
    except DeviceUnavailable as exc:
        pytest.skip(f"no CUDA for onnxruntime here: {exc}")
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    rng = np.random.default_rng(4)
    for rt in graphs:
        assert rt.pool.growable is False and rt.pool.capacity == 256
        ref = cpu.get(rt.name, rt.version)
        for batch in (3, 8, 5):  # buckets 4, 8, 8: the 8 is replayed with other rows
            xs = _inputs(rt, rng, batch, 16)
            got, rows = _stream_rows(rt, xs, [0, 4, 8, 12, 16])  # one shape: replays
            whole, _ = ref.run(xs, [ref.zero_state()] * batch)
            for i, y in enumerate(got):
                diff = float(np.abs(y - whole[i][0]).max())
                assert diff <= 1e-4, f"{rt.name} batch {batch}: {diff:.2e}"
            for r in rows:
                rt.pool.free(r)
        assert {b.options.get_run_config_entry("gpu_graph_id") for b in rt._bound.values()} \
            == {"1", "2"}
        assert not any(a[0].any() for a in rt.pool.read([0]))  # the zero row stayed zero


@pytest.mark.requires_cuda
def test_an_fp16_model_on_cuda_is_within_its_bound(make_checkpoint, tmp_path) -> None:
    from rnnserve.export.onnx_export import export_checkpoint
    from rnnserve.export.verify import fp16_bound

    ckpt = make_checkpoint("lstm", "features", seed=8, hidden_size=64)
    repo = tmp_path / "models"
    export_checkpoint(ckpt, repo, "f32", log=lambda _: None)
    export_checkpoint(ckpt, repo, "f16", fp16=True, log=lambda _: None)
    try:
        gpu = ModelRegistry(repo, RuntimeOptions(device="cuda")).get("f16")
    except DeviceUnavailable as exc:
        pytest.skip(f"no CUDA for onnxruntime here: {exc}")
    ref = ModelRegistry(repo, RuntimeOptions(device="cpu")).get("f32")
    rng = np.random.default_rng(9)
    xs = _inputs(gpu, rng, 32, 40)
    got, rows = _stream_rows(gpu, xs, [0, 4, 8, 24, 40])
    whole, _ = ref.run(xs, [ref.zero_state()] * 32)
    for i, y in enumerate(got):
        assert float(np.abs(y - whole[i][0]).max()) <= fp16_bound(whole[i][0])
    assert gpu.pool.specs[0].dtype == np.float16


@pytest.mark.requires_cuda
def test_served_cuda_graphs_stream_every_model_at_once(cuda_registry, repo, tmp_path) -> None:
    """``serve --cuda-graphs --batch-runners 2`` with every model version streaming at
    once, in chunks of 1 and 4 steps (graphs captured at warm-up) and of 3 (fixed
    buffers, no graph): every chunk answered, equal to the CPU within 1e-4. On an H200,
    graphs captured while serving failed when another run started meanwhile (INTERNAL),
    and runs of one model from two threads at once answered 6.5e-2 off."""
    import asyncio

    from rnnserve.client.client import AsyncClient

    from .serving import start_server

    log = tmp_path / "server.log"
    srv = start_server(repo, log, "--device", "cuda", "--cuda-graphs", "--batch-runners", "2",
                       "--max-batch-size", "16", "--max-batch-delay-ms", "1")
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    rng = np.random.default_rng(5)
    cuts = [0, 1, 5, 8, 9, 13, 16, 17, 21]
    jobs = [(rt, x) for rt in cpu for x in _inputs(rt, rng, 24, cuts[-1])]

    async def one(client: AsyncClient, rt, x) -> np.ndarray:
        name, parts = rt.meta.outputs[0].name, []
        async with client.stream(rt.name, rt.version) as s:
            for a, b in zip(cuts[:-1], cuts[1:], strict=True):
                parts.append((await s.send(x[a:b], end=b == cuts[-1]))[name])
        return np.concatenate(parts)

    async def everyone() -> list[tuple[object, np.ndarray, np.ndarray]]:
        async with AsyncClient(srv.target, timeout=60) as client:
            got = await asyncio.gather(*(one(client, rt, x) for rt, x in jobs))
        return [(rt, x, y) for (rt, x), y in zip(jobs, got, strict=True)]

    _served_exactly(srv, log, everyone, "CUDA graphs captured")


def _served_exactly(srv, log, main, phrase: str) -> None:
    """Run ``main`` (it gives (runtime, input, output) triples), then stop the server:
    it stopped cleanly, nothing failed, its log says ``phrase``, and each output equals
    the CPU's whole run of its input within 1e-4."""
    import asyncio

    try:
        results = asyncio.run(main())
    finally:
        code = srv.stop()
    text = log.read_text()
    assert code == 0 and " failed " not in text, text[-3000:]
    assert phrase in text
    for rt, x, y in results:
        whole, _ = rt.run([x], [rt.zero_state()])
        diff = float(np.abs(y - whole[0][0]).max())
        assert diff <= 1e-4, f"{rt.name} v{rt.version}: {diff:.2e}"


@pytest.mark.requires_cuda
def test_served_packed_blocks_on_cuda_graphs_equal_the_cpu(cuda_registry, repo,
                                                           tmp_path) -> None:
    """``StreamPacked`` on ``serve --device cuda --cuda-graphs``: 40 feat sessions per
    request, split into blocks of at most 16 and padded to the graphs' buckets, chunks of
    1, 4 (graphs) and 3 steps (fixed buffers), sessions opened in the first request:
    every answer equal to the CPU's within 1e-4."""
    import asyncio

    from rnnserve.client import AsyncClient, packed_request
    from rnnserve.client.client import new_session_id

    from .serving import start_server

    log = tmp_path / "server.log"
    srv = start_server(repo, log, "--device", "cuda", "--cuda-graphs", "--max-batch-size",
                       "16", "--max-batch-delay-ms", "1")
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu")).get("feat")
    cuts = [0, 1, 5, 8, 9, 13]
    n = 40
    x = np.random.default_rng(6).standard_normal((n, cuts[-1], 20)).astype(np.float32)
    sids = [new_session_id() for _ in range(n)]

    async def main() -> np.ndarray:
        parts = []
        async with AsyncClient(srv.target, timeout=60) as client, client.packed() as p:
            for k, (a, b) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
                answer = await p.send(packed_request(
                    "feat", sids, [k] * n, x[:, a:b], opens=range(n) if k == 0 else (),
                    ends=range(n) if b == cuts[-1] else ()))
                assert not answer.failures, answer.failures
                parts.append(answer.outputs["logits"])
        return np.concatenate(parts, axis=1)

    try:
        y = asyncio.run(main())
    finally:
        code = srv.stop()
    assert code == 0, log.read_text()[-3000:]
    whole, _ = cpu.run(list(x), [cpu.zero_state()] * n)
    for i in range(n):
        diff = float(np.abs(y[i] - whole[i][0]).max())
        assert diff <= 1e-4, f"session {i}: {diff:.2e}"


@pytest.mark.requires_cuda
def test_a_pool_on_cuda_grows_and_shrinks_keeping_its_rows(cuda_registry) -> None:
    """Resizes on the device: the copy between old and new buffers runs on CUDA (and
    asks the device arena to shrink after it); every row written survives growth, and
    every row still held survives a shrink."""
    from rnnserve.server.pool import FIRST, StatePool

    pool = StatePool(cuda_registry.get("feat").pool.specs, device="cuda",
                     providers=providers_for(RuntimeOptions(device="cuda")), rows=8)
    rng = np.random.default_rng(71)
    written = {}
    for _ in range(40):  # grows from 8 rows, several times
        row = pool.alloc()
        pool.acquire(row + 1)
        pool.release()
        written[row] = [rng.standard_normal(s.row_shape).astype(s.dtype) for s in pool.specs]
        pool.write(row, written[row])
    assert pool.resizes >= 2 and pool.capacity >= FIRST + 40
    # onnxruntime took the request to shrink the device arena (a refusal would have
    # been logged and dropped, the resizes going on without it)
    assert pool.shrink_arena == "gpu:0"
    for row in sorted(written)[10:]:
        pool.free(row)
    before = pool.capacity
    target = pool.trim_target()
    assert target and pool.shrink(target) and pool.capacity == target < before
    for row in sorted(written)[:10]:
        for got, want in zip(pool.read([row]), written[row], strict=True):
            np.testing.assert_array_equal(got[0], want)


@pytest.mark.requires_cuda
def test_a_version_loaded_while_serving_on_cuda_graphs_runs_exactly(cuda_registry, repo,
                                                                    tmp_path) -> None:
    """``serve --cuda-graphs --repo-poll-s``: a version moved into the repository while
    another model streams is loaded without capturing graphs (a capture beside live
    CUDA work fails), and its streams, like the other model's, equal the CPU within
    1e-4; nothing failed."""
    import asyncio
    import os
    import shutil

    from rnnserve.client.client import AsyncClient

    from .serving import start_server
    from .test_repo_poll import wait_for

    models = tmp_path / "models"
    shutil.copytree(repo / "feat" / "1", models / "feat" / "1")
    log = tmp_path / "server.log"
    cpu = ModelRegistry(repo, RuntimeOptions(device="cpu"))
    feat, text = cpu.get("feat", 1), cpu.get("text", 2)
    rng = np.random.default_rng(7)
    cuts = [0, 1, 5, 8, 9, 13, 16]
    srv = start_server(models, log, "--device", "cuda", "--cuda-graphs", "--batch-runners",
                       "2", "--repo-poll-s", "0.2", "--max-batch-size", "16",
                       "--max-batch-delay-ms", "1")
    loaded = asyncio.Event()

    async def stream(client: AsyncClient, rt, x, busy: bool) -> tuple[np.ndarray, np.ndarray]:
        """Chunks of 1, 4 and 3 steps of ``x``; ``busy``: on and on until the new
        version is served and three more (the loading and warm-up run beside them),
        else all of ``x``. The steps sent, and the outputs."""
        name, parts, at, k, after = rt.meta.outputs[0].name, [], 0, 0, 0
        async with client.stream(rt.name, rt.version) as s:
            while True:
                n = (1, 4, 3)[k % 3]
                k += 1
                end = at + n + 4 > len(x) or (busy and after >= 3) or (
                    not busy and at + n >= len(x))
                parts.append((await s.send(x[at:at + n], end=end))[name])
                at += n
                if end:
                    return x[:at], np.concatenate(parts)
                if busy:
                    after += loaded.is_set()
                    await asyncio.sleep(0.02)

    async def run() -> list[tuple[object, np.ndarray, np.ndarray]]:
        xf = [rng.standard_normal((4000, 20)).astype(np.float32) for _ in range(8)]
        xt = _inputs(text, rng, 8, cuts[-1])
        async with AsyncClient(srv.target, timeout=60) as client:
            busy = [asyncio.ensure_future(stream(client, feat, x, True)) for x in xf]
            await asyncio.sleep(0.2)  # feat streaming
            staging = tmp_path / "staging"
            shutil.copytree(repo / "text" / "2", staging)
            (models / "text").mkdir()
            os.rename(staging, models / "text" / "2")
            await asyncio.to_thread(wait_for, log, "serving text version 2", 120.0)
            loaded.set()
            got = await asyncio.gather(*busy, *(stream(client, text, x, False) for x in xt))
        return [(rt, x, y) for rt, (x, y) in zip([feat] * 8 + [text] * 8, got, strict=True)]

    _served_exactly(srv, log, run, "its runs are not captured as CUDA graphs")
