"""Verification of an exported model against its contract.

Runs at the end of every export and as ``rnnserve verify MODEL``. Checks:

1. structure: the ONNX checker passes; metadata parses; graph inputs/outputs carry
   the declared names, dtypes and sizes with dynamic ``batch`` (and ``time``) axes;
2. ops: native ``LSTM``/``GRU`` nodes, one per layer, no ``Loop``/``Scan``; every GRU
   node has ``linear_before_reset=1`` (PyTorch's formulation);
3. streaming: at random batch sizes 1..16 and sequence lengths never seen at export,
   random chunkings run with the state carried forward give the outputs and final
   state of one whole-sequence run; feature inputs are standard normal, and in every
   other case scaled by 10 or 100 (``FEATURE_SCALES``), so a graph that froze what the
   traced input did (a branch on the input's size) disagrees with torch;
4. batching: each row of a batched run equals that row run alone (the server batches
   unrelated sessions together);
5. parity with torch, when the torch model is at hand: outputs and final states
   (a model or checkpoint of another architecture or size is refused with what
   differs; a module that does not run in float64, e.g. one that casts its input
   with ``x.float()``, is compared in float32 alone);
6. speech models (PCM16 input, front end in the graph): the graph's log-mel front
   end, cut out of the ONNX file, against the offline float64 reference of
   ``rnnserve.audio.log_mel`` on a test signal; with the torch model at hand, the
   whole graph from PCM against the torch float64 recurrent part fed with the
   offline features.

Every comparison starts from random non-zero states. The largest absolute
differences are printed and written into the model's ``rnnserve.verification``
(where the file cannot be written, e.g. a read-only repository, a warning says so and
the result stands). Without a torch model the torch figures of the last run that had
one (the export's, as a rule) are kept, with when they were measured
(``torch_figures_from``): a plain ``rnnserve verify`` does not erase them.

Tolerances. Streaming and batching compare onnxruntime with itself and must agree
within ``tolerance`` (1e-5) in absolute terms; measured, they agree exactly. ONNX vs
torch compares two float32 implementations whose sums run in different orders. It
passes when the largest difference is within ``tolerance``; trained language models
have logits near 40 and LSTM cell states near 100, where float32 steps are 4e-6 to
8e-6 and a few of them exceed 1e-5. So verification also runs torch in float64 (the
exact answer, for this purpose) and a larger difference passes only when it is
float32 rounding: onnxruntime is no farther from float64 than twice torch float32's
own distance from it, plus ``tolerance``. Both distances are reported.

fp16 models (``rnnserve export --fp16``: recurrent layers and their states in half
precision) have their own bound, relative to the size of what is compared: each
tensor (the output, each state) passes when its largest difference is within
``FP16_RTOL`` (1e-2) times its own largest magnitude in the reference (at least 1);
a bound taken over all of them together would let a large cell state widen the
bound of small outputs. ``tolerance`` does not apply to them: the export verified
the fp32 graph at ``tolerance`` before converting it (recorded as ``fp32_graph``), as
fp16's bound is far too wide to show that chunked streaming is exact (measured: a
module subtracting 2% of its output's mean over the chunk differs by 3.4e-3). Measured
on 16 random untrained GRUs and LSTMs (bytes and features, hidden 24 and 64), chunked vs whole
reached 6% of each tensor's bound. The reference for parity is the
fp32 torch model; streaming and batching compare the fp16 graph with itself, where
the state is rounded to fp16 at every chunk boundary. Against torch, feature inputs
scaled beyond ``FP16_PLAIN_SCALE`` (10) get a bound grown in proportion to their
scale: fp16 rounds the recurrent layers' inputs and weights relative to their size,
so the difference grows with the input's (measured on random GRUs and LSTMs: about
2e-4, 1e-3 and 4.5e-3 to 1.6e-2 at x1, x10 and x100; 3 of 18 GRUs were refused at x100
before). The x100 cases are there to catch a graph that froze a branch on the input's
size, which differs from torch by far more than that.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rnnserve.errors import MissingDependencyError, ModelMetadataError, VerificationError
from rnnserve.export.metadata import ModelMetadata

FORBIDDEN_OPS = ("Loop", "Scan")
TOLERANCE = 1e-5  # fp32 models: the largest absolute difference, by default
FP16_RTOL = 1e-2  # fp16 models: per tensor, largest difference / max(1, largest |reference|)
FP16_PLAIN_SCALE = 10.0  # fp16 vs torch: feature scales beyond this widen the bound
RECURRENT_OP = {"lstm": "LSTM", "gru": "GRU"}
MAX_BATCH = 16
FEATURE_SCALES = (1.0, 1.0, 10.0, 100.0)  # feature input of case i: N(0, 1) x [i % 4]


# the figures a run without the torch model keeps from the last one with it
TORCH_FIGURES = ("max_abs_diff_vs_torch", "torch_float32_vs_float64", "onnx_vs_float64")
# what an fp16 model's record keeps of the fp32 graph's verification at export
FP32_GRAPH_FIGURES = ("passed", "tolerance", "max_abs_diff_chunked_vs_whole",
                      "max_abs_diff_batched_vs_single", *TORCH_FIGURES, "torch_parity",
                      "cases", "verified_at")


@dataclass
class VerificationReport:
    path: str
    tolerance: float | None  # None for fp16 models: FP16_BOUND_TEXT applies instead
    failures: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)
    max_abs_diff_chunked_vs_whole: float = 0.0
    max_abs_diff_batched_vs_single: float = 0.0
    max_abs_diff_vs_torch: float | None = None
    frontend_vs_offline: float | None = None  # log-mel features, graph vs numpy float64
    posteriors_vs_offline: float | None = None  # graph from PCM vs torch on offline features
    torch_vs_float64: float | None = None
    onnx_vs_float64: float | None = None
    torch_parity: str = "not run"
    # when parity did not run: the verification the kept torch figures come from
    torch_figures_from: dict[str, Any] | None = None
    precision: str = "fp32"  # fp16: every bound is FP16_RTOL relative (module docstring)
    fp32_graph: dict[str, Any] | None = None  # fp16: the fp32 graph's check at export
    cases: list[tuple[int, int, int]] = field(default_factory=list)  # (batch, time, chunks)
    input_scales: list[float] = field(default_factory=list)  # feature inputs: N(0, 1) x these
    seconds: float = 0.0
    written: bool = False  # the report went into the file (not part of the metadata)

    @property
    def passed(self) -> bool:
        return not self.failures

    def raise_if_failed(self) -> None:
        if self.failures:
            raise VerificationError(f"{self.path}: verification failed: {'; '.join(self.failures)}")

    def to_metadata(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "tolerance": self.tolerance,
            "precision": self.precision,
            **({"fp16_bound": FP16_BOUND_TEXT} if self.precision == "fp16" else {}),
            "max_abs_diff_vs_torch": self.max_abs_diff_vs_torch,
            "torch_float32_vs_float64": self.torch_vs_float64,
            "onnx_vs_float64": self.onnx_vs_float64,
            "torch_parity": self.torch_parity,
            **({"torch_figures_from": self.torch_figures_from}
               if self.torch_figures_from is not None else {}),
            **({"fp32_graph": self.fp32_graph} if self.precision == "fp16" else {}),
            "max_abs_diff_chunked_vs_whole": self.max_abs_diff_chunked_vs_whole,
            "max_abs_diff_batched_vs_single": self.max_abs_diff_batched_vs_single,
            **({"frontend_vs_offline": self.frontend_vs_offline,
                "posteriors_vs_offline": self.posteriors_vs_offline}
               if self.frontend_vs_offline is not None else {}),
            "cases": len(self.cases),
            "batch_sizes": sorted({c[0] for c in self.cases}),
            "lengths": sorted({c[1] for c in self.cases}),
            **({"input_scales": self.input_scales} if self.input_scales else {}),
            "ops": self.ops,
            "onnxruntime": _ort().__version__,
            "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError(
            "verification needs the onnx package: pip install 'rnnserve[train]'"
        ) from exc
    return onnx


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b|; infinite when shapes differ or anything is not finite."""
    if a.shape != b.shape:
        return math.inf
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if d.size == 0:
        return 0.0
    if not np.isfinite(d).all():
        return math.inf
    return float(d.max())


def _dims(value_info: Any) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def check_structure(proto: Any, meta: ModelMetadata, report: VerificationReport) -> None:
    onnx = _onnx()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        report.failures.append(f"ONNX checker: {str(exc).splitlines()[0]}")
    graph_inputs = {i.name: i for i in proto.graph.input}
    graph_outputs = {o.name: o for o in proto.graph.output}
    expected_in = [meta.input.name, *(s.input for s in meta.states)]
    expected_out = [*(o.name for o in meta.outputs), *(s.output for s in meta.states)]
    if sorted(graph_inputs) != sorted(expected_in):
        report.failures.append(f"graph inputs {sorted(graph_inputs)} != declared {expected_in}")
    if sorted(graph_outputs) != sorted(expected_out):
        report.failures.append(f"graph outputs {sorted(graph_outputs)} != declared {expected_out}")
    for name, info in [*graph_inputs.items(), *graph_outputs.items()]:
        dims = _dims(info)
        if not dims or not isinstance(dims[0], str) or not dims[0]:
            report.failures.append(f"{name}: batch axis is not dynamic (dims {dims})")
    # the server sizes and checks tensors by the declared shapes and dtypes; verification
    # makes its data input by the input's kind, so running the graph would not notice
    for name, (shape, dtype) in meta.graph_tensors().items():
        info = graph_inputs.get(name) or graph_outputs.get(name)
        if info is None:
            continue
        dims = _dims(info)
        if len(dims) != len(shape) or any(isinstance(want, int) and got != want
                                          for got, want in zip(dims, shape, strict=False)):
            report.failures.append(f"{name}: graph shape {dims} is not the declared "
                                   f"{list(shape)}")
        elem = info.type.tensor_type.elem_type
        got = onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "undefined"
        if got != dtype:
            report.failures.append(f"{name}: graph dtype {got} is not the declared {dtype}")
    for name in (meta.input.name, *(o.name for o in meta.outputs)):
        info = graph_inputs.get(name) or graph_outputs.get(name)
        if info is not None:
            dims = _dims(info)
            if len(dims) < 2 or not isinstance(dims[1], str):
                report.failures.append(f"{name}: time axis is not dynamic (dims {dims})")

    ops = Counter(n.op_type for n in proto.graph.node)
    report.ops = dict(sorted(ops.items()))
    wanted = RECURRENT_OP.get(meta.arch)
    if wanted is None:
        report.failures.append(f"unknown arch {meta.arch!r}")
    elif ops.get(wanted, 0) != meta.num_layers:
        report.failures.append(
            f"expected {meta.num_layers} native {wanted} node(s), found {ops.get(wanted, 0)}"
        )
    for op in FORBIDDEN_OPS:
        if ops.get(op):
            report.failures.append(f"graph contains {op} (an unrolled or looped recurrence)")
    for node in proto.graph.node:
        if node.op_type == "GRU":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("linear_before_reset") != 1:
                report.failures.append(
                    f"GRU node {node.name!r} has linear_before_reset="
                    f"{attrs.get('linear_before_reset', 0)}; PyTorch's GRU needs 1"
                )
        if node.op_type in ("LSTM", "GRU"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            direction = attrs.get("direction", b"forward")
            if direction not in (b"forward", "forward"):
                report.failures.append(f"{node.op_type} node {node.name!r} runs {direction!r}")


class _Runner:
    """Runs the ONNX model on named numpy arrays; states in metadata order."""

    def __init__(self, path: Path, meta: ModelMetadata) -> None:
        ort = _ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.meta = meta
        self.out_names = [o.name for o in meta.outputs] + [s.output for s in meta.states]

    def __call__(self, x: np.ndarray, states: list[np.ndarray]) -> tuple[np.ndarray,
                                                                         list[np.ndarray]]:
        feeds = {self.meta.input.name: x}
        feeds.update({s.input: v for s, v in zip(self.meta.states, states, strict=True)})
        res = self.sess.run(self.out_names, feeds)
        return res[0], res[len(self.meta.outputs):]


def _steps_per_frame(meta: ModelMetadata) -> int:
    """Input steps per output step: the hop for PCM16 models, else 1."""
    return int(meta.input.hop_samples or 1) if meta.input.kind == "pcm16" else 1


def _random_input(meta: ModelMetadata, rng: np.random.Generator, b: int, t: int,
                  scale: float = 1.0) -> np.ndarray:
    """A batch of ``t`` output steps of input (``t`` hops of samples for PCM16);
    features are standard normal times ``scale``."""
    if meta.input.kind == "pcm16":
        n = t * _steps_per_frame(meta)
        level = rng.uniform(50, 20000, size=(b, 1))
        return np.clip(rng.standard_normal((b, n)) * level, -32768, 32767).astype(np.int16)
    if meta.input.kind == "utf8_bytes":
        return rng.integers(0, 256, size=(b, t), dtype=np.uint8)
    if meta.input.kind == "features":
        feat = [d for d in meta.input.shape[2:] if isinstance(d, int)]
        return (rng.standard_normal((b, t, *feat)) * scale).astype(np.float32)
    raise ModelMetadataError(f"verification does not yet generate {meta.input.kind!r} input")


def _random_states(meta: ModelMetadata, rng: np.random.Generator, b: int) -> list[np.ndarray]:
    return [rng.uniform(-0.9, 0.9, size=(b, *s.row_shape())).astype(s.dtype)
            for s in meta.states]


def fp16_bound(reference: np.ndarray, scale: float = 1.0) -> float:
    """The largest difference an fp16 model may have against ``reference``, one tensor
    (each tensor has its own bound: module docstring); ``scale``: the input's (feature
    inputs against torch)."""
    return FP16_RTOL * max(1.0, scale / FP16_PLAIN_SCALE) * max(
        1.0, float(np.abs(reference.astype(np.float64)).max(initial=0.0)))


FP16_BOUND_TEXT = (f"{FP16_RTOL:g} x max(1, largest |reference|) for each output and "
                   f"state, against torch also x max(1, feature scale / "
                   f"{FP16_PLAIN_SCALE:g})")


def _bound(report: VerificationReport, reference: np.ndarray) -> float:
    """The largest difference allowed against ``reference`` (one tensor)."""
    if report.precision == "fp16":
        return fp16_bound(reference)
    return report.tolerance if report.tolerance is not None else TOLERANCE


def _compare(report: VerificationReport, label: str, b: int, t: int, names: list[str],
             got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Each tensor against its reference within its own bound (a failure names the
    tensor); the largest difference over them."""
    largest = 0.0
    for name, g, w in zip(names, got, want, strict=True):
        d = max_abs_diff(g, w)
        allowed = _bound(report, w)
        if not d <= allowed:
            report.failures.append(f"{label} at batch {b}, time {t}: largest difference "
                                   f"{d:.3e} > {allowed:.1e} ({name})")
        largest = max(largest, d)
    return largest


def _keep_torch_figures(prior: dict[str, Any], report: VerificationReport) -> None:
    """Parity is not rerun (no torch model): keep the torch figures ``prior`` (the last
    record) holds, with the run they come from, rather than erase what the export
    measured. A chain of such runs keeps pointing at the run that compared."""
    source = prior.get("torch_figures_from")
    if not isinstance(source, dict):
        parity = prior.get("torch_parity")
        if not (isinstance(parity, str) and parity.startswith("run")):
            report.torch_parity = "skipped: no checkpoint given"
            return
        source = {"verified_at": prior.get("verified_at"), "torch_parity": parity,
                  "passed": prior.get("passed")}
    for key, attr in zip(TORCH_FIGURES, ("max_abs_diff_vs_torch", "torch_vs_float64",
                                         "onnx_vs_float64"), strict=True):
        value = prior.get(key)
        setattr(report, attr, float(value) if isinstance(value, int | float) else None)
    report.torch_figures_from = source
    report.torch_parity = (f"skipped: no checkpoint given; the torch figures are kept from "
                           f"the verification at {source.get('verified_at')} (the export's, "
                           "unless a verify compared with torch since)")


def _fp32_graph_text(report: VerificationReport) -> str:
    """What an fp16 model's record says of its fp32 graph, for the log."""
    g = report.fp32_graph
    if g is None:
        return "no record of its fp32 graph's verification (exported before rnnserve ran one)"
    return (f"its fp32 graph {'passed' if g.get('passed') else 'FAILED'} at export within "
            f"{g.get('tolerance')}")


def _cut_points(rng: np.random.Generator, t: int) -> list[int]:
    """Random chunk boundaries; always includes a chunk of length 1 when t > 2."""
    k = int(rng.integers(2, min(t, 9) + 1))
    cuts = sorted(set(rng.choice(np.arange(1, t), size=k - 1, replace=False).tolist()))
    if t > 2 and 1 not in np.diff([0, *cuts, t]):
        cuts = sorted(set(cuts) | {cuts[0] - 1 if cuts[0] > 1 else 1})
    return [0, *cuts, t]


def verification_cases(rng: np.random.Generator, n: int, avoid_time: int) -> list[tuple[int, int]]:
    """(batch, time) pairs: always batch 16 and 1, lengths other than the traced one. The
    first has many rows, so that even one case compares a row alone with its batch."""
    cases = [(MAX_BATCH, 37), (1, 101), (13, 101)]
    while len(cases) < n:
        b = int(rng.integers(1, MAX_BATCH + 1))
        t = int(rng.integers(2, 121))
        if t != avoid_time:
            cases.append((b, t))
    return cases[:n]


@contextlib.contextmanager
def modes_kept(module: Any) -> Iterator[None]:
    """Afterwards every submodule of ``module`` (a torch module, or None) has its own
    train/eval mode back, whatever ran meanwhile: verification runs it in eval mode,
    and the caller may go on training it."""
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def verify_file(
    path: str | Path,
    *,
    model: Any = None,
    checkpoint: str | Path | None = None,
    tolerance: float | None = None,
    seed: int = 0,
    n_cases: int = 8,
    write: bool = True,
    log: Callable[[str], None] = print,
) -> VerificationReport:
    """Verify ``path``; compare with torch when ``model`` or ``checkpoint`` is given
    (``model`` keeps the train/eval modes it had). ``tolerance``: the largest absolute
    difference of an fp32 model (default ``TOLERANCE``); an fp16 model has its own
    bound and refuses one, rather than record a tolerance nothing applied.

    With ``write`` the report replaces ``rnnserve.verification`` in the file
    (atomically). A failed check is recorded in the report, not raised: call
    ``raise_if_failed()``.
    """
    with modes_kept(model):
        return _verify_file(path, model, checkpoint, tolerance, seed, n_cases, write, log)


def _verify_file(path: str | Path, model: Any, checkpoint: str | Path | None,
                 tolerance: float | None, seed: int, n_cases: int, write: bool,
                 log: Callable[[str], None]) -> VerificationReport:
    onnx = _onnx()
    started = time.perf_counter()
    path = Path(path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = ModelMetadata.from_props(props, source=str(path))
    precision = str(meta.export.get("precision", "fp32"))
    prior = meta.verification  # what the last verification recorded
    fp32_graph = prior.get("fp32_graph") if isinstance(prior.get("fp32_graph"), dict) else None
    if precision == "fp16" and tolerance is not None:
        at = f" within {fp32_graph['tolerance']:g}" if fp32_graph and isinstance(
            fp32_graph.get("tolerance"), float) else ""
        raise VerificationError(
            f"{path}: a tolerance (--tolerance) does not apply to an fp16 model: each output "
            f"and state is bounded by {FP16_BOUND_TEXT} (the export verified its fp32 "
            f"graph{at} before converting it)")
    if precision != "fp16" and tolerance is None:
        tolerance = TOLERANCE
    report = VerificationReport(path=str(path), tolerance=tolerance, precision=precision,
                                fp32_graph=fp32_graph)  # cannot be rerun: kept as recorded
    check_structure(proto, meta, report)
    log(f"verify {path}: ops {report.ops}")
    if model is None and checkpoint is not None:
        model = _load_torch_model(checkpoint)
        _check_reference(model, meta, f"the checkpoint {str(checkpoint)!r}")
    elif model is not None:
        _check_reference(model, meta, "the torch model")
    if model is None:
        _keep_torch_figures(prior, report)
    else:
        report.torch_parity = "run"
        cmp = _TorchComparison(model)

    runner = _Runner(path, meta)
    rng = np.random.default_rng(seed)
    hop = _steps_per_frame(meta)
    traced = int(meta.export.get("traced_time", 8))
    for i, (b, t) in enumerate(verification_cases(rng, n_cases, traced)):
        scale = FEATURE_SCALES[i % len(FEATURE_SCALES)] if meta.input.kind == "features" \
            else 1.0
        x = _random_input(meta, rng, b, t, scale)
        s0 = _random_states(meta, rng, b)
        try:
            y_whole, s_whole = runner(x, s0)
        except Exception as exc:  # onnxruntime refuses the shapes: the contract is broken
            msg = " ".join(str(exc).split())[:300]
            report.failures.append(f"onnxruntime failed at batch {b}, time {t}: {msg}")
            continue
        if y_whole.shape[:2] != (b, t):
            report.failures.append(f"output shape {y_whole.shape} at batch {b}, time {t}")
            continue
        # streaming: chunks with the state carried
        cuts = _cut_points(rng, t)
        states, ys = s0, []
        for a, z in zip(cuts[:-1], cuts[1:], strict=True):
            y, states = runner(x[:, a * hop:z * hop], states)
            ys.append(y)
        whole = [y_whole, *s_whole]
        d_chunk = _compare(report, "chunked vs whole", b, t, runner.out_names,
                           [np.concatenate(ys, axis=1), *states], whole)
        report.max_abs_diff_chunked_vs_whole = max(report.max_abs_diff_chunked_vs_whole, d_chunk)
        # batching: one row alone equals that row in the batch
        row = int(rng.integers(0, b))
        y_row, s_row = runner(x[row:row + 1], [s[row:row + 1] for s in s0])
        d_batch = _compare(report, "batched vs single", b, t, runner.out_names,
                           [y_row, *s_row], [w[row:row + 1] for w in whole])
        report.max_abs_diff_batched_vs_single = max(report.max_abs_diff_batched_vs_single,
                                                    d_batch)
        line = (f"  case {i + 1}/{n_cases}: batch {b:2d}, time {t:3d}, {len(cuts) - 1} chunks"
                + (f", features x{scale:g}" if meta.input.kind == "features" else "")
                + f": chunked {d_chunk:.1e}, row {row} alone {d_batch:.1e}")
        if model is not None:
            try:
                d_torch = cmp.add(x, s0, [y_whole, *s_whole], scale)
                line += f", vs torch {d_torch:.1e}"
            except Exception as exc:  # the torch model refuses this input
                msg = " ".join(str(exc).split())[:300]
                report.failures.append(f"torch model failed at batch {b}, time {t}: "
                                       f"{type(exc).__name__}: {msg}")
                line += ", torch failed"
        report.cases.append((b, t, len(cuts) - 1))
        if meta.input.kind == "features" and scale not in report.input_scales:
            report.input_scales.append(scale)
        log(line)

    if model is not None:
        cmp.finish(report, TOLERANCE if report.tolerance is None else report.tolerance)
    if meta.input.kind == "pcm16":
        _check_frontend(proto, meta, runner, model, report, log)
    report.seconds = time.perf_counter() - started
    if model is None:
        kept = report.torch_figures_from
        torch_part = "torch parity skipped (no checkpoint given" + (
            f"; vs torch {report.max_abs_diff_vs_torch:.2e} kept from the verification at "
            f"{kept.get('verified_at')})" if kept is not None and isinstance(
                report.max_abs_diff_vs_torch, float) else ")")
    elif report.torch_vs_float64 is None or report.onnx_vs_float64 is None:
        torch_part = f"vs torch {report.max_abs_diff_vs_torch:.2e} ({report.torch_parity})"
    else:
        torch_part = (f"vs torch {report.max_abs_diff_vs_torch:.2e} (float32 rounding: torch "
                      f"{report.torch_vs_float64:.1e}, onnx {report.onnx_vs_float64:.1e} "
                      "from float64)")
    log(f"verify {'PASSED' if report.passed else 'FAILED'} in {report.seconds:.1f}s: "
        f"largest differences: chunked vs whole {report.max_abs_diff_chunked_vs_whole:.2e}, "
        f"batched vs single {report.max_abs_diff_batched_vs_single:.2e}, {torch_part} "
        + (f"(fp16: each within {FP16_BOUND_TEXT}; {_fp32_graph_text(report)})"
           if report.precision == "fp16" else f"(tolerance {report.tolerance:.0e})"))
    for failure in report.failures:
        log(f"  FAILED: {failure}")
    if write:
        try:
            _write_report(proto, meta, report, path)
            report.written = True
        except OSError as exc:  # a read-only repository: the result stands
            log(f"warning: the report was not written into {path}: {exc.strerror or exc} "
                "(the file is as it was; --no-write does not try)")
    return report


FRONTEND_TOLERANCE = 1e-3  # log-mel (natural log) of float32 DFTs vs float64


def probe_signal(sample_rate: int, hop: int, seconds: float = 1.5) -> np.ndarray:
    """Deterministic int16 test audio: gliding harmonics, noise, a pause, a click."""
    rng = np.random.default_rng(7)
    n = int(seconds * sample_rate) // hop * hop
    t = np.arange(n) / sample_rate
    f0 = 120 + 80 * t / seconds
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(7 * t))
    x = 0.25 * voiced + 0.003 * rng.standard_normal(n)
    x[n // 2: n // 2 + 30 * hop] = 0.0  # digital silence: features at the log floor
    x[n // 4] = 0.9
    return np.clip(np.round(x * 32768), -32768, 32767).astype(np.int16)


def _check_frontend(proto: Any, meta: ModelMetadata, runner: _Runner, model: Any,
                    report: VerificationReport, log: Callable[[str], None]) -> None:
    """The graph's front end against ``rnnserve.audio.log_mel`` (float64, numpy FFT)."""
    from rnnserve.audio import FrontEnd, log_mel

    onnx = _onnx()
    fe = FrontEnd(**meta.export.get("frontend", {}))
    x = probe_signal(fe.sample_rate, fe.hop_samples)
    reference = log_mel(x, fe)
    logs = [n.output[0] for n in proto.graph.node if n.op_type == "Log"]
    if len(logs) != 1:
        report.failures.append(f"expected one Log node (the log-mel front end), found {len(logs)}")
        return
    state_in = meta.states[0].input
    inferred = onnx.shape_inference.infer_shapes(proto)
    extracted = onnx.utils.Extractor(inferred).extract_model([meta.input.name, state_in], logs)
    ort = _ort()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(extracted.SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    feats = sess.run(None, {meta.input.name: x[None],
                            state_in: np.zeros((1, fe.overlap), dtype=np.float32)})[0][0]
    report.frontend_vs_offline = max_abs_diff(feats, reference)
    line = f"  front end vs offline log-mel (float64): {report.frontend_vs_offline:.1e}"
    if not report.frontend_vs_offline <= FRONTEND_TOLERANCE:
        report.failures.append(f"front end vs offline log-mel: largest difference "
                               f"{report.frontend_vs_offline:.3e} > {FRONTEND_TOLERANCE:.0e}")
    if model is not None:
        import copy

        import torch

        m64 = copy.deepcopy(model).double().eval()
        states = [np.zeros((1, *s.row_shape()), dtype=s.dtype) for s in meta.states]
        got, _ = runner(x[None], states)
        with torch.no_grad():
            logits, _ = m64.rnn(m64.normalize(torch.from_numpy(reference)[None]))
            want = torch.softmax(logits, dim=-1).numpy()
        report.posteriors_vs_offline = max_abs_diff(got, want)
        line += (f"; posteriors from PCM vs torch on offline features "
                 f"{report.posteriors_vs_offline:.1e}")
        allowed = FRONTEND_TOLERANCE if report.precision != "fp16" else _bound(report, want)
        if not report.posteriors_vs_offline <= allowed:
            report.failures.append(
                f"posteriors from PCM vs torch on offline features: largest difference "
                f"{report.posteriors_vs_offline:.3e} > {allowed:.0e}")
    log(line)


def _write_report(proto: Any, meta: ModelMetadata, report: VerificationReport,
                  path: Path) -> None:
    from dataclasses import replace

    from rnnserve.export.onnx_export import set_metadata, write_model_atomically

    set_metadata(proto, replace(meta, verification=report.to_metadata()))
    write_model_atomically(proto, path)


def _check_reference(model: Any, meta: ModelMetadata, what: str) -> None:
    """Refuse a torch reference of another architecture or size than the model, with
    what differs, before any comparison runs."""
    from torch import nn

    layers = [m for m in model.modules() if isinstance(m, nn.LSTM | nn.GRU)]
    if len(layers) != 1:
        return  # export_module refuses such modules; nothing to compare it by
    rnn = layers[0]
    theirs: dict[str, Any] = {"arch": type(rnn).__name__.lower(), "layers": rnn.num_layers,
                              "hidden size": rnn.hidden_size}
    ours: dict[str, Any] = {"arch": meta.arch, "layers": meta.num_layers,
                            "hidden size": meta.hidden_size}
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "input_kind") and hasattr(cfg, "output_size"):
        # a checkpoint's model (rnnserve train): its input and output sizes, too
        ours["input"] = meta.input.kind
        theirs["input"] = "pcm16" if type(model).__name__ == "SpeechModel" else \
            {"bytes": "utf8_bytes"}.get(cfg.input_kind, cfg.input_kind)
        if meta.input.kind == "features" and len(meta.input.shape) > 2:
            ours["input size"] = meta.input.shape[2]
            theirs["input size"] = cfg.input_size
        ours["outputs"] = meta.outputs[0].shape[-1]
        theirs["outputs"] = cfg.output_size
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if differ:
        def show(d: dict[str, Any]) -> str:
            return ", ".join(f"{k} {d.get(k)}" for k in differ)

        raise VerificationError(
            f"{what} does not match the model {meta.name!r}: the model has {show(ours)}, "
            f"the {'checkpoint' if 'checkpoint' in what else 'module'} {show(theirs)}")


def _load_torch_model(checkpoint: str | Path) -> Any:
    from rnnserve.errors import require_train_extra

    require_train_extra("comparing with torch")
    from rnnserve.export.onnx_export import model_for_checkpoint
    from rnnserve.training.checkpoint import load_checkpoint

    return model_for_checkpoint(load_checkpoint(checkpoint))


class _TorchComparison:
    """ONNX outputs against torch float32, and both against torch float64 (when the
    model runs in float64: one that casts its input, e.g. with ``x.float()``, does
    not, and is compared in float32 alone)."""

    def __init__(self, model: Any) -> None:
        import copy

        self.model = model.eval()
        self.model64: Any = copy.deepcopy(model).double().eval()
        self.no_float64 = ""  # why the float64 reference does not run
        self.max_abs = self.t32 = self.o64 = 0.0
        self.worst = 0.0  # fp16: the largest difference over its allowed bound

    def _drop_float64(self, exc: Exception) -> None:
        self.model64 = None
        self.no_float64 = (f"{type(exc).__name__}: "
                           f"{' '.join(str(exc).split())[:200]}")

    def add(self, x: np.ndarray, s0: list[np.ndarray], onnx_out: list[np.ndarray],
            scale: float = 1.0) -> float:
        import torch

        with torch.no_grad():
            y, s = self.model(torch.from_numpy(x), tuple(torch.from_numpy(v).float()
                                                         for v in s0))
        refs64: tuple[Any, ...] | None = None
        if self.model64 is not None:
            x64 = torch.from_numpy(x) if x.dtype.kind in "iu" else torch.from_numpy(x).double()
            try:
                with torch.no_grad():
                    y64, s64 = self.model64(x64, tuple(torch.from_numpy(v).double()
                                                       for v in s0))
                refs64 = (y64, *s64)
            except Exception as exc:  # runs in float32 (above), not in float64
                self._drop_float64(exc)
        case_max = 0.0
        for k, (got, r32) in enumerate(zip(onnx_out, (y, *s), strict=True)):
            d = max_abs_diff(got, r32.numpy())
            case_max = max(case_max, d)
            self.worst = max(self.worst, d / fp16_bound(r32.numpy(), scale=scale))
            if refs64 is not None:
                r64 = refs64[k].numpy()
                self.t32 = max(self.t32, max_abs_diff(r32.numpy(), r64))
                self.o64 = max(self.o64, max_abs_diff(got, r64))
        self.max_abs = max(self.max_abs, case_max)
        return case_max

    def finish(self, report: VerificationReport, tolerance: float) -> None:
        report.max_abs_diff_vs_torch = self.max_abs
        if self.model64 is None:
            report.torch_parity = ("run in float32 only: the model does not run in float64 "
                                   f"({self.no_float64})")
        else:
            report.torch_vs_float64 = self.t32
            report.onnx_vs_float64 = self.o64
        if report.precision == "fp16":
            if not self.worst <= 1.0:
                report.failures.append(
                    f"onnx (fp16) vs torch (fp32): largest difference {self.max_abs:.3e}, "
                    f"{self.worst:.2f} times the fp16 bound ({FP16_BOUND_TEXT})")
            return
        if self.max_abs <= tolerance:
            return
        if self.model64 is None:
            report.failures.append(
                f"onnx vs torch: largest difference {self.max_abs:.3e} > {tolerance:.0e} "
                "(no float64 reference to tell float32 rounding: the model does not run "
                "in float64)")
        elif not self.o64 <= 2 * self.t32 + tolerance:
            report.failures.append(
                f"onnx vs torch: largest difference {self.max_abs:.3e} > {tolerance:.0e}, and "
                f"onnx is {self.o64:.2e} from float64 where torch float32 is {self.t32:.2e}"
            )


__all__ = ["VerificationReport", "verify_file", "max_abs_diff"]
