"""Models loaded into onnxruntime, described by their exported metadata alone.

``ModelRuntime`` is one model version: an onnxruntime session on an explicitly
chosen device, its metadata, the pool of its sessions' states on that device
(``server.pool``), and the operations the server needs: validation of one session's
chunk, and one batched run that gathers the batch's states from the pool, runs the
model and scatters the new states into fresh pool rows, all inside onnxruntime, with
only the chunks going in and the outputs coming out. The CPU and CUDA paths are the
same code. ``ModelRegistry`` loads every version of every model in a repository.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from rnnserve.errors import ModelRepositoryError
from rnnserve.export import repository
from rnnserve.export.metadata import ModelMetadata
from rnnserve.server.errors import DeviceUnavailable, InvalidChunk, ModelNotFound
from rnnserve.server.pool import GATHER, SCATTER, TRASH, ZERO, PoolSpec, StatePool, pooled_model

log = logging.getLogger("rnnserve.runtime")

DEVICES = ("auto", "cpu", "cuda")
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "auto"  # auto: CUDA when onnxruntime obtains it, else CPU
    device_id: int = 0
    intra_op_threads: int = 0  # 0: onnxruntime's default (all cores)
    inter_op_threads: int = 0
    allow_nonfinite: bool = False  # float chunks with NaN or infinity pass the checks
    # Batch sizes a run is padded up to (padding rows read the zero state and write a
    # row no session owns); () runs every batch at its own size.
    batch_buckets: tuple[int, ...] = ()
    # The buckets of a model that obtained CUDA (None: batch_buckets). Device auto
    # learns only at load where a model runs; CUDA warms every size up at start.
    cuda_batch_buckets: tuple[int, ...] | None = None
    pool_rows: int = 64  # the state pool's first size in rows (it doubles when full)
    # CUDA graphs: each bucket's run (per chunk length) is captured once and replayed;
    # needs device "cuda" and buckets, and the pool keeps its pool_rows (fixed addresses)
    cuda_graphs: bool = False
    # How host threads wait for the GPU (CUDA's scheduling flag for the device's primary
    # context, set before the first session): auto is CUDA's choice (it spins while the
    # process has fewer active contexts than the host has cores), blocking sleeps until
    # the device is done, yield spins yielding the core.
    cuda_sync: str = "auto"
    # Chunks whose answer (the outputs' bytes) would exceed this are refused before they
    # run: gRPC could not send the answer, and the step would have advanced the session
    # for nothing. 0: no limit. The server sets it from --max-message-bytes.
    max_answer_bytes: int = 0


# Room left in a message for what surrounds a chunk's outputs (names, shapes, ids)
ANSWER_OVERHEAD = 4096

# Run shapes (bucket, chunk length) that get fixed buffers (and a CUDA graph each);
# chunks of other lengths run without (clients sending ever new lengths would else grow
# them without end).
MAX_BOUND_SHAPES = 32
# Runs of one shape on one thread after which onnxruntime has captured its CUDA graph:
# it captures at the third (two ordinary runs first, to allocate), and recent versions
# (1.31) make all three within the first call; the last one replays
GRAPH_CAPTURE_RUNS = 4

# CUDA driver API's CU_CTX_SCHED_* flags, by cuda_sync
CUDA_SYNC_FLAGS = {"auto": 0, "spin": 1, "yield": 2, "blocking": 4}
_cuda_sync_done: dict[int, str] = {}  # device id -> the mode set in this process


def set_cuda_sync(mode: str, device_id: int = 0) -> None:
    """Sets how this process's host threads wait for device ``device_id`` (cuda_sync),
    through the driver (libcuda) before onnxruntime makes the device's primary context
    active. A CUDA synchronize spins by default when a process has fewer contexts than
    the host has cores; blocking sleeps on an interrupt instead (on an H100 host it
    served worse: the runner threads were working, not spinning)."""
    if mode not in CUDA_SYNC_FLAGS:
        raise DeviceUnavailable(f"unknown cuda_sync {mode!r}; choose from "
                                f"{tuple(CUDA_SYNC_FLAGS)}")
    if mode == "auto" or _cuda_sync_done.get(device_id) == mode:
        return
    if device_id in _cuda_sync_done:  # a context's flags are its process's: one mode
        raise DeviceUnavailable(f"cuda_sync {mode!r}: device {device_id} already has "
                                f"{_cuda_sync_done[device_id]!r} in this process")
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise DeviceUnavailable(f"cuda_sync {mode!r} needs the CUDA driver (libcuda.so.1), "
                                f"which does not load here: {exc}") from None
    dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
    wanted = CUDA_SYNC_FLAGS[mode]
    for call, args in (("cuInit", (0,)), ("cuDeviceGet", (ctypes.byref(dev), device_id)),
                       ("cuDevicePrimaryCtxSetFlags", (dev, ctypes.c_uint(wanted))),
                       ("cuDevicePrimaryCtxGetState", (dev, ctypes.byref(flags),
                                                       ctypes.byref(active)))):
        rc = getattr(lib, call)(*args)
        if rc:
            raise DeviceUnavailable(f"cuda_sync {mode!r}: {call} failed with CUDA driver "
                                    f"error {rc}")
    if flags.value & 7 != wanted:
        raise DeviceUnavailable(f"cuda_sync {mode!r}: device {device_id}'s context kept "
                                f"scheduling flags {flags.value & 7}")
    _cuda_sync_done[device_id] = mode
    log.info("device %d: host threads wait for the GPU by %s (context flags %d, %s)",
             device_id, mode, flags.value, "active" if active.value else "not yet active")


# Set when device "auto" asked onnxruntime for CUDA and got the CPU: later models go
# straight to the CPU instead of repeating onnxruntime's error for each of them.
_cuda_fell_back = False


def providers_for(options: RuntimeOptions) -> list[Any]:
    if options.device not in DEVICES:
        raise DeviceUnavailable(f"unknown device {options.device!r}; choose from {DEVICES}")
    if options.cuda_graphs and (options.device != "cuda" or not options.batch_buckets):
        raise DeviceUnavailable("CUDA graphs need --device cuda and batch buckets "
                                "(--batch-buckets)")
    if options.device == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    if options.device == "auto" and _cuda_fell_back:
        return [CPU]
    if CUDA not in available:
        if options.device == "cuda":
            raise DeviceUnavailable(
                f"device 'cuda' demanded but this onnxruntime has no CUDA provider "
                f"(available: {available}); install onnxruntime-gpu or use --device cpu"
            )
        return [CPU]
    # No TF32: on Hopper, cuDNN's LSTM in TF32 drifted the state by 1.2e-3 from the CPU's
    # fp32 over 40 steps (H100, onnxruntime 1.31.1); in fp32 it is 1.2e-6.
    cuda_options: dict[str, Any] = {"device_id": options.device_id,
                                    "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": 0}
    if options.cuda_graphs:
        cuda_options["enable_cuda_graph"] = "1"
    return [(CUDA, cuda_options), CPU]


def state_specs(meta: ModelMetadata) -> list[PoolSpec]:
    return [PoolSpec(s.input, s.output, s.row_shape(), np.dtype(s.dtype))
            for s in meta.states]


def prepare(path: Path) -> tuple[dict[str, str], int, onnx.ModelProto]:
    """A model file read and checked for serving: its metadata properties, its opset,
    and its graph with the state pool's gather and scatter (``pooled_model``).
    Parsing the protobuf, and writing it for onnxruntime, hold Python's interpreter
    lock for long spells, so a server that loads while serving does this in another
    process (``rnnserve.server.prepare``)."""
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # not a protobuf, truncated, unreadable
        raise ModelRepositoryError(f"{path}: not a readable ONNX model: {exc}") from None
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMetadata.from_props(props, source=str(path))
    graph_inputs = {i.name for i in model.graph.input} - {i.name for i in
                                                            model.graph.initializer}
    declared = {meta.input.name, *(s.input for s in meta.states)}
    if graph_inputs != declared:
        raise ModelRepositoryError(f"{path}: graph inputs {sorted(graph_inputs)} do not "
                                   f"match the metadata {sorted(declared)}")
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                default=17)
    return props, opset, pooled_model(model, state_specs(meta))


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` gave in another process: the pooled graph written to ``path``
    (onnxruntime reads a file with the interpreter lock released), and the seconds
    it took."""
    props: dict[str, str]
    opset: int
    path: Path
    seconds: float


class ModelRuntime:
    """One model version in onnxruntime; ``prepared``: its file already read, checked
    and pooled in another process (a version loaded while serving)."""

    def __init__(self, path: str | Path, name: str, version: int,
                 options: RuntimeOptions = RuntimeOptions(),
                 prepared: Prepared | None = None) -> None:
        started = time.perf_counter()
        self.name, self.version, self.path = name, version, Path(path)
        self.options = options
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        # No spin-waiting between runs: the event loop that receives the next chunks
        # shares the cores, and spinning threads starve it (rnnserve bench, speech-small
        # on 2 cores: capacity 16 streams with spinning, see docs/benchmarks.md).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        providers = providers_for(options)
        quiet = options.device == "auto" and CUDA in [p[0] for p in providers
                                                      if isinstance(p, tuple)]
        if prepared is None:
            props, opset, model = prepare(Path(path))
            source: bytes | str = model.SerializeToString()
            del model
        else:  # by ``rnnserve.server.prepare`` in another process
            props, opset, source = prepared.props, prepared.opset, str(prepared.path)
            started -= prepared.seconds
        self.meta = ModelMetadata.from_props(props, source=str(path))
        self._state_dtypes = [np.dtype(s.dtype) for s in self.meta.states]
        specs = state_specs(self.meta)
        if options.device == "cuda":
            set_cuda_sync(options.cuda_sync, options.device_id)
        if quiet:  # a failed CUDA attempt is expected on CPU machines: say it once, below
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(source, so, providers=providers)
        finally:
            if quiet:
                ort.set_default_logger_severity(2)
        obtained = self.session.get_providers()
        if quiet and CUDA not in obtained:
            global _cuda_fell_back
            _cuda_fell_back = True
            log.info("device auto: onnxruntime could not start CUDA (no GPU, or CUDA 13 / "
                     "cuDNN 9 libraries missing); serving on the CPU")
        if options.device == "cuda" and CUDA not in obtained:
            raise DeviceUnavailable(
                f"model {name!r} v{version}: CUDA was demanded but onnxruntime fell back to "
                f"{obtained} (CUDA 13 and cuDNN 9 libraries missing?)"
            )
        self.provider = obtained[0]
        self._np_dtype = np.dtype(self.meta.input.dtype)
        self._frame_shape = tuple(int(d) for d in self.meta.input.shape[2:])
        self._chunk_ndim = 1 + len(self._frame_shape)  # (time, *frame)
        self.data_output_names = [o.name for o in self.meta.outputs]
        self._answer_terms = self._answer_sizes()
        on_gpu = self.provider == CUDA
        self.pool = StatePool(specs, device="cuda" if on_gpu else "cpu",
                              device_id=options.device_id,
                              # row access has ever new shapes: never graph-captured
                              providers=(providers_for(replace(options, cuda_graphs=False))
                                         if on_gpu else [CPU]),
                              rows=options.pool_rows, growable=not options.cuda_graphs,
                              opset=opset)
        buckets = options.batch_buckets
        if on_gpu and options.cuda_batch_buckets is not None:
            buckets = options.cuda_batch_buckets
        self.buckets = tuple(sorted(set(buckets)))
        if self.buckets and self.buckets[0] < 1:
            raise ValueError(f"batch buckets must be >= 1, got {self.buckets}")
        # fixed buffers per (bucket, chunk shape), bound once: what CUDA graphs replay
        self._bound: dict[tuple[int, ...], _Bound] = {}
        self._bound_lock = threading.Lock()
        # after warm-up no graph is captured any more: a capture fails when other CUDA
        # work (another runner, model or pool) starts meanwhile, which serving cannot stop
        self._sealed = False
        self._warming = True  # False: a warm-up under way stops at its next run
        # With CUDA graphs, one run of this session at a time, as onnxruntime requires
        # (its CUDA provider documentation: no runs of a graph-captured session from
        # several threads; overlapping runs served wrong answers on an H200). The
        # batcher runs such a model on one thread; this holds for every caller.
        self._run_lock = threading.Lock() if options.cuda_graphs else None
        self._local = threading.local()  # per runner thread: its binding (_binding)
        # None, not empty RunOptions: onnxruntime's Python side looks up gpu_graph_id in
        # them on every run, and a missing key costs a raised error (~40 us on the CPU)
        self._plain: ort.RunOptions | None = None
        if options.cuda_graphs:  # runs outside a bucket are not captured
            self._plain = ort.RunOptions()
            self._plain.add_run_config_entry("gpu_graph_id", "-1")
        self.load_seconds = time.perf_counter() - started
        log.info("loaded model %s version %d from %s on %s in %.2fs", name, version, path,
                 self.provider, self.load_seconds)
        if on_gpu:
            got = self.session.get_provider_options().get(CUDA, {})
            log.info("%s v%d CUDA options: %s", name, version,
                     {k: got.get(k) for k in ("device_id", "cudnn_conv_algo_search",
                                              "use_tf32", "enable_cuda_graph")})

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def zero_state(self) -> list[np.ndarray]:
        """A new session's state: one array per state pair, without the batch axis."""
        return [np.zeros(s.row_shape(), dtype=dt)
                for s, dt in zip(self.meta.states, self._state_dtypes, strict=True)]

    def answer_bytes(self, steps: int) -> int:
        """The bytes of one session's outputs for a chunk of ``steps`` input steps
        (samples for PCM16: ``"frames"`` axes hold steps / hop); the message that
        carries them is at most ``ANSWER_OVERHEAD`` larger. Asked for every chunk: the
        bytes per step, per frame and fixed are worked out once, at load."""
        hop = self.meta.input.hop_samples or 1
        if self._answer_terms is not None:
            per_step, per_frame, fixed = self._answer_terms
            return per_step * steps + per_frame * (steps // hop) + fixed
        total = 0
        for o in self.meta.outputs:  # an output growing along two axes: not linear
            n = np.dtype(o.dtype).itemsize
            for d in o.shape[1:]:
                n *= steps if d == "time" else steps // hop if d == "frames" else \
                    int(d) if isinstance(d, int) else 1
            total += n
        return total

    def output_row_shapes(self, steps: int) -> list[tuple[tuple[int, ...], np.dtype[Any]]]:
        """Each data output's shape and dtype for one session's chunk of ``steps``
        input steps (samples for PCM16), as ``answer_bytes`` counts them."""
        hop = self.meta.input.hop_samples or 1
        return [(tuple(steps if d == "time" else steps // hop if d == "frames" else int(d)
                       for d in o.shape[1:]), np.dtype(o.dtype))
                for o in self.meta.outputs]

    def _answer_sizes(self) -> tuple[int, int, int] | None:
        """Bytes per input step, per output frame and fixed, summed over the outputs;
        None when an output grows along more than one axis with the chunk."""
        sizes = [0, 0, 0]
        for o in self.meta.outputs:
            n, axes = np.dtype(o.dtype).itemsize, []
            for d in o.shape[1:]:
                if d in ("time", "frames"):
                    axes.append(0 if d == "time" else 1)
                elif isinstance(d, int):
                    n *= d
            if len(axes) > 1:
                return None
            sizes[axes[0] if axes else 2] += n
        return sizes[0], sizes[1], sizes[2]

    def max_steps(self, budget: int) -> int:
        """The longest chunk (input steps, a multiple of the hop for PCM16) whose
        outputs fit in ``budget`` bytes; 0 when not even one step fits."""
        hop = self.meta.input.hop_samples or 1
        per = self.answer_bytes(hop)  # outputs grow linearly with the hops of a chunk
        fixed = self.answer_bytes(0)
        if per <= fixed:  # outputs independent of the chunk's length
            return (1 << 62) if fixed <= budget else 0
        return max(0, (budget - fixed) // (per - fixed)) * hop

    def check_chunk(self, x: np.ndarray) -> np.ndarray:
        """Validate one session's chunk, shaped (time, *frame); return it C-contiguous."""
        return self._check(x, block=False)

    def check_block(self, x: np.ndarray) -> np.ndarray:
        """Validate the chunks of several sessions, shaped (sessions, time, *frame), as
        ``check_chunk`` each but for their values (``nonfinite_rows`` tells the rows
        that ``check_chunk`` would refuse for NaN or Inf); return them C-contiguous."""
        return self._check(x, block=True)

    def nonfinite_rows(self, x: np.ndarray) -> list[int]:
        """The rows of a block (``check_block``) holding NaN or Inf, when refused."""
        if x.dtype.kind != "f" or self.options.allow_nonfinite or not len(x):
            return []
        ok = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        return [] if ok.all() else np.flatnonzero(~ok).tolist()

    def _check(self, x: np.ndarray, block: bool) -> np.ndarray:
        inp = self.meta.input
        if x.dtype != self._np_dtype:
            raise InvalidChunk(f"model {self.name!r} takes {inp.dtype} input ({inp.kind}), "
                               f"got {x.dtype}")
        lead = ("sessions",) if block else ()
        shape = x.shape[1:] if block else x.shape
        if x.ndim != self._chunk_ndim + len(lead) or shape[1:] != self._frame_shape:
            want = (*lead, "time", *self._frame_shape)
            raise InvalidChunk(f"model {self.name!r} takes chunks shaped {list(want)}, "
                               f"got {list(x.shape)}")
        steps = shape[0]
        if steps < 1:
            raise InvalidChunk("empty chunk: send at least one time step")
        if inp.kind == "pcm16" and inp.hop_samples and steps % inp.hop_samples:
            raise InvalidChunk(f"PCM16 chunks must be a multiple of {inp.hop_samples} samples, "
                               f"got {steps}")
        limit = self.options.max_answer_bytes
        if limit and self.answer_bytes(steps) > limit:
            raise InvalidChunk(
                f"a chunk of {steps} steps would be answered with "
                f"{self.answer_bytes(steps)} bytes of outputs, more than a message may "
                f"carry ({limit + ANSWER_OVERHEAD} bytes, --max-message-bytes); send chunks "
                f"of at most {self.max_steps(limit)} steps")
        if not block and x.dtype.kind == "f" and not self.options.allow_nonfinite and \
                not np.isfinite(x).all():
            raise InvalidChunk("chunk contains NaN or Inf (the server rejects them: "
                               "--nonfinite reject)")
        return np.ascontiguousarray(x)

    def warm_up(self, max_batch: int) -> float:
        """Run every batch size up to ``max_batch`` once, at one and four time steps
        (hops for audio), so that the first real batch of each size does not pay for
        the device's per-shape set-up (memory arena growth, kernel selection) while
        clients wait. Returns the seconds it took; no session is touched (the runs read
        the zero row and write the row no session owns)."""
        started = time.perf_counter()
        hop = self.meta.input.hop_samples or 1
        # the sizes runs really have: with buckets, the buckets batches up to max_batch
        # are padded to (one above max_batch too), and every size above the last bucket
        sizes = sorted({self.padded_size(b) for b in range(1, max_batch + 1)})
        runs = GRAPH_CAPTURE_RUNS if self.options.cuda_graphs and not self._sealed else 1
        for steps in (1, 4):
            x = np.zeros((steps * hop, *self._frame_shape), dtype=self._np_dtype)
            for b in sizes:
                for _ in range(runs):
                    if not self._warming:
                        return time.perf_counter() - started
                    self.run_rows([x] * b, [ZERO] * b)
        return time.perf_counter() - started

    def stop_warming_up(self) -> None:
        """Stop a warm-up under way (from another thread) at its next run: a version
        loaded while serving, when the server stops meanwhile."""
        self._warming = False

    def seal(self) -> None:
        """No more CUDA graph captures: run shapes first seen from now on run from fixed
        buffers without one (called once every runner thread warmed up)."""
        self._sealed = True

    def padded_size(self, n: int) -> int:
        """The batch size a run of ``n`` sessions is padded to."""
        for size in self.buckets:
            if size >= n:
                return size
        return n

    def run_rows(self, xs: Sequence[np.ndarray], rows: Sequence[int],
                 out_rows: Sequence[int] | None = None, want_states: bool = False,
                 counts: Sequence[int] | None = None
                 ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]] | None]:
        """One onnxruntime call for the sessions of ``xs``, whose chunks share one length.

        ``xs[i]`` is session i's chunk (time, *frame); its state is read from pool row
        ``rows[i]`` and its new state written to ``out_rows[i]`` (default: the row no
        session owns, for stateless runs), on the device, in place. Returns per session
        its outputs (time, ...), and with ``want_states`` a host copy of its new state
        rows (for a checkpoint), else None. Padding rows, when the batch is padded to a
        bucket, read the zero row and write the trash row.

        With ``counts``, ``xs[i]`` is a block of ``counts[i]`` sessions' chunks
        (counts[i], time, *frame) when counts[i] > 0 (a single chunk when 0), ``rows``
        and ``out_rows`` have a row per session, in order, and a block's outputs and
        states are returned as one array per output (counts[i], time, ...): a packed
        request's sessions are split and joined as one piece, not one by one.
        """
        if counts is None:
            n = len(xs)
            x = _batch(xs, self.padded_size(n) - n)  # (size, T, *frame)
        else:
            n = sum(c or 1 for c in counts)
            x = _batch_blocks(xs, counts, self.padded_size(n) - n)
        res = self._run_batch(x, n, rows, out_rows, want_states)
        n_out = len(self.data_output_names)
        if counts is not None:
            return _split_blocks(res, n_out, counts, n == x.shape[0], want_states)
        # each session's own copy: a view would keep the whole batch's outputs alive as
        # long as its answer is kept (for retries), beyond what the session is counted for
        # (iterating an array yields its rows as views faster than indexing each)
        outputs = ([[r[0] for r in res[:n_out]]] if n == 1 and n == x.shape[0] else
                   [[a.copy()] for a in res[0][:n]] if n_out == 1 else
                   [[a.copy() for a in row]
                    for row in zip(*(r[:n] for r in res[:n_out]), strict=True)])
        if not want_states:
            return outputs, None
        return outputs, [[r[i] for r in res[n_out:]] for i in range(n)]

    def _run_batch(self, x: np.ndarray, n: int, rows: Sequence[int],
                   out_rows: Sequence[int] | None, want_states: bool) -> list[np.ndarray]:
        """The run of ``x`` (its first ``n`` rows sessions', the rest padding): the
        outputs, then with ``want_states`` the new states, each (size, ...)."""
        size = x.shape[0]
        pad = size - n
        gather = np.fromiter(rows, dtype=np.int64, count=n)
        scatter = (np.full(n, TRASH, dtype=np.int64) if out_rows is None else
                   np.fromiter(out_rows, dtype=np.int64, count=n))
        if pad:
            gather = np.concatenate([gather, np.full(pad, ZERO, dtype=np.int64)])
            scatter = np.concatenate([scatter, np.full(pad, TRASH, dtype=np.int64)])
        pool = self.pool
        pool.acquire(int(max(gather.max(), scatter.max())) + 1)  # grows it for new rows
        try:
            bound = None
            if size in self.buckets:
                bound = self._bound.get(x.shape)
                if bound is None and len(self._bound) < MAX_BOUND_SHAPES:
                    bound = self._bind(x, gather, scatter)  # None: the cap was reached
            if bound is not None:
                return bound.run(x, gather, scatter, want_states)
            b = self._binding()
            b.bind_cpu_input(self.meta.input.name, x)
            b.bind_cpu_input(GATHER, gather)
            b.bind_cpu_input(SCATTER, scatter)
            b.clear_binding_outputs()  # outputs bound again: fresh ones, never aliased
            pool.bind_outputs(b)
            for name in self.data_output_names:
                b.bind_output(name, "cpu")
            if want_states:
                for pair in self.meta.states:
                    b.bind_output(pair.output, "cpu")
            self.run_binding(b, self._plain)
            return [v.numpy() for v in b.get_outputs()[len(pool.specs):]]
        finally:
            pool.release()

    def run_binding(self, binding: ort.IOBinding, options: ort.RunOptions | None) -> None:
        """One onnxruntime run of a binding (alone, with CUDA graphs)."""
        if self._run_lock is None:
            self.session.run_with_iobinding(binding, options)
            return
        with self._run_lock:
            self.session.run_with_iobinding(binding, options)

    def _binding(self) -> ort.IOBinding:
        """This thread's binding for unbucketed runs, kept between runs (a new one costs
        about 50 us of set-up per run on the CPU), with the pools bound as inputs."""
        local = self._local
        if getattr(local, "session", None) is not self.session:
            local.session, local.binding, local.resizes = self.session, None, -1
        if local.binding is None:
            local.binding = self.session.io_binding()
        if local.resizes != self.pool.resizes:
            self.pool.bind(local.binding)
            local.resizes = self.pool.resizes
        binding: ort.IOBinding = local.binding
        return binding

    def _bind(self, x: np.ndarray, gather: np.ndarray, scatter: np.ndarray
              ) -> _Bound | None:
        """Fixed buffers for runs shaped like ``x``: one ordinary run (reading the zero
        row, writing the trash row) tells the outputs' shapes. None once
        ``MAX_BOUND_SHAPES`` shapes have them (runner threads may all have seen room)."""
        with self._bound_lock:
            bound = self._bound.get(x.shape)
            if bound is not None or len(self._bound) >= MAX_BOUND_SHAPES:
                return bound
            b = self.session.io_binding()
            b.bind_cpu_input(self.meta.input.name, x)
            b.bind_cpu_input(GATHER, np.full_like(gather, ZERO))
            b.bind_cpu_input(SCATTER, np.full_like(scatter, TRASH))
            self.pool.bind(b)
            names = self.data_output_names + [p.output for p in self.meta.states]
            for name in names:
                b.bind_output(name, self.pool.device, self.options.device_id)
            self.run_binding(b, self._plain)
            got = b.get_outputs()[len(self.pool.specs):]
            shapes = [(tuple(v.shape()), v.numpy().dtype) for v in got]  # once per shape
            graph_id = len(self._bound) + 1 if self.options.cuda_graphs and \
                not self._sealed else None
            bound = _Bound(self, x, names, shapes, graph_id)
            self._bound[x.shape] = bound
            log.info("%s v%d: fixed buffers for batch %d x %d time steps%s", self.name,
                     self.version, x.shape[0], x.shape[1],
                     f" (CUDA graph {graph_id})" if graph_id else "")
            return bound

    def run(self, xs: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray]]
            ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """``run_rows`` for states held on the host (tests, tools): each state is put
        into a pool row of its own for the run; returns outputs and new states."""
        pool = self.pool
        rows = [pool.alloc() for _ in xs]
        out_rows = [pool.alloc() for _ in xs]
        try:
            for row, state in zip(rows, states, strict=True):
                pool.write(row, state)
            outputs, new = self.run_rows(xs, rows, out_rows, want_states=True)
            assert new is not None
            return outputs, [[a.copy() for a in s] for s in new]
        finally:
            for row in rows + out_rows:
                pool.free(row)


def _batch(xs: Sequence[np.ndarray], pad: int) -> np.ndarray:
    """The chunks ``xs`` (one length) as one array (B + pad, T, *frame), ``pad`` zero
    chunks last. One concatenate: np.stack makes a view per chunk (3.2 ms for 4,096
    chunks on the 2-core VM, against 1.2 ms here with the length check); on the H100
    host it was half the runner thread's time at batch 4,096."""
    first = xs[0]
    if len(xs) > 1 and len(set(map(len, xs))) != 1:  # other axes: concatenate checks
        raise ValueError(f"one run's chunks must share one length, got "
                         f"{sorted(set(map(len, xs)))}")
    parts = [*xs, np.zeros((pad * len(first), *first.shape[1:]), first.dtype)] if pad \
        else xs
    return np.concatenate(parts).reshape(len(xs) + pad, *first.shape)


def _batch_blocks(xs: Sequence[np.ndarray], counts: Sequence[int], pad: int) -> np.ndarray:
    """``_batch`` of single chunks (count 0) and blocks of chunks (count k: shaped
    (k, T, *frame)) in their order; a block is joined as one piece."""
    lengths = {x.shape[1] if c else x.shape[0] for x, c in zip(xs, counts, strict=True)}
    if len(lengths) != 1:
        raise ValueError(f"one run's chunks must share one length, got {sorted(lengths)}")
    first = next(x[0] if c else x for x, c in zip(xs, counts, strict=True))
    parts = [x.reshape(-1, *first.shape[1:]) if c else x
             for x, c in zip(xs, counts, strict=True)]
    if pad:
        parts.append(np.zeros((pad * len(first), *first.shape[1:]), first.dtype))
    n = sum(c or 1 for c in counts)
    if len(parts) == 1:
        return parts[0].reshape(n + pad, *first.shape)
    return np.concatenate(parts).reshape(n + pad, *first.shape)


def _split_blocks(res: list[np.ndarray], n_out: int, counts: Sequence[int], whole: bool,
                  want_states: bool
                  ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]] | None]:
    """``run_rows``'s answer per step of ``counts``: a single chunk's outputs (and
    states) row by row, a block's as its rows of each array. A block that is the whole
    run (``whole``: one block, no padding) keeps the run's arrays; others are copies,
    which do not keep the rest of the run alive."""
    outputs: list[list[np.ndarray]] = []
    states: list[list[np.ndarray]] | None = [] if want_states else None
    start = 0
    for c in counts:
        if c:
            end = start + c
            outputs.append([r[start:end] if whole else r[start:end].copy()
                            for r in res[:n_out]])
            if states is not None:
                states.append([r[start:end] for r in res[n_out:]])
        else:
            end = start + 1
            outputs.append([r[start].copy() for r in res[:n_out]])
            if states is not None:
                states.append([r[start] for r in res[n_out:]])
        start = end
    return outputs, states


class _Bound:
    """The inputs and outputs of one run shape (bucket, chunk length) in fixed buffers on
    the model's device, bound once: a run copies the chunks and row numbers in, replays
    (with CUDA graphs, the captured graph), and copies the outputs out. One run at a
    time per shape."""

    def __init__(self, rt: ModelRuntime, x: np.ndarray, names: list[str],
                 shapes: list[tuple[tuple[int, ...], np.dtype[Any]]],
                 graph_id: int | None) -> None:
        dev, dev_id = rt.pool.device, rt.options.device_id
        self.rt = rt
        self.lock = threading.Lock()

        def buffer(shape: tuple[int, ...], dtype: np.dtype[Any]) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, dev, dev_id)

        self.x = buffer(x.shape, x.dtype)
        self.gather = buffer((x.shape[0],), np.dtype(np.int64))
        self.scatter = buffer((x.shape[0],), np.dtype(np.int64))
        self.outs = [buffer(shape, dt) for shape, dt in shapes]
        self.n_data = len(rt.data_output_names)
        self.copy = dev == "cpu"  # host buffers: the outputs must not alias the next run
        # update_inplace copies from pageable memory with cudaMemcpy, which may return
        # before its DMA lands, and the run goes on onnxruntime's own (non-blocking)
        # stream: reading the last buffer written back waits for every copy before it
        self.fence = dev == "cuda"
        self.binding = rt.session.io_binding()
        self.binding.bind_ortvalue_input(rt.meta.input.name, self.x)
        self.binding.bind_ortvalue_input(GATHER, self.gather)
        self.binding.bind_ortvalue_input(SCATTER, self.scatter)
        for name, value in zip(names, self.outs, strict=True):
            self.binding.bind_ortvalue_output(name, value)
        self.pool_resizes = -1  # the pools are bound at the first run (and after growth)
        self.options = rt._plain  # not captured: None, or gpu_graph_id -1 with graphs on
        if graph_id is not None:
            self.options = ort.RunOptions()
            self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def run(self, x: np.ndarray, gather: np.ndarray, scatter: np.ndarray,
            want_states: bool) -> list[np.ndarray]:
        pool = self.rt.pool
        with self.lock:
            self.x.update_inplace(x)
            self.gather.update_inplace(gather)
            self.scatter.update_inplace(scatter)
            if self.fence:
                self.scatter.numpy()
            if self.pool_resizes != pool.resizes:
                pool.bind(self.binding)
                self.pool_resizes = pool.resizes
            self.rt.run_binding(self.binding, self.options)
            wanted = self.outs if want_states else self.outs[:self.n_data]
            res = [v.numpy() for v in wanted]
            return [r.copy() for r in res] if self.copy else res


class ModelRegistry:
    """Every version of every model in a repository, loaded at start (and, with ``serve
    --repo-poll-s``, those the repository gains while serving: ``add``; one removed
    from it is ``withdrawn``: no longer the one a request that names no version gets,
    unless all of its model's are, served on when named)."""

    def __init__(self, repo: str | Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.repo = Path(repo)
        self.options = options
        self._models: dict[tuple[str, int], ModelRuntime] = {}
        self.withdrawn: set[tuple[str, int]] = set()
        for mv in repository.list_models(self.repo):
            self._models[(mv.name, mv.version)] = ModelRuntime(mv.path, mv.name, mv.version,
                                                               options)

    def __iter__(self) -> Any:
        return iter(sorted(self._models.values(), key=lambda m: m.key))

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: tuple[str, int]) -> bool:
        return key in self._models

    def add(self, runtime: ModelRuntime) -> None:
        """A version loaded after the start (``serve --repo-poll-s``)."""
        self._models[runtime.key] = runtime

    def get(self, name: str, version: int | None = None) -> ModelRuntime:
        """The named version, or when ``version`` is None or 0 the highest not withdrawn
        (the highest if every one is: a model removed whole serves on until a restart)."""
        if version:
            found = self._models.get((name, version))
            if found is not None:  # the per-chunk path: one dict lookup
                return found
        versions = sorted(v for n, v in self._models if n == name)
        if not versions:
            names = sorted({n for n, _ in self._models})
            raise ModelNotFound(f"model {name!r} not found; available: {names}")
        if not version:
            kept = [v for v in versions if (name, v) not in self.withdrawn] or versions
            return self._models[(name, kept[-1])]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; "
                                f"available: {versions}")
        return self._models[(name, version)]
