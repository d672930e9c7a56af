"""Export a checkpoint to ONNX with the recurrent state as declared input/output pairs.

The exporter is pinned: torch's TorchScript-based exporter (``dynamo=False``) at
opset 17. Measured with torch 2.13 it emits the native ``LSTM``/``GRU`` ops with
dynamic batch and time axes; the dynamo exporter keeps the traced time length in
its output shapes (onnxruntime then warns on every run at other lengths) and got
GRU's ``linear_before_reset`` wrong before onnxscript 0.7.1. Whatever the exporter
does, ``verify`` checks the file before it enters the repository.

Graph interface (names also recorded in the metadata):

- ``input``: (batch, time) uint8 byte values, or (batch, time, F) float32 frames,
  or (batch, samples) int16 PCM for speech models (samples a multiple of the hop)
- ``frame_in`` (speech only): (batch, win - hop) float32, the window overlap
- ``h_in`` [, ``c_in``]: (batch, layers, hidden) float32, batch-major
- ``logits``: (batch, time, outputs) float32; speech models: ``posteriors``
  (batch, frames, labels), frames = samples / hop
- ``frame_out``, ``h_out`` [, ``c_out``]: the new states, same shapes
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

import onnx
import torch
from torch import nn

import rnnserve
from rnnserve.errors import ExportError, ModelRepositoryError, VerificationError
from rnnserve.export import repository
from rnnserve.export.metadata import (
    BATCH,
    FRAMES,
    TIME,
    InputSpec,
    ModelMetadata,
    OutputSpec,
    StatePair,
)
from rnnserve.files import fsync_dir, new_file
from rnnserve.training.checkpoint import file_sha256, load_checkpoint, model_from_checkpoint
from rnnserve.training.model import RecurrentModel
from rnnserve.training.speech_model import SpeechModel, speech_model_from_checkpoint

OPSET = 17
TESTED_TORCH = "2.13."
DUMMY_BATCH = 1
DUMMY_TIME = 8
DATA_INPUT = "input"
DATA_OUTPUT = "logits"
SPEECH_OUTPUT = "posteriors"

Exportable: TypeAlias = RecurrentModel | SpeechModel


class StreamingWrapper(nn.Module):
    """``forward(x, *states) -> (y, *new_states)``: flat tensors, as ONNX wants them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        y, new = self.model(x, tuple(states))
        return (y, *new)


def state_names(model: Exportable) -> list[tuple[str, str]]:
    names = model.state_names if isinstance(model, SpeechModel) else model.config.state_names
    return [(f"{n}_in", f"{n}_out") for n in names]


def output_name(model: Exportable) -> str:
    return SPEECH_OUTPUT if isinstance(model, SpeechModel) else DATA_OUTPUT


def model_for_checkpoint(ckpt: dict[str, Any]) -> Exportable:
    if ckpt.get("task") == "speech":
        return speech_model_from_checkpoint(ckpt)
    return model_from_checkpoint(ckpt)


def build_metadata(model: Exportable, ckpt: dict[str, Any], name: str,
                   extra_export: dict[str, Any]) -> ModelMetadata:
    cfg = model.config
    decoding: dict[str, Any] = {}
    rnn_states = tuple(
        StatePair(input=i, output=o, shape=(BATCH, cfg.num_layers, cfg.hidden_size))
        for i, o in state_names(model) if i != "frame_in"
    )
    if isinstance(model, SpeechModel):
        fe = model.frontend.fe
        inp = InputSpec(name=DATA_INPUT, dtype="int16", shape=(BATCH, TIME), kind="pcm16",
                        sample_rate=fe.sample_rate, hop_samples=fe.hop_samples)
        out = OutputSpec(name=SPEECH_OUTPUT, dtype="float32",
                         shape=(BATCH, FRAMES, cfg.output_size),
                         meaning=f"posteriors per {1000 * fe.hop_samples // fe.sample_rate} ms "
                         "frame (softmax over the labels; frames = samples / hop)",
                         labels=tuple(ckpt["labels"]))
        states = (StatePair(input="frame_in", output="frame_out", shape=(BATCH, fe.overlap)),
                  *rnn_states)
        decoding = {"rule": "rnnserve.kws/1", **dict(ckpt.get("decision_rule", {})),
                    "silence_label": ckpt["labels"][0],
                    "frame_seconds": fe.hop_samples / fe.sample_rate}
        extra_export = {**extra_export, "frontend": ckpt["frontend"]}
        return _metadata(model, ckpt, name, inp, out, states, extra_export, decoding)
    if cfg.input_kind == "bytes":
        inp = InputSpec(name=DATA_INPUT, dtype="uint8", shape=(BATCH, TIME), kind="utf8_bytes")
        out = OutputSpec(name=DATA_OUTPUT, dtype="float32", shape=(BATCH, TIME, cfg.output_size),
                         meaning="logits over the next byte value (0..255)")
    else:
        inp = InputSpec(name=DATA_INPUT, dtype="float32", shape=(BATCH, TIME, cfg.input_size),
                        kind="features")
        labels = ckpt.get("labels")
        out = OutputSpec(name=DATA_OUTPUT, dtype="float32", shape=(BATCH, TIME, cfg.output_size),
                         meaning="logits per frame",
                         labels=tuple(labels) if labels else None)
    return _metadata(model, ckpt, name, inp, out, rnn_states, extra_export, decoding)


def _metadata(model: Exportable, ckpt: dict[str, Any], name: str, inp: InputSpec,
              out: OutputSpec, states: tuple[StatePair, ...], extra_export: dict[str, Any],
              decoding: dict[str, Any]) -> ModelMetadata:
    cfg = model.config
    training = {k: v for k, v in ckpt.get("metrics", {}).items()
                if isinstance(v, int | float | str | dict)}
    training["step"] = int(ckpt.get("step", 0))
    if "data" in ckpt:
        training["corpus" if ckpt["task"] == "text" else "data"] = ckpt["data"]
    return ModelMetadata(
        name=name, arch=cfg.arch, task=str(ckpt["task"]), input=inp, outputs=(out,),
        states=states, num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        training=training, export=extra_export, decoding=decoding,
        rnnserve_version=rnnserve.__version__,
    )


def export_onnx(model: Exportable, metadata: ModelMetadata) -> onnx.ModelProto:
    """Trace ``model`` at batch 1 x 8 steps with dynamic batch/time; attach metadata."""
    cfg = model.config
    model = model.eval()
    if isinstance(model, SpeechModel):
        hop = model.frontend.fe.hop_samples
        x = torch.randint(-3000, 3000, (DUMMY_BATCH, DUMMY_TIME * hop), dtype=torch.int16)
    elif cfg.input_kind == "bytes":
        x = torch.randint(0, 256, (DUMMY_BATCH, DUMMY_TIME), dtype=torch.uint8)
    else:
        x = torch.randn(DUMMY_BATCH, DUMMY_TIME, cfg.input_size)
    states = model.initial_state(DUMMY_BATCH)
    pairs = state_names(model)
    in_names = [DATA_INPUT, *(i for i, _ in pairs)]
    out_names = [output_name(model), *(o for _, o in pairs)]
    dynamic: dict[str, dict[int, str]] = {
        DATA_INPUT: {0: BATCH, 1: TIME},
        output_name(model): {0: BATCH, 1: FRAMES if isinstance(model, SpeechModel) else TIME}}
    for i, o in pairs:
        dynamic[i] = {0: BATCH}
        dynamic[o] = {0: BATCH}
    proto = trace(StreamingWrapper(model), (x, *states), in_names, out_names, dynamic)
    set_metadata(proto, metadata)
    return proto


# TracerWarnings torch's own recurrent layers raise on every trace: their checks of the
# input's and the state's sizes, which raise on a mismatch and never pick a computation.
_SIZE_CHECKS = os.path.join("torch", "nn", "modules", "rnn.py")


def trace(module: nn.Module, args: tuple[torch.Tensor, ...], in_names: list[str],
          out_names: list[str], dynamic: dict[str, dict[int, str]]) -> onnx.ModelProto:
    """``module`` through the pinned exporter (TorchScript-based, opset 17).

    A ``TracerWarning`` from the module's own code (Python control flow on a tensor's
    value, a tensor turned into a Python number) means the graph froze what the traced
    input did and may compute something else for other inputs: such a module is
    refused with the warning's text. Only the size checks of torch's recurrent layers
    are let through; the exporter's other warnings (the TorchScript exporter's
    deprecation, RNN batch sizes being traced) are handled (see module docstring)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            tmp = tempfile.TemporaryDirectory(prefix="rnnserve-export-")
            traced = Path(tmp.name) / "traced.onnx"
            torch.onnx.export(
                module.eval(), args, traced,
                input_names=in_names, output_names=out_names, dynamic_axes=dynamic,
                opset_version=OPSET, dynamo=False, do_constant_folding=True,
            )
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {exc}") from exc
    with tmp:
        frozen = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)
                  and not str(w.filename).endswith(_SIZE_CHECKS)]
        if frozen:
            w = frozen[0]
            text = " ".join(str(w.message).split())
            raise ExportError(
                f"the trace may be wrong for other inputs: at {w.filename}:{w.lineno}: "
                f"{text} (the exported graph keeps what the traced input did; compute "
                "that with tensor operations, e.g. torch.where, instead of Python "
                "control flow on a tensor's value)")
        return onnx.load(str(traced))


def pin_declared_dims(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    """Give the graph's inputs and outputs the fixed sizes the metadata declares where
    the exporter left a symbol (it names an axis it cannot infer through a slice, e.g.
    a front end's overlap state, ``Sliceframe_out_dim_1``); verification checks them."""
    declared = metadata.graph_tensors()
    for value in [*proto.graph.input, *proto.graph.output]:
        shape, _ = declared.get(value.name, ((), ""))
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue  # not declared, or another rank: verification names the mismatch
        for dim, want in zip(dims, shape, strict=True):
            if isinstance(want, int) and dim.HasField("dim_param"):
                dim.Clear()
                dim.dim_value = want


def set_metadata(proto: onnx.ModelProto, metadata: ModelMetadata) -> None:
    keep = [p for p in proto.metadata_props if not p.key.startswith("rnnserve.")]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for key, value in metadata.to_props().items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "rnnserve"
    proto.producer_version = rnnserve.__version__
    proto.doc_string = f"rnnserve {metadata.arch} model {metadata.name!r} ({metadata.task})"


def _write_new(proto: onnx.ModelProto, directory: Path) -> Path:
    """Serialize ``proto`` into a new hidden file of ``directory``, synced to disk."""
    fd, tmp = new_file(directory, ".model.", ".onnx.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(proto.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_model_atomically(proto: onnx.ModelProto, path: Path) -> None:
    """Replace ``path`` with ``proto``: written and synced beside it, renamed over it,
    the folder synced; readers see the old file or the new one, never a part."""
    tmp = _write_new(proto, path.parent)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def export_checkpoint(
    checkpoint: str | Path,
    repo: str | Path,
    name: str,
    version: int | None = None,
    *,
    overwrite: bool = False,
    tolerance: float = 1e-5,
    seed: int = 0,
    fp16: bool = False,
    log: Callable[[str], None] = print,
) -> repository.ModelVersion:
    """Export, verify, and only then publish ``REPO/NAME/VERSION/model.onnx``.

    With ``fp16`` the recurrent layers and their states are half precision
    (``rnnserve.export.fp16``): the fp32 graph is verified first, within ``tolerance``,
    then the fp16 graph against the fp32 torch model within the fp16 bound.

    The model is written into a hidden staging directory of the repository
    (``REPO/.rnnserve-staging-*``) and renamed into place after verification passed,
    so a server scanning the repository never sees a half-written or unverified
    version. The staging folders of exports that were killed are removed by the next
    export (``_sweep_staging``).
    """
    repository.check_name(name)
    ckpt_path = Path(checkpoint)
    ckpt = load_checkpoint(ckpt_path)
    model = model_for_checkpoint(ckpt)

    def build() -> tuple[onnx.ModelProto, ModelMetadata]:
        export_info = {
            "exporter": f"torch.onnx TorchScript-based (dynamo=False), torch {torch.__version__}",
            "opset": OPSET,
            "onnx": onnx.__version__,
            "traced_batch": DUMMY_BATCH,
            "traced_time": DUMMY_TIME,
            "checkpoint": str(ckpt_path.resolve()),
            "checkpoint_sha256": file_sha256(ckpt_path),
        }
        metadata = build_metadata(model, ckpt, name, export_info)
        return export_onnx(model, metadata), metadata

    return publish(build, model, repo, name, version, source=str(ckpt_path),
                   overwrite=overwrite, tolerance=tolerance, seed=seed, fp16=fp16, log=log)


def publish(build: Callable[[], tuple[onnx.ModelProto, ModelMetadata]], reference: nn.Module,
            repo: str | Path, name: str, version: int | None, *, source: str,
            overwrite: bool, tolerance: float, seed: int, fp16: bool,
            log: Callable[[str], None]) -> repository.ModelVersion:
    """``build()`` the graph and its metadata, verify it against ``reference`` (torch,
    ``forward(x, states) -> (y, new_states)`` with batch-major states) in a hidden staging
    directory of the repository, and only then publish it.

    The version is claimed when publishing, not before the export: ``os.mkdir`` of the
    version directory is the claim (it fails when the directory exists), so concurrent
    exports of one name never share a version; an automatic version moves on to the next
    free number, an explicit one is refused unless ``overwrite``. The verified file is
    then renamed into the claimed directory (with ``overwrite``, over the old file: the
    version is never missing). Nothing is left behind on a failure: no staging
    directory, no empty version or model directory.

    With ``fp16`` the fp32 graph is verified first, all of it at ``tolerance`` (chunked
    streaming, batching, parity with ``reference``), and only then converted and
    verified again within the fp16 bound: that bound (1e-2, relative) is wide enough
    to pass a module that is not causal in time, which the fp32 check refuses."""
    if not torch.__version__.startswith(TESTED_TORCH):
        log(f"warning: export is tested with torch {TESTED_TORCH}x, this is {torch.__version__}")
    from rnnserve.export.verify import verify_file

    repo_path = Path(repo)
    model_dir = repo_path / name
    if version is not None:
        repository.check_version(version)
    if repo_path.exists() and not repo_path.is_dir():
        raise ModelRepositoryError(f"model repository {str(repo_path)!r} is not a directory")
    _check_writable(repo_path)  # fail before the export's seconds, writing nothing yet
    if version is not None and not overwrite and (model_dir / str(version)).exists():
        raise _exists(model_dir / str(version))  # early; checked again when publishing
    if version is None and model_dir.is_dir():  # the last version taken: none comes next
        repository.check_version(repository.next_version(repo_path, name))
    where = model_dir / (str(version) if version is not None else "<next version>")
    log(f"exporting {source} -> {where / repository.MODEL_FILE} (opset {OPSET})")
    proto, metadata = build()  # a module the tracer cannot follow is refused here: no files
    pin_declared_dims(proto, metadata)
    try:
        repo_path.mkdir(parents=True, exist_ok=True)
        _sweep_staging(repo_path, log)
        staging = Path(tempfile.mkdtemp(dir=repo_path, prefix=f"{STAGING_PREFIX}{name}-"))
        try:  # whose it is: a later export removes it if this process dies unfinished
            (staging / STAGING_OWNER).write_text(f"{socket.gethostname()}\n{os.getpid()}\n")
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as exc:
        raise _cannot_write(repo_path, exc) from exc
    try:
        staged = staging / repository.MODEL_FILE
        if fp16:
            proto, metadata = _fp32_checked_fp16(proto, metadata, staging, reference,
                                                 tolerance, seed, log)
        staged.write_bytes(proto.SerializeToString())  # private; verify rewrites it atomically
        report = verify_file(staged, model=reference, tolerance=None if fp16 else tolerance,
                             seed=seed, log=log)
        report.raise_if_failed()
        if not report.written:
            raise ModelRepositoryError(f"cannot write the verification report into "
                                       f"{str(staged)!r}")
        version, final_dir = _publish_file(staged, model_dir, version, overwrite)
    except OSError as exc:
        raise _cannot_write(repo_path, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return repository.ModelVersion(name, version, final_dir / repository.MODEL_FILE)


def _fp32_checked_fp16(proto: onnx.ModelProto, metadata: ModelMetadata, staging: Path,
                       reference: nn.Module, tolerance: float, seed: int,
                       log: Callable[[str], None]) -> tuple[onnx.ModelProto, ModelMetadata]:
    """The fp16 graph of ``proto``, after the fp32 graph passed its own verification;
    its metadata carries that verification's figures (``fp32_graph``), which the fp16
    graph's verification keeps (no later verify can rerun them: the file is fp16)."""
    from dataclasses import replace

    from rnnserve.export.fp16 import to_fp16
    from rnnserve.export.verify import FP32_GRAPH_FIGURES, verify_file

    log(f"fp16: verifying the fp32 graph first (tolerance {tolerance:.0e})")
    full = staging / "model.fp32.onnx"
    full.write_bytes(proto.SerializeToString())
    first = verify_file(full, model=reference, tolerance=tolerance, seed=seed, write=False,
                        log=log)
    if not first.passed:
        raise VerificationError(f"{full}: verification of the fp32 graph, before its fp16 "
                                f"conversion, failed: {'; '.join(first.failures)}")
    full.unlink()
    recorded = first.to_metadata()
    proto, metadata = to_fp16(proto, metadata)
    metadata = replace(metadata, verification={
        "fp32_graph": {k: recorded[k] for k in FP32_GRAPH_FIGURES}})
    set_metadata(proto, metadata)
    log(f"fp16: {metadata.export['fp16']}")
    return proto, metadata


STAGING_PREFIX = ".rnnserve-staging-"
STAGING_OWNER = "owner"  # in a staging folder: the exporting host and process id
STAGING_ORPHAN_S = 24 * 3600  # a staging folder without an owner this old is left over


def _sweep_staging(repo_path: Path, log: Callable[[str], None]) -> None:
    """Remove the staging folders of exports that were killed (an export removes its
    own when it ends, however it ends, unless the process dies): those of this host
    whose process is gone, and any without an owner (killed before it was written)
    untouched for a day. Another host's live export is never touched: a process id
    is only checked on its own host."""
    host = socket.gethostname()
    for folder in repo_path.glob(f"{STAGING_PREFIX}*"):
        try:
            if not folder.is_dir():
                continue
            owner = folder / STAGING_OWNER
            if owner.exists():
                lines = owner.read_text().split()
                if len(lines) != 2 or lines[0] != host or not lines[1].isdigit() or \
                        _alive(int(lines[1])):
                    continue
                why = f"process {lines[1]}, gone"
            elif time.time() - folder.stat().st_mtime > STAGING_ORPHAN_S:
                why = "no owner, a day old"
            else:
                continue
            shutil.rmtree(folder)
            log(f"removed {str(folder)!r}: left by an export that did not finish ({why})")
        except OSError:  # another export's sweep got there first, or no right to it
            continue


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _check_writable(repo_path: Path) -> None:
    """The repository, or the folder it will be made in, can be written to."""
    existing = repo_path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise _cannot_write(repo_path, NotADirectoryError(errno.ENOTDIR, os.strerror(
            errno.ENOTDIR)))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _cannot_write(repo_path, PermissionError(errno.EACCES, os.strerror(
            errno.EACCES)))


def _exists(final_dir: Path) -> ModelRepositoryError:
    return ModelRepositoryError(
        f"{str(final_dir)!r} already exists; pick another --version or pass --overwrite")


def _cannot_write(repo_path: Path, exc: OSError) -> ModelRepositoryError:
    return ModelRepositoryError(
        f"cannot write to model repository {str(repo_path)!r}: {exc.strerror or exc}")


def _publish_file(staged: Path, model_dir: Path, version: int | None,
                  overwrite: bool) -> tuple[int, Path]:
    """Claim a version directory and rename ``staged`` into it; (version, directory)."""
    made_model_dir = False
    for _ in range(1000):
        if not model_dir.is_dir():
            try:
                model_dir.mkdir()
                made_model_dir = True
            except FileExistsError:
                pass
        v = version if version is not None else repository.next_version(
            model_dir.parent, model_dir.name)
        repository.check_version(v)  # past the last: no folder a server would read
        final_dir = model_dir / str(v)
        try:
            os.mkdir(final_dir)  # the claim: fails when the version exists
            claimed = True
        except FileNotFoundError:
            continue  # the model directory went away meanwhile (a failed export's cleanup)
        except FileExistsError:
            if version is None:
                continue  # taken meanwhile: next_version rescans and moves past it
            if not overwrite:
                raise _exists(final_dir) from None
            if not final_dir.is_dir():
                raise ModelRepositoryError(
                    f"{str(final_dir)!r} exists and is not a version directory") from None
            claimed = False
        break
    else:
        raise ModelRepositoryError(f"no free version in {str(model_dir)!r}")
    try:
        os.replace(staged, final_dir / repository.MODEL_FILE)
    except BaseException:
        if claimed:
            _rmdir_quietly(final_dir)
        if made_model_dir:
            _rmdir_quietly(model_dir)
        raise
    fsync_dir(final_dir)
    fsync_dir(model_dir)
    return v, final_dir


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()  # only when empty
    except OSError:
        pass
