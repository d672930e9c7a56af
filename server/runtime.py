"""Models loaded into onnxruntime, described by their exported metadata alone.

``ModelRuntime`` is one model version: an onnxruntime session on an explicitly
chosen device, its metadata, and the three operations the server needs — a zero
state for a new session, validation of one session's chunk, and one batched run
(states gathered into a batch, outputs and new states returned per batch row).
``ModelRegistry`` loads every version of every model in a repository.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from rnnserve.errors import ModelRepositoryError
from rnnserve.export import repository
from rnnserve.export.metadata import ModelMetadata
from rnnserve.server.errors import DeviceUnavailable, InvalidChunk, ModelNotFound

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


# Set when device "auto" asked onnxruntime for CUDA and got the CPU: later models go
# straight to the CPU instead of repeating onnxruntime's error for each of them.
_cuda_fell_back = False


def providers_for(options: RuntimeOptions) -> list[Any]:
    if options.device not in DEVICES:
        raise DeviceUnavailable(f"unknown device {options.device!r}; choose from {DEVICES}")
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
    cuda_options = {"device_id": options.device_id, "cudnn_conv_algo_search": "HEURISTIC",
                    "use_tf32": 0}
    return [(CUDA, cuda_options), CPU]


class ModelRuntime:
    """One model version in onnxruntime."""

    def __init__(self, path: str | Path, name: str, version: int,
                 options: RuntimeOptions = RuntimeOptions()) -> None:
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
        if quiet:  # a failed CUDA attempt is expected on CPU machines: say it once, below
            ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
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
        self.meta = ModelMetadata.from_props(self.session.get_modelmeta().custom_metadata_map,
                                             source=str(path))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        declared = {self.meta.input.name, *(s.input for s in self.meta.states)}
        if graph_inputs != declared:
            raise ModelRepositoryError(f"{path}: graph inputs {sorted(graph_inputs)} do not "
                                       f"match the metadata {sorted(declared)}")
        self._np_dtype = np.dtype(self.meta.input.dtype)
        self._frame_shape = tuple(int(d) for d in self.meta.input.shape[2:])
        self._state_dtypes = [np.dtype(s.dtype) for s in self.meta.states]
        self.data_output_names = [o.name for o in self.meta.outputs]
        self._output_names = self.data_output_names + [s.output for s in self.meta.states]
        self.load_seconds = time.perf_counter() - started
        log.info("loaded model %s version %d from %s on %s in %.2fs", name, version, path,
                 self.provider, self.load_seconds)

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)

    def zero_state(self) -> list[np.ndarray]:
        """A new session's state: one array per state pair, without the batch axis."""
        return [np.zeros(s.row_shape(), dtype=dt)
                for s, dt in zip(self.meta.states, self._state_dtypes, strict=True)]

    def check_chunk(self, x: np.ndarray) -> np.ndarray:
        """Validate one session's chunk, shaped (time, *frame); return it C-contiguous."""
        inp = self.meta.input
        if x.dtype != self._np_dtype:
            raise InvalidChunk(f"model {self.name!r} takes {inp.dtype} input ({inp.kind}), "
                               f"got {x.dtype}")
        want = ("time", *self._frame_shape)
        if x.ndim != len(want) or tuple(x.shape[1:]) != self._frame_shape:
            raise InvalidChunk(f"model {self.name!r} takes chunks shaped {list(want)}, "
                               f"got {list(x.shape)}")
        if x.shape[0] < 1:
            raise InvalidChunk("empty chunk: send at least one time step")
        if inp.kind == "pcm16" and inp.hop_samples and x.shape[0] % inp.hop_samples:
            raise InvalidChunk(f"PCM16 chunks must be a multiple of {inp.hop_samples} samples, "
                               f"got {x.shape[0]}")
        if x.dtype.kind == "f" and not self.options.allow_nonfinite and \
                not np.isfinite(x).all():
            raise InvalidChunk("chunk contains NaN or Inf (the server rejects them: "
                               "--nonfinite reject)")
        return np.ascontiguousarray(x)

    def warm_up(self, max_batch: int) -> float:
        """Run every batch size up to ``max_batch`` once, at one and four time steps
        (hops for audio), so that the first real batch of each size does not pay for
        the device's per-shape set-up (memory arena growth, kernel selection) while
        clients wait. Returns the seconds it took; no session is touched."""
        started = time.perf_counter()
        hop = self.meta.input.hop_samples or 1
        zero = self.zero_state()
        for steps in (1, 4):
            x = np.zeros((steps * hop, *self._frame_shape), dtype=self._np_dtype)
            for b in range(1, max_batch + 1):
                self.run([x] * b, [zero] * b)
        return time.perf_counter() - started

    def run(self, xs: Sequence[np.ndarray], states: Sequence[Sequence[np.ndarray]]
            ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
        """One onnxruntime call for ``len(xs)`` sessions whose chunks share one length.

        ``xs[i]`` is session i's chunk (time, *frame); ``states[i]`` its state rows.
        Returns per session: its outputs (time, ...) and its new state rows.
        """
        x = np.stack(xs)  # (B, T, *frame): gather
        feeds = {self.meta.input.name: x}
        for j, pair in enumerate(self.meta.states):
            feeds[pair.input] = np.stack([s[j] for s in states])  # (B, *row)
        res = self.session.run(self._output_names, feeds)
        n_out = len(self.meta.outputs)
        outputs = [[r[i] for r in res[:n_out]] for i in range(len(xs))]  # scatter
        new_states = [[r[i].copy() for r in res[n_out:]] for i in range(len(xs))]
        return outputs, new_states


class ModelRegistry:
    """Every version of every model in a repository, loaded at start."""

    def __init__(self, repo: str | Path, options: RuntimeOptions = RuntimeOptions()) -> None:
        self.repo = Path(repo)
        self._models: dict[tuple[str, int], ModelRuntime] = {}
        for mv in repository.list_models(self.repo):
            self._models[(mv.name, mv.version)] = ModelRuntime(mv.path, mv.name, mv.version,
                                                               options)

    def __iter__(self) -> Any:
        return iter(sorted(self._models.values(), key=lambda m: m.key))

    def __len__(self) -> int:
        return len(self._models)

    def get(self, name: str, version: int | None = None) -> ModelRuntime:
        """The named version, or the highest when ``version`` is None or 0."""
        if version:
            found = self._models.get((name, version))
            if found is not None:  # the per-chunk path: one dict lookup
                return found
        versions = sorted(v for n, v in self._models if n == name)
        if not versions:
            names = sorted({n for n, _ in self._models})
            raise ModelNotFound(f"model {name!r} not found; available: {names}")
        if not version:
            return self._models[(name, versions[-1])]
        if version not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version}; "
                                f"available: {versions}")
        return self._models[(name, version)]
