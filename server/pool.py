"""Session state kept where the model runs: one pool row per session, per state pair.

A model's state pairs (``h_in -> h_out`` ...) become pools: one tensor per pair shaped
``(rows, *row_shape)`` on the model's device (host memory on the CPU, GPU memory with
CUDA). The model's graph is extended at load (``pooled_model``) so that one run

- gathers the batch's state rows from the pools (``Gather`` on the row indices
  ``rnnserve_gather``),
- runs the recurrent model unchanged,
- scatters the new states into other rows of the same pools (``ScatterND`` on
  ``rnnserve_scatter``); the pools are bound as both input and output of the run
  (onnxruntime's IOBinding), so onnxruntime writes the rows in place: no copy of a
  pool, and no state leaves the device on a step.

New states go to *fresh* rows (copy on write): a step's old row is released only once
its new state is accepted (delivered, and committed to a shared store where there is
one). A step that is cancelled, fails or is refused by the store leaves the session's
row as it was. Row 0 is the zero state (every new session starts from it, and padding
rows read it) and row 1 takes what padding rows write; neither is ever handed out.

Rows in flight are pinned: a session that ends while its step still waits to run keeps
its row until that run has read it, so the row is never reused under a queued gather.

A growable pool hands out rows beyond its buffers at once and grows them in the run
that first needs those rows (in a worker thread, never on the event loop), once the
runs using the old buffers are done; the old rows are copied into the new buffers on
the device (a ``ScatterND`` run), so growth brings no state to the host either.

Free rows are handed out lowest first, and every step moves its session to a fresh
row, so the sessions that go on settle in the low rows after a burst. When the rows
handed out fit in a quarter of the buffers, the server shrinks them (``trim_target``,
then ``shrink`` in a worker thread, the same way as growth: after the runs in flight,
the kept rows copied on the device), down to the pool's first size at the least.

The same code runs on both devices; on the CPU the pools are numpy arrays that
onnxruntime reads and writes through the binding, so CI runs every line of the row
bookkeeping, the graph extension and the binding that the GPU path runs.
"""

from __future__ import annotations

import heapq
import logging
import mmap
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rnnserve.server.errors import Overloaded

ZERO = 0  # the zero state, read by new sessions and by padding rows; never written
TRASH = 1  # written by padding rows and stateless requests; never read as a state
FIRST = 2  # the first row handed out to a session
SHRINK = "memory.enable_memory_arena_shrinkage"  # onnxruntime's run option

log = logging.getLogger("rnnserve.pool")

GATHER = "rnnserve_gather"
SCATTER = "rnnserve_scatter"
_SCATTER_2D = "rnnserve_scatter_2d"
_AXES = "rnnserve_axes_1"


def pool_input(j: int) -> str:
    return f"rnnserve_pool_{j}"


def pool_output(j: int) -> str:
    return f"rnnserve_pool_{j}_out"


@dataclass(frozen=True)
class PoolSpec:
    """One state pair as the pool sees it."""

    input: str  # the model's state input, fed by the gather
    output: str  # the model's new-state output, scattered into the pool
    row_shape: tuple[int, ...]
    dtype: np.dtype[Any]

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _elem(dtype: np.dtype[Any]) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype)


def _rows_info(name: str, spec: PoolSpec, rows: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, _elem(spec.dtype), [rows, *spec.row_shape])


def pooled_model(model: onnx.ModelProto, specs: Sequence[PoolSpec]) -> onnx.ModelProto:
    """``model`` with its state inputs gathered from pools and its new states scattered
    back into them: inputs ``rnnserve_pool_J`` (rows, *row), ``rnnserve_gather`` and
    ``rnnserve_scatter`` (batch,) int64 instead of the state inputs; outputs
    ``rnnserve_pool_J_out`` besides the model's own outputs (the new-state outputs stay,
    for a host copy when a checkpoint needs one)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    state_inputs = {s.input for s in specs}
    kept = [i for i in graph.input if i.name not in state_inputs]
    if len(kept) != len(graph.input) - len(specs):
        raise ValueError(f"the graph lacks state inputs {sorted(state_inputs)}")
    outputs = {o.name for o in graph.output}
    for s in specs:
        if s.output not in outputs:
            raise ValueError(f"the graph lacks the state output {s.output!r}")
    del graph.input[:]
    graph.input.extend(kept)
    graph.input.extend(_rows_info(pool_input(j), s, "pool_rows") for j, s in enumerate(specs))
    graph.input.extend(helper.make_tensor_value_info(n, TensorProto.INT64, ["batch"])
                       for n in (GATHER, SCATTER))
    graph.initializer.append(helper.make_tensor(_AXES, TensorProto.INT64, [1], [1]))
    head = [helper.make_node("Gather", [pool_input(j), GATHER], [s.input], axis=0,
                             name=f"rnnserve_gather_{j}") for j, s in enumerate(specs)]
    head.append(helper.make_node("Unsqueeze", [SCATTER, _AXES], [_SCATTER_2D],
                                 name="rnnserve_scatter_rows"))
    tail = [helper.make_node("ScatterND", [pool_input(j), _SCATTER_2D, s.output],
                             [pool_output(j)], name=f"rnnserve_scatter_{j}")
            for j, s in enumerate(specs)]
    nodes = [*head, *graph.node, *tail]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.output.extend(_rows_info(pool_output(j), s, "pool_rows")
                        for j, s in enumerate(specs))
    return out


def _rows_model(specs: Sequence[PoolSpec], opset: int) -> onnx.ModelProto:
    """Row access for restores and inspection: ``rnnserve_read_J`` = the rows
    ``rnnserve_gather`` of each pool; the pools get ``rnnserve_rows_J`` written at the
    rows ``rnnserve_scatter`` (in place, as in the pooled model)."""
    inputs = [_rows_info(pool_input(j), s, "pool_rows") for j, s in enumerate(specs)]
    inputs += [_rows_info(f"rnnserve_rows_{j}", s, "k") for j, s in enumerate(specs)]
    inputs += [helper.make_tensor_value_info(n, TensorProto.INT64, ["k"])
               for n in (GATHER, SCATTER)]
    nodes = [helper.make_node("Unsqueeze", [SCATTER, _AXES], [_SCATTER_2D])]
    outputs = []
    for j, s in enumerate(specs):
        nodes.append(helper.make_node("Gather", [pool_input(j), GATHER],
                                      [f"rnnserve_read_{j}"], axis=0))
        nodes.append(helper.make_node("ScatterND", [pool_input(j), _SCATTER_2D,
                                                    f"rnnserve_rows_{j}"], [pool_output(j)]))
        outputs += [_rows_info(f"rnnserve_read_{j}", s, "k"),
                    _rows_info(pool_output(j), s, "pool_rows")]
    return _small_model("rnnserve_pool_rows", nodes, inputs, outputs, opset)


def _copy_model(specs: Sequence[PoolSpec], opset: int) -> onnx.ModelProto:
    """Resizing: rows ``rnnserve_scatter`` (0..k-1) of the old pools ``rnnserve_old_J``
    written into the same rows of the new ones, in place; the new pools may be larger
    (growth) or smaller (shrinking) than the old."""
    inputs = [_rows_info(pool_input(j), s, "pool_rows") for j, s in enumerate(specs)]
    inputs += [_rows_info(f"rnnserve_old_{j}", s, "old_rows") for j, s in enumerate(specs)]
    inputs.append(helper.make_tensor_value_info(SCATTER, TensorProto.INT64, ["k"]))
    nodes = [helper.make_node("Unsqueeze", [SCATTER, _AXES], [_SCATTER_2D])]
    for j in range(len(specs)):
        nodes.append(helper.make_node("Gather", [f"rnnserve_old_{j}", SCATTER],
                                      [f"rnnserve_kept_{j}"], axis=0))
        nodes.append(helper.make_node("ScatterND", [pool_input(j), _SCATTER_2D,
                                                    f"rnnserve_kept_{j}"], [pool_output(j)]))
    outputs = [_rows_info(pool_output(j), s, "pool_rows") for j, s in enumerate(specs)]
    return _small_model("rnnserve_pool_copy", nodes, inputs, outputs, opset)


def _small_model(name: str, nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                 outputs: list[onnx.ValueInfoProto], opset: int) -> onnx.ModelProto:
    """A helper graph of the pool's own (row access, growth), with the axes constant
    its row-index ``Unsqueeze`` reads."""
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              initializer=[helper.make_tensor(_AXES, TensorProto.INT64, [1],
                                                              [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _zeros(shape: tuple[int, ...], dtype: np.dtype[Any]) -> np.ndarray:
    """Zeros in host memory of their own: an anonymous mapping for a large buffer, whose
    pages hold no memory until written (a pool's rows beyond those handed out cost
    nothing resident) and which goes back to the system whole when the buffer is
    dropped (a resize's old buffers; from malloc, a freed buffer below its mmap
    threshold stays in the heap)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes < (1 << 20):
        return np.zeros(shape, dtype)
    # private: a page read before it is written (the copy to a CUDA device reads them
    # all) maps the shared zero page; a shared mapping would give it memory
    mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return np.frombuffer(mapping, dtype).reshape(shape)


class PoolFull(Overloaded):
    """A fixed-size pool (CUDA graphs need fixed addresses) has no free row: the step or
    the session moving in is refused with RESOURCE_EXHAUSTED, like a full queue."""

    def __init__(self, message: str) -> None:
        super().__init__(message + "; retry later or on another replica (or raise "
                         "--pool-rows)", retry_after_ms=1000)


def refused_shrink(error: BaseException) -> bool:
    """Whether a run failed because onnxruntime refused its arena shrink request (no
    arena allocator on the device named), which it checks before running any node;
    not any other failure that mentions an arena (its out-of-memory errors name
    ``bfc_arena.cc``)."""
    return "memory arena shrink list" in str(error)


class StatePool:
    """The state pools of one model version on one device, and their rows' owners.

    ``alloc``/``free``/``pin``/``unpin`` are called from the event loop only (no lock:
    one thread changes the row lists) and never wait for a run; runs (in worker
    threads) hold ``acquire(rows)``/``release()`` around binding and running, which
    holds off a resize of the pools (growth replaces the buffers) but not other runs:
    concurrent runs touch disjoint rows. A run whose rows lie beyond the buffers grows
    them in ``acquire`` first.
    """

    def __init__(self, specs: Sequence[PoolSpec], *, device: str = "cpu", device_id: int = 0,
                 providers: list[Any] | None = None, rows: int = 64, growable: bool = True,
                 opset: int = 17, shrink_arena: str | None = None) -> None:
        self.specs = list(specs)
        self.device, self.device_id = device, device_id
        self.growable = growable
        self.row_bytes = sum(s.row_bytes for s in self.specs)
        self._free: list[int] = []
        self._next = FIRST  # rows below this have been handed out at least once
        self._pins: dict[int, int] = {}
        self._doomed: set[int] = set()
        self._resize = threading.Condition()  # growth vs runs
        self._runs = 0
        self._growing = False
        self.capacity = 0
        self.buffers: list[Any] = []  # numpy arrays on the CPU, kept alive beside the values
        self.values: list[ort.OrtValue] = []
        self.resizes = 0
        # bindings that hold the buffers (bind): bound to the new ones at a resize, so
        # the old buffers go at once (on CUDA the bindings' references kept device
        # memory until each run shape ran again, which after a shrink may be never)
        self._holders: weakref.WeakSet[ort.IOBinding] = weakref.WeakSet()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        # no arena: a resize's copy gathers the kept rows into a temporary as large as
        # the old pool, which an arena would keep (100,000 speech-small sessions held
        # 0.55 x their state more resident); freed, it goes back at once
        so.enable_cpu_mem_arena = False
        providers = providers or ["CPUExecutionProvider"]
        self._rows = ort.InferenceSession(_rows_model(self.specs, opset).SerializeToString(),
                                          so, providers=providers)
        self._copy = ort.InferenceSession(_copy_model(self.specs, opset).SerializeToString(),
                                          so, providers=providers)
        # the same for the device's arena: shrunk after each copy ("gpu:N", onnxruntime's
        # form); an onnxruntime that finds no arena there refuses the run, and the copy
        # then runs again without asking (a resize must not fail for memory it saves)
        if shrink_arena is None:
            shrink_arena = f"gpu:{device_id}" if device != "cpu" else ""
        self.shrink_arena = shrink_arena
        self._copy_options = ort.RunOptions()
        if shrink_arena:
            self._copy_options.add_run_config_entry(SHRINK, shrink_arena)
        self._allocate(max(rows, FIRST + 1), None)
        self.first_rows = self.capacity  # shrinking stops here

    # -- rows -------------------------------------------------------------------------

    @property
    def used(self) -> int:
        """Rows held by sessions and steps in flight (row 0 and 1 not counted)."""
        return self._next - FIRST - len(self._free)

    def alloc(self) -> int:
        """A free row; on a growable pool it may lie beyond the buffers until the run
        that uses it grows them (``acquire``)."""
        if self._free:
            return heapq.heappop(self._free)  # the lowest: sessions settle low
        if self._next >= self.capacity and not self.growable:
            raise PoolFull(f"the state pool holds {self.capacity - FIRST} rows, all in use")
        row = self._next
        self._next += 1
        return row

    def free(self, row: int) -> None:
        if row < FIRST:
            return
        if row in self._pins:
            self._doomed.add(row)  # a queued run still reads it: freed after that run
        else:
            heapq.heappush(self._free, row)

    def pin(self, row: int) -> None:
        """Keep ``row`` from reuse until ``unpin``: a step waiting to run reads it."""
        if row < FIRST:
            return
        pins = self._pins
        pins[row] = pins.get(row, 0) + 1

    def unpin(self, row: int) -> None:
        if row < FIRST:
            return
        left = self._pins[row] - 1
        if left:
            self._pins[row] = left
            return
        del self._pins[row]
        if row in self._doomed:
            self._doomed.discard(row)
            heapq.heappush(self._free, row)

    # -- buffers ----------------------------------------------------------------------

    def trim_target(self) -> int:
        """The size the buffers may shrink to (``shrink``), or 0 while the rows handed
        out need more than a quarter of them; first lowers the mark of rows handed out
        past the free rows at its top. Event loop only (it reorders the free rows). A
        fixed pool never grows past its first size, so it never has anything to give."""
        if 2 * max(self.first_rows, 2 * (FIRST + self.used)) > self.capacity:
            return 0  # not even with the rows in use at the bottom: no need to look
        # only when the top row handed out is free: an idle session high in the pool
        # blocks the shrink until it steps or ends, and re-sorting for nothing every
        # period would cost the loop ~20 ms per 100k free rows (max: ~2 ms)
        if self._free and max(self._free) == self._next - 1:
            free = sorted(self._free)  # sorted: a heap as it is
            while free and free[-1] == self._next - 1:
                free.pop()
                self._next -= 1
            self._free = free
        target = max(self.first_rows, 2 * self._next)
        return target if 2 * target <= self.capacity else 0

    def shrink(self, rows: int) -> bool:
        """Shrink the buffers to ``rows`` rows, or to the rows handed out by the time the
        runs in flight are done if more; the kept rows are copied on the device. Called
        from a worker thread (it waits for those runs, as growth does). False when there
        was nothing to give back."""
        with self._resize:
            while self._growing:
                self._resize.wait()
            self._growing = True  # no new run starts, and no growth
            while self._runs:
                self._resize.wait()
        try:
            # rows handed out since trim_target stay: none of them was written yet (no
            # run has started since), and a run beyond the new buffers grows them again
            keep = max(rows, self._next, self.first_rows)
            if keep >= self.capacity:
                return False
            self._allocate(keep, self.values)
            self.resizes += 1
            return True
        finally:
            with self._resize:
                self._growing = False
                self._resize.notify_all()

    def _allocate(self, rows: int, old: list[ort.OrtValue] | None) -> None:
        """New buffers of ``rows`` rows (zeros), the rows of ``old`` that fit copied into
        them on the device."""
        buffers, values = [], []
        for s in self.specs:
            host = _zeros((rows, *s.row_shape), s.dtype)
            if self.device == "cpu":
                buffers.append(host)  # onnxruntime reads and writes this very memory
                values.append(ort.OrtValue.ortvalue_from_numpy(host))
            else:
                values.append(ort.OrtValue.ortvalue_from_numpy(host, self.device,
                                                               self.device_id))
        if old is not None:
            b = self._copy.io_binding()
            for j, (new, was) in enumerate(zip(values, old, strict=True)):
                b.bind_ortvalue_input(pool_input(j), new)
                b.bind_ortvalue_input(f"rnnserve_old_{j}", was)
                b.bind_ortvalue_output(pool_output(j), new)
            b.bind_cpu_input(SCATTER, np.arange(min(rows, self.capacity), dtype=np.int64))
            self._run_copy(b)
        self.buffers, self.values, self.capacity = buffers, values, rows
        for holder in list(self._holders):  # no run holds the pool now (resizes wait)
            self.bind(holder)

    def _run_copy(self, binding: ort.IOBinding) -> None:
        try:
            self._copy.run_with_iobinding(binding, self._copy_options)
        except Exception as e:  # onnxruntime's InvalidArgument, checked before any node ran
            if not self.shrink_arena or not refused_shrink(e):
                raise  # a real failure (the device's memory, say: "bfc_arena.cc ...")
            log.warning("state pool: onnxruntime refused to shrink the arena %r after a "
                        "resize (%s); resizes go on without asking", self.shrink_arena,
                        str(e).strip().splitlines()[-1])
            self.shrink_arena = ""
            self._copy_options = ort.RunOptions()
            self._copy.run_with_iobinding(binding, self._copy_options)

    def acquire(self, rows: int = 0) -> None:
        """A run starts using the buffers, rows 0..``rows``-1 of them (no resize until
        ``release``). Rows beyond the buffers grow them first (doubling), once the runs
        using them are done; rows keep their contents."""
        with self._resize:
            while True:
                if self._growing:
                    self._resize.wait()
                elif rows <= self.capacity:
                    self._runs += 1
                    return
                elif not self.growable:  # alloc refuses such rows: a caller's bug
                    raise ValueError(f"row {rows - 1} lies beyond a fixed pool of "
                                     f"{self.capacity} rows")
                else:
                    self._growing = True  # no new run starts: this one waits for fewer
                    while self._runs:
                        self._resize.wait()
                    break
        try:
            self._allocate(max(rows, 2 * self.capacity), self.values)
            self.resizes += 1
        finally:
            with self._resize:
                self._growing = False
                self._resize.notify_all()
        self.acquire(rows)

    def release(self) -> None:
        with self._resize:
            self._runs -= 1
            if not self._runs:
                self._resize.notify_all()

    def bind(self, binding: ort.IOBinding) -> None:
        """Bind every pool as input and, in place, as output of a run (with ``acquire``
        held); a resize binds the new buffers to it as long as it lives."""
        for j, v in enumerate(self.values):
            binding.bind_ortvalue_input(pool_input(j), v)
        self.bind_outputs(binding)
        self._holders.add(binding)

    def bind_outputs(self, binding: ort.IOBinding) -> None:
        for j, v in enumerate(self.values):
            binding.bind_ortvalue_output(pool_output(j), v)

    def write(self, row: int, arrays: Sequence[np.ndarray]) -> None:
        """Put one session's state (host arrays, one per pair) into ``row``."""
        if row < FIRST:
            raise ValueError(f"row {row} is reserved")
        self._access([row], [[np.asarray(a, dtype=s.dtype)] for a, s in
                             zip(arrays, self.specs, strict=True)])

    def read(self, rows: Sequence[int]) -> list[np.ndarray]:
        """The states at ``rows``, copied to the host: one (len(rows), *row) per pair."""
        return self._access(list(rows), None)

    def _access(self, rows: list[int], writes: list[list[np.ndarray]] | None
                ) -> list[np.ndarray]:
        self.acquire(max(rows, default=-1) + 1)
        try:
            b = self._rows.io_binding()
            self.bind(b)
            idx = np.asarray(rows, dtype=np.int64)
            b.bind_cpu_input(GATHER, idx)
            b.bind_cpu_input(SCATTER, idx if writes is not None else
                             np.full(len(rows), TRASH, dtype=np.int64))
            for j, s in enumerate(self.specs):
                data = np.stack(writes[j]) if writes is not None else \
                    np.zeros((len(rows), *s.row_shape), dtype=s.dtype)
                b.bind_cpu_input(f"rnnserve_rows_{j}", np.ascontiguousarray(data))
                if writes is None:
                    b.bind_output(f"rnnserve_read_{j}", "cpu")
            self._rows.run_with_iobinding(b)
            if writes is not None:
                return []
            return [v.numpy() for v in b.get_outputs()[len(self.specs):]]
        finally:
            self.release()


class PoolState:
    """A live session's state: its row in its model's pool."""

    __slots__ = ("pool", "row")

    def __init__(self, pool: StatePool, row: int = ZERO) -> None:
        self.pool, self.row = pool, row

    @property
    def nbytes(self) -> int:
        return self.pool.row_bytes

    @property
    def arrays(self) -> list[np.ndarray]:
        """A host copy, one array per state pair (for inspection and tests)."""
        return [a[0] for a in self.pool.read([self.row])]

    def release(self) -> None:
        self.pool.free(self.row)

    def __repr__(self) -> str:
        return f"PoolState(row={self.row})"
