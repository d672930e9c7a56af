"""The contract between an exported model and the server, stored in ONNX ``metadata_props``.

Torch-free: the server reads it through onnxruntime's ``custom_metadata_map``.
Every value is a string; structured ones are strict JSON (a NaN or infinite number is
written as null). Keys:

=========================  ================================================================
``rnnserve.format``        format version of this metadata (``FORMAT_VERSION``)
``rnnserve.model``         JSON: name, arch, task, layers, hidden size, rnnserve version
``rnnserve.input``         JSON: the data input: name, kind, dtype, shape, and rules
                           (``utf8_bytes``: vocabulary of 256 byte values; ``features``:
                           feature size; ``pcm16``: sample rate, hop and chunk multiple)
``rnnserve.outputs``       JSON list: name, dtype, shape, meaning, labels where classes
``rnnserve.states``        JSON list of pairs: input name -> output name, shape with the
                           symbolic ``batch`` first, dtype, initial value (``zeros``)
``rnnserve.training``      JSON: metrics of the checkpoint (e.g. validation bits per byte)
``rnnserve.export``        JSON: exporter, opset, torch/onnx versions, checkpoint sha256
``rnnserve.verification``  JSON: largest differences found by verification, and what ran
``rnnserve.decoding``      JSON, optional: how to turn outputs into decisions (speech
                           models: the streaming keyword rule of ``rnnserve.kws``)
=========================  ================================================================

Shapes use the strings ``"batch"``, ``"time"`` (input steps: bytes, feature frames or
samples) and ``"frames"`` (output frames of a PCM16 model: samples / hop) for the
dynamic axes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from rnnserve.errors import ModelMetadataError

FORMAT_VERSION = 1
PREFIX = "rnnserve."
INPUT_KINDS = ("utf8_bytes", "features", "pcm16")
DTYPES = ("float32", "float16", "uint8", "int16", "int32", "int64")
BATCH = "batch"
TIME = "time"
FRAMES = "frames"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class InputSpec(TensorSpec):
    kind: str = "features"  # one of INPUT_KINDS
    sample_rate: int | None = None  # pcm16 only
    hop_samples: int | None = None  # pcm16 only: chunk lengths are multiples of this


@dataclass(frozen=True)
class OutputSpec(TensorSpec):
    meaning: str = "logits"  # what the values are, e.g. "logits" over the next byte
    labels: tuple[str, ...] | None = None  # class names, where the output is classes


@dataclass(frozen=True)
class StatePair:
    input: str
    output: str
    shape: tuple[int | str, ...]  # ("batch", layers, hidden)
    dtype: str = "float32"
    init: str = "zeros"

    def row_shape(self) -> tuple[int, ...]:
        """Shape of one session's state: the shape without the batch axis."""
        return tuple(int(d) for d in self.shape[1:])


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    arch: str
    task: str
    input: InputSpec
    outputs: tuple[OutputSpec, ...]
    states: tuple[StatePair, ...]
    num_layers: int
    hidden_size: int
    training: dict[str, Any] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    verification: dict[str, Any] = field(default_factory=dict)
    decoding: dict[str, Any] = field(default_factory=dict)
    rnnserve_version: str = ""

    def state_bytes_per_session(self) -> int:
        size = {"float32": 4, "float16": 2}
        total = 0
        for s in self.states:
            n = 1
            for d in s.row_shape():
                n *= d
            total += n * size.get(s.dtype, 4)
        return total

    def graph_tensors(self) -> dict[str, tuple[tuple[int | str, ...], str]]:
        """Every graph input's and output's (shape, dtype) as declared here, by name."""
        declared = {self.input.name: (self.input.shape, self.input.dtype),
                    **{o.name: (o.shape, o.dtype) for o in self.outputs}}
        for s in self.states:
            declared[s.input] = declared[s.output] = (s.shape, s.dtype)
        return declared

    def to_props(self) -> dict[str, str]:
        model = {
            "name": self.name,
            "arch": self.arch,
            "task": self.task,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "rnnserve_version": self.rnnserve_version,
        }
        return {
            PREFIX + "format": str(FORMAT_VERSION),
            PREFIX + "model": _dumps(model),
            PREFIX + "input": _dumps(asdict(self.input)),
            PREFIX + "outputs": _dumps([asdict(o) for o in self.outputs]),
            PREFIX + "states": _dumps([asdict(s) for s in self.states]),
            PREFIX + "training": _dumps(self.training),
            PREFIX + "export": _dumps(self.export),
            PREFIX + "verification": _dumps(self.verification),
            **({PREFIX + "decoding": _dumps(self.decoding)} if self.decoding else {}),
        }

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelMetadata:
        """Parse and check; every problem is reported as ``ModelMetadataError``."""
        fmt = props.get(PREFIX + "format")
        if fmt is None:
            raise ModelMetadataError(
                f"{source} has no rnnserve metadata; export it with `rnnserve export`"
            )
        if fmt != str(FORMAT_VERSION):
            raise ModelMetadataError(
                f"{source} has rnnserve metadata format {fmt!r}; this rnnserve reads "
                f"{FORMAT_VERSION!r}"
            )
        try:
            model = _loads(props, "model")
            inp = _loads(props, "input")
            outs = _loads(props, "outputs")
            states = _loads(props, "states")
            meta = cls(
                name=str(model["name"]),
                arch=str(model["arch"]),
                task=str(model["task"]),
                num_layers=int(model["num_layers"]),
                hidden_size=int(model["hidden_size"]),
                rnnserve_version=str(model.get("rnnserve_version", "")),
                input=InputSpec(**{**inp, "shape": tuple(inp["shape"])}),
                outputs=tuple(
                    OutputSpec(**{**o, "shape": tuple(o["shape"]),
                                  "labels": tuple(o["labels"]) if o.get("labels") else None})
                    for o in outs
                ),
                states=tuple(StatePair(**{**s, "shape": tuple(s["shape"])}) for s in states),
                training=_loads(props, "training", {}),
                export=_loads(props, "export", {}),
                verification=_loads(props, "verification", {}),
                decoding=_loads(props, "decoding", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelMetadataError(f"{source} has malformed rnnserve metadata: {exc!r}") from exc
        meta.check(source)
        return meta

    def check(self, source: str = "model") -> None:
        problems: list[str] = []
        if self.input.kind not in INPUT_KINDS:
            problems.append(f"input kind {self.input.kind!r} not in {INPUT_KINDS}")
        for t in (self.input, *self.outputs):
            if t.dtype not in DTYPES:
                problems.append(f"{t.name}: dtype {t.dtype!r} not in {DTYPES}")
            if t.shape[:1] != (BATCH,):
                problems.append(f"{t.name}: shape {t.shape} must start with {BATCH!r}")
        if not self.outputs:
            problems.append("no outputs declared")
        if not self.states:
            problems.append("no state pairs declared")
        names = [self.input.name, *(o.name for o in self.outputs)]
        for s in self.states:
            names += [s.input, s.output]
            if s.shape[:1] != (BATCH,) or not all(isinstance(d, int) and d > 0
                                                  for d in s.shape[1:]):
                problems.append(f"state {s.input}: shape {s.shape} must be (batch, n, ...)")
            if s.dtype not in DTYPES:  # the server makes its state pools with np.dtype
                problems.append(f"state {s.input}: dtype {s.dtype!r} not in {DTYPES}")
            if s.init != "zeros":
                problems.append(f"state {s.input}: unknown init {s.init!r}")
        if len(set(names)) != len(names):
            problems.append(f"tensor names repeat: {names}")
        if self.input.kind == "pcm16" and not (self.input.sample_rate and self.input.hop_samples):
            problems.append("pcm16 input needs sample_rate and hop_samples")
        if problems:
            raise ModelMetadataError(f"{source}: invalid rnnserve metadata: {'; '.join(problems)}")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float as ``None``: JSON has no such numbers
    (a checkpoint saved before its first validation holds NaN metrics; a failed
    verification measures infinite differences)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _dumps(value: Any) -> str:
    """Strict JSON: non-finite numbers are written as null."""
    return json.dumps(_finite(value), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _loads(props: dict[str, str], key: str, default: Any = None) -> Any:
    raw = props.get(PREFIX + key)
    if raw is None:
        if default is not None:
            return default
        raise KeyError(PREFIX + key)
    return json.loads(raw)
