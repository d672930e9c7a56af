"""Export a PyTorch model of your own, not only those trained by ``rnnserve train``.

Any ``nn.Module`` whose recurrence is one ``nn.LSTM`` or ``nn.GRU`` (any number of
stacked layers, one direction) and whose ``forward`` takes (batch, time, ...) chunks
(a layer with ``batch_first=False`` is fine when ``forward`` transposes for it) and
takes and returns the state the way that layer does::

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(40, 128)
            self.rnn = nn.LSTM(128, 256, num_layers=2, batch_first=True)
            self.head = nn.Linear(256, 12)

        def forward(self, x, state):            # x: (batch, time, 40)
            y, state = self.rnn(torch.relu(self.inp(x)), state)
            return self.head(y), state          # (batch, time, 12), (h, c)

    export_module(Tagger(), "models", "tagger", feature_size=40)

``state`` is PyTorch's own layout: ``(h, c)`` for an LSTM, ``h`` for a GRU, each
(layers, batch, hidden). The export adapts it to rnnserve's batch-major state pairs
(``h_in -> h_out``, ``c_in -> c_out``, shape (batch, layers, hidden): one row per
session) with a transpose inside the graph, so the module itself needs no change.
Byte models (``input_kind="utf8_bytes"``) get (batch, time) byte values as int64, as
``nn.Embedding`` wants them.

Every session starts from a zero state. A ``forward`` whose state is optional is
also run without it, and a module that then starts from something else (a learned
``h0``) is refused: served, it would compute something other than ``module(x)``.

The result goes through the same verification as ``rnnserve export``: ONNX against
the module in torch, chunked streaming against whole sequences, each batch row
against the row alone, the op types; a module that is not causal in time (one that
looks at the whole chunk, e.g. normalises over the time axis) fails the chunked
comparison and is not published.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import platform
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

import onnx
import torch
from torch import nn

import rnnserve
from rnnserve.errors import ExportError
from rnnserve.export import repository
from rnnserve.export.metadata import (
    BATCH,
    TIME,
    InputSpec,
    ModelMetadata,
    OutputSpec,
    StatePair,
)
from rnnserve.export.onnx_export import (
    DATA_INPUT,
    DATA_OUTPUT,
    DUMMY_BATCH,
    DUMMY_TIME,
    OPSET,
    StreamingWrapper,
    publish,
    set_metadata,
    trace,
)
from rnnserve.export.verify import modes_kept

KINDS = ("features", "utf8_bytes")


def recurrent_layer(module: nn.Module) -> nn.LSTM | nn.GRU:
    """The module's one ``nn.LSTM``/``nn.GRU``, checked for what streaming needs.

    ``batch_first`` is not checked: a module may transpose for a seq-first layer, and
    one that does not fails its first forward (``export_module`` then names it)."""
    found = [m for m in module.modules() if isinstance(m, nn.LSTM | nn.GRU)]
    if not found:
        raise ExportError(f"{type(module).__name__} has no nn.LSTM or nn.GRU: rnnserve "
                          "serves recurrent models whose state is such a layer's")
    for rnn in found:  # first: no change to the module makes such a model stream
        if rnn.bidirectional:
            raise ExportError(f"the {type(rnn).__name__} is bidirectional: its backward "
                              "direction needs the whole sequence, which a stream does not "
                              "have, so rnnserve cannot serve it")
    if len(found) > 1:
        raise ExportError(f"{type(module).__name__} has {len(found)} recurrent layers; "
                          "rnnserve carries the state of one nn.LSTM or nn.GRU (stack "
                          "layers with its num_layers)")
    rnn = found[0]
    if isinstance(rnn, nn.LSTM) and rnn.proj_size:
        raise ExportError("an LSTM with proj_size is not supported (h and c would differ "
                          "in size)")
    return rnn


class ModuleAdapter(nn.Module):
    """A module's ``forward(x, state) -> (y, state)`` in PyTorch's state layout as
    rnnserve's ``forward(x, states) -> (y, new_states)`` with batch-major states."""

    def __init__(self, module: nn.Module, lstm: bool, byte_input: bool) -> None:
        super().__init__()
        self.module = module
        self.lstm = lstm
        self.byte_input = byte_input

    def forward(self, x: torch.Tensor, states: Sequence[torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if self.byte_input:
            x = x.long()
        native = tuple(s.transpose(0, 1).contiguous() for s in states)
        y, got = returned(self.module, self.module(x, native if self.lstm else native[0]),
                          self.lstm)
        return y, tuple(s.transpose(0, 1) for s in got)


def returned(module: nn.Module, out: object, lstm: bool
             ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(y, state)`` as ``module.forward`` returned it, the state as a tuple of tensors
    (``(h, c)`` or ``(h,)``). Anything else is refused with what came back and what was
    expected: unpacking it further would fail with an error that reads as if
    ``forward`` had failed."""
    if isinstance(out, tuple | list) and len(out) == 2:
        y, state = out
        if lstm and isinstance(state, tuple | list) and len(state) == 2 and all(
                isinstance(s, torch.Tensor) for s in state):
            return y, tuple(state)
        if not lstm and isinstance(state, torch.Tensor):
            return y, (state,)
    want = "(y, (h, c)) as the LSTM does" if lstm else "(y, h) as the GRU does"
    raise ExportError(f"{type(module).__name__}.forward returned {_shown(out)}; it must "
                      f"return {want}: y a (batch, time, outputs) tensor, "
                      f"{'h and c each' if lstm else 'h'} (layers, batch, hidden)")


def _shown(value: object, depth: int = 0) -> str:
    """A value's structure, tensors by their shapes: ``(Tensor[1, 8, 5], (Tensor[2, 1,
    16],))``."""
    if isinstance(value, torch.Tensor):
        return f"Tensor[{', '.join(map(str, value.shape))}]"
    if isinstance(value, tuple | list) and depth < 3:
        inner = [_shown(v, depth + 1) for v in value[:4]] + (["..."] if len(value) > 4 else [])
        if isinstance(value, list):
            return f"[{', '.join(inner)}]"
        return f"({', '.join(inner)}{',' if len(inner) == 1 else ''})"
    return type(value).__name__


P = ParamSpec("P")
R = TypeVar("R")


def _modes_kept(fn: Callable[Concatenate[nn.Module, P], R]
                ) -> Callable[Concatenate[nn.Module, P], R]:
    """The export runs the module in eval mode; the caller's module gets its own
    train/eval mode of every submodule back afterwards (it may go on training)."""
    @functools.wraps(fn)
    def kept(module: nn.Module, *args: P.args, **kwargs: P.kwargs) -> R:
        with modes_kept(module):
            return fn(module, *args, **kwargs)
    return kept


@_modes_kept
def export_module(
    module: nn.Module,
    repo: str | Path,
    name: str,
    version: int | None = None,
    *,
    input_kind: str = "features",
    feature_size: int | None = None,
    meaning: str = "",
    labels: Sequence[str] | None = None,
    overwrite: bool = False,
    tolerance: float = 1e-5,
    seed: int = 0,
    fp16: bool = False,
    provenance: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> repository.ModelVersion:
    """Export ``module`` (see the module docstring for what it must look like), verify
    it, and only then publish ``REPO/NAME/VERSION/model.onnx`` for ``rnnserve serve``.
    ``provenance`` (where the module and its weights came from) goes into the metadata's
    ``rnnserve.export``.

    ``input_kind``: ``features`` ((batch, time, ``feature_size``) float32; default size:
    the recurrent layer's input size) or ``utf8_bytes`` ((batch, time) byte values).
    ``meaning`` and ``labels`` describe the output (batch, time, outputs) to clients.
    """
    repository.check_name(name)
    rnn = recurrent_layer(module)
    if input_kind not in KINDS:
        raise ExportError(f"input_kind must be one of {KINDS}, got {input_kind!r} (PCM16 "
                          "speech models need rnnserve's front end: rnnserve train)")
    lstm = isinstance(rnn, nn.LSTM)
    byte_input = input_kind == "utf8_bytes"
    if byte_input:
        x = torch.randint(0, 256, (DUMMY_BATCH, DUMMY_TIME), dtype=torch.uint8)
        inp = InputSpec(name=DATA_INPUT, dtype="uint8", shape=(BATCH, TIME), kind=input_kind)
    else:
        size = feature_size or rnn.input_size
        x = torch.randn(DUMMY_BATCH, DUMMY_TIME, size)
        inp = InputSpec(name=DATA_INPUT, dtype="float32", shape=(BATCH, TIME, size),
                        kind=input_kind)
    adapter = ModuleAdapter(module, lstm, byte_input).eval()  # the module, too
    row = (rnn.num_layers, rnn.hidden_size)
    states = tuple(torch.zeros(DUMMY_BATCH, *row) for _ in range(2 if lstm else 1))
    native = tuple(s.transpose(0, 1).contiguous() for s in states)
    x_in = x.long() if byte_input else x  # as the adapter hands it over

    def forward(chunk: torch.Tensor) -> object:
        with torch.no_grad():
            return module(chunk, native if lstm else native[0])

    try:
        out = forward(x_in)
    except Exception as exc:
        shape = ", ".join(map(str, x.shape))
        hints = [*_input_size_hint(forward, x, rnn, feature_size, exc),
                 *_batch_first_hint(rnn)]
        raise ExportError(f"{type(module).__name__}.forward failed on a ({shape}) "
                          f"{x_in.dtype} chunk and its {'(h, c)' if lstm else 'h'} state: "
                          f"{exc}" + "".join(f"; {h}" for h in hints)) from exc
    y, new = returned(module, out, lstm)  # in the layer's layout: (layers, batch, hidden)
    if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape[:2]) != \
            (DUMMY_BATCH, DUMMY_TIME) or y.dtype != torch.float32:
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise ExportError(f"{type(module).__name__}.forward must return (y, state) with y a "
                          f"float32 (batch, time, outputs) tensor; y was {got}")
    if any(tuple(s.shape) != (rnn.num_layers, DUMMY_BATCH, rnn.hidden_size) for s in new):
        raise ExportError(f"{type(module).__name__}.forward must return the new state in the "
                          f"layer's layout, {'(h, c)' if lstm else 'h'} of (layers, batch, "
                          f"hidden); it returned {_shown(tuple(new))}")
    _refuse_other_initial_state(module, x_in, (y, *new), lstm, tolerance)
    outputs = int(y.shape[2])
    if labels is not None and len(labels) != outputs:
        raise ExportError(f"{len(labels)} labels for {outputs} outputs")
    pairs = [("h_in", "h_out"), *([("c_in", "c_out")] if lstm else [])]
    metadata = ModelMetadata(
        name=name, arch="lstm" if lstm else "gru",
        task="text" if byte_input else "features", input=inp,
        outputs=(OutputSpec(name=DATA_OUTPUT, dtype="float32", shape=(BATCH, TIME, outputs),
                            meaning=meaning or "outputs per time step",
                            labels=tuple(labels) if labels is not None else None),),
        states=tuple(StatePair(input=i, output=o, shape=(BATCH, *row)) for i, o in pairs),
        num_layers=rnn.num_layers, hidden_size=rnn.hidden_size,
        training={"source": "export_module",
                  "module": f"{type(module).__module__}.{type(module).__qualname__}",
                  "parameters": sum(p.numel() for p in module.parameters())},
        export={"exporter": f"torch.onnx TorchScript-based (dynamo=False), torch "
                            f"{torch.__version__}",
                "opset": OPSET, "onnx": onnx.__version__, "traced_batch": DUMMY_BATCH,
                "traced_time": DUMMY_TIME, "python": platform.python_version(),
                **(provenance or {})},
        rnnserve_version=rnnserve.__version__,
    )
    metadata.check(name)

    def build() -> tuple[onnx.ModelProto, ModelMetadata]:
        dynamic = {DATA_INPUT: {0: BATCH, 1: TIME}, DATA_OUTPUT: {0: BATCH, 1: TIME},
                   **{n: {0: BATCH} for pair in pairs for n in pair}}
        proto = trace(StreamingWrapper(adapter), (x, *states),
                      [DATA_INPUT, *(i for i, _ in pairs)], [DATA_OUTPUT, *(o for _, o in pairs)],
                      dynamic)
        set_metadata(proto, metadata)
        return proto, metadata

    return publish(build, adapter, repo, name, version, source=type(module).__name__,
                   overwrite=overwrite, tolerance=tolerance, seed=seed, fp16=fp16, log=log)


def _input_size_hint(forward: Callable[[torch.Tensor], object], x: torch.Tensor,
                     rnn: nn.LSTM | nn.GRU, feature_size: int | None,
                     exc: Exception) -> list[str]:
    """When ``forward`` failed because the features per step are not the ones it takes:
    the size it takes. Only a size the error names is tried, and named only when
    ``forward`` then runs: a failure of any other kind gets no hint about sizes."""
    if x.dim() != 3:
        return []  # byte values: no feature size to get wrong
    size = int(x.shape[2])
    named = dict.fromkeys(int(n) for n in re.findall(r"(?<![\d.])\d{1,6}(?![\d.])", str(exc)))
    for n in [n for n in named if 0 < n != size][:8]:
        try:
            forward(torch.randn(x.shape[0], x.shape[1], n))
        except Exception:
            continue
        given = (f"the feature_size {size} given" if feature_size else
                 f"{size} (the {type(rnn).__name__}'s input size, taken when feature_size "
                 "is not given)")
        return [f"it runs on {n} features per step, not {given}: give feature_size={n} "
                f"(--feature-size {n})"]
    return []


def _batch_first_hint(rnn: nn.LSTM | nn.GRU) -> list[str]:
    """A seq-first layer in a module that does not transpose for it fails on the
    traced chunk (batch 1, time 8: the state's batch is not the layer's)."""
    if rnn.batch_first:
        return []
    return [f"its {type(rnn).__name__} has batch_first=False, while rnnserve gives forward "
            "(batch, time, ...) chunks: transpose them to (time, batch, ...) for the layer "
            "and its output back in forward, or build the layer with batch_first=True"]


def _refuse_other_initial_state(module: nn.Module, x: torch.Tensor,
                                from_zeros: tuple[torch.Tensor, ...], lstm: bool,
                                tolerance: float) -> None:
    """A ``forward`` whose state may be left out is run without it, and refused when it
    then starts from something other than zeros (a learned ``h0``, say): rnnserve
    starts every session from a zero state, so the server would compute something else
    than ``module(x)``, although every check against torch (given the state) passes."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return
    if len(params) < 2 or params[1].default is inspect.Parameter.empty:
        return  # the state is always given: the caller chooses it, zeros in rnnserve
    name, param = type(module).__name__, params[1].name
    try:
        with torch.no_grad():
            y, new = returned(module, module(x), lstm)
    except Exception:
        return  # it cannot run without a state after all
    diff = 0.0
    for got, want in zip((y, *new), from_zeros, strict=True):
        diff = max(diff, float((got.double() - want.double()).abs().max())
                   if isinstance(got, torch.Tensor) and got.shape == want.shape else math.inf)
    if diff > 0 and not diff <= tolerance:
        state = "h and c" if lstm else "h"
        raise ExportError(
            f"{name}.forward without a state ({name}(x), {param}={params[1].default!r}) does "
            f"not start from zeros: its output and state differ by {diff:.2e} from those from a "
            f"zero state (tolerance {tolerance:g}). rnnserve starts every session from a zero "
            f"state, so the server would not compute what {name}(x) does. Fold the initial "
            f"state into the module, so that a zero state means it (run the "
            f"{'LSTM' if lstm else 'GRU'} from {state} + h0 and return the new state "
            f"minus h0), or start from zeros in torch too ({param}=zeros)")


def load_module(spec: str, weights: str | Path) -> nn.Module:
    """``package.module:Name`` (a class or factory called without arguments, importable
    from the current directory) with the state dict saved in ``weights``
    (``torch.save(model.state_dict(), path)``, or a dict holding it under
    ``state_dict`` or ``model_state_dict``)."""
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ExportError(f"--module takes package.module:Name, got {spec!r}")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # the user's own code, as `python -c` would find it
    try:
        target: object = importlib.import_module(mod_name)
    except Exception as exc:
        raise ExportError(f"cannot import {mod_name!r} for --module: "
                          f"{type(exc).__name__}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ExportError(f"{mod_name!r} has no {attr!r} (--module {spec})")
        target = getattr(target, part)
    if not callable(target):
        raise ExportError(f"--module {spec}: {attr!r} is not a class or a function")
    try:
        module = target()
    except Exception as exc:
        raise ExportError(f"--module {spec}: calling {attr}() failed: "
                          f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ExportError(f"--module {spec}: {attr}() gave a {type(module).__name__}, not "
                          "a torch nn.Module")
    path = Path(weights)
    if not path.is_file():
        raise ExportError(f"weights {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ExportError(f"cannot read the weights {str(path)!r} (a state dict saved with "
                          f"torch.save): {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict):
        raise ExportError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict")
    try:
        module.load_state_dict(state)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise ExportError(f"the weights in {str(path)!r} do not fit {attr}: "
                          f"{' '.join(line.strip() for line in first[:3])}") from exc
    return module.eval()


_SPEC = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_.]*$")


def verify_module_hint(model: object, export: dict[str, object]) -> str:
    """How to compare a model of one's own with its module again. ``rnnserve verify``
    never imports what a model file names (``export.module_spec``): any file could name
    any importable callable. The recorded names only fill in the command to run, shown
    when they look like what they should be."""
    spec = str(export.get("module_spec", ""))
    weights = str(export.get("weights", ""))
    spec = spec if _SPEC.match(spec) else "PACKAGE.MODULE:NAME"
    weights = shlex.quote(weights) if weights and weights.isprintable() else "WEIGHTS"
    where = str(model)
    where = shlex.quote(where) if where.isprintable() else "MODEL"
    return ("a model of one's own is compared with its module only when the command "
            f"names it: rnnserve verify {where} --module {spec} --checkpoint {weights} "
            "(run where the module imports)")


__all__ = ["ModuleAdapter", "export_module", "load_module", "recurrent_layer",
           "verify_module_hint"]
