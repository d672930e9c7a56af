"""The ``rnnserve`` command: train, init, export, verify, models.

Heavy imports (torch, onnx) happen inside the subcommand that needs them, so
``rnnserve --help`` and the serving commands never load torch. Errors the user
can act on end in one line on stderr and a non-zero exit, never a traceback;
set ``RNNSERVE_DEBUG=1`` to see tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import NoReturn

import rnnserve
from rnnserve.errors import RnnserveError, require_train_extra

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _sources(text: str) -> tuple[str, ...]:
    from rnnserve.training.data import SOURCES

    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [n for n in names if n not in SOURCES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown source(s) {unknown or [text]}; choose from {', '.join(SOURCES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rnnserve", description="Train, export and serve stateful LSTM/GRU models.")
    p.add_argument("--version", action="version", version=f"rnnserve {rnnserve.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    t = sub.add_parser("train", help="train a model; writes last.pt and best.pt into --out")
    t.add_argument("--task", choices=["text"], default="text",
                   help="text: byte-level language model on text shipped with Python")
    t.add_argument("--arch", choices=["lstm", "gru"], default="gru")
    t.add_argument("--out", required=True, help="directory for the checkpoint files")
    t.add_argument("--quick", action="store_true", help="small fast preset (about 2.5 minutes)")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    t.add_argument("--overwrite", action="store_true", help="start again over an existing run")
    t.add_argument("--steps", type=_positive, help="optimizer steps (extends a resumed run)")
    t.add_argument("--hidden", type=_positive, dest="hidden_size")
    t.add_argument("--layers", type=_positive, dest="num_layers")
    t.add_argument("--embed", type=_positive, dest="embed_size")
    t.add_argument("--dropout", type=float)
    t.add_argument("--batch-size", type=_positive)
    t.add_argument("--seq-len", type=_positive)
    t.add_argument("--lr", type=float)
    t.add_argument("--eval-every", type=_positive)
    t.add_argument("--seed", type=int)
    t.add_argument("--sources", type=_sources,
                   help="comma-separated text sources (default: pydoc_topics,idle_docs; "
                   "also: stdlib_docstrings)")
    t.add_argument("--threads", type=_positive, help="torch threads (default: all cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("init", help="write an untrained checkpoint (for speed tests)")
    i.add_argument("--arch", choices=["lstm", "gru"], required=True)
    i.add_argument("--input", choices=["bytes", "features"], required=True, dest="input_kind")
    i.add_argument("--input-size", type=_positive, help="feature size (features input)")
    i.add_argument("--outputs", type=_positive, help="output size (default: 256 for bytes)")
    i.add_argument("--hidden", type=_positive, default=256, dest="hidden_size")
    i.add_argument("--layers", type=_positive, default=2, dest="num_layers")
    i.add_argument("--embed", type=_positive, default=64, dest="embed_size")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True, help="checkpoint file to write (*.pt)")
    i.set_defaults(func=_cmd_init)

    e = sub.add_parser("export", help="export a checkpoint into a model repository, verified")
    e.add_argument("checkpoint", help="a *.pt file written by `rnnserve train` or `init`")
    e.add_argument("--repo", required=True, help="model repository: REPO/NAME/VERSION/model.onnx")
    e.add_argument("--name", required=True, help="model name in the repository")
    e.add_argument("--version", type=_positive, dest="model_version",
                   help="version number (default: one past the highest)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing version")
    e.add_argument("--tolerance", type=float, default=1e-5, help="largest difference allowed")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("verify", help="verify an exported model (file, version or model dir)")
    v.add_argument("model", help="model.onnx, REPO/NAME/VERSION or REPO/NAME (highest version)")
    v.add_argument("--checkpoint", help="compare with this checkpoint (default: the one "
                   "recorded at export, when it is still there and unchanged)")
    v.add_argument("--tolerance", type=float, default=1e-5)
    v.add_argument("--cases", type=_positive, default=8, help="random cases to run")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--no-write", action="store_true", help="leave the model file untouched")
    v.set_defaults(func=_cmd_verify)

    s = sub.add_parser("serve", help="serve a model repository over gRPC",
                       description="Settings: defaults < --config TOML < RNNSERVE_* environment "
                       "< these flags.")
    s.add_argument("--config", help="TOML file with settings (keys as the flags, with _)")
    _add_settings_flags(s)
    s.set_defaults(func=_cmd_serve)

    st = sub.add_parser("stream", help="stream a text file (or stdin) to a running server")
    st.add_argument("file", nargs="?", help="text file (default: standard input)")
    st.add_argument("--model", required=True)
    st.add_argument("--version", type=int, default=0, dest="model_version",
                    help="model version (default: the highest)")
    st.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT of rnnserve serve")
    st.add_argument("--chunk-bytes", type=_positive, default=16, help="bytes per chunk")
    st.add_argument("--timeout", type=float, default=30.0, help="seconds per chunk")
    st.set_defaults(func=_cmd_stream)

    m = sub.add_parser("models", help="list the models in a repository")
    m.add_argument("--repo", required=True)
    m.set_defaults(func=_cmd_models)
    return p


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server setting, documented by the setting's docstring."""
    from rnnserve.server.settings import Settings

    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=field.description)
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=f"{field.description} (default: {field.default})")


def _cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from rnnserve.server.app import run
    from rnnserve.server.settings import Settings

    names = Settings.model_fields
    try:
        settings = Settings.load(args.config, **{k: getattr(args, k) for k in names})
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise RnnserveError(f"setting {where}: {err['msg']}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise RnnserveError(str(exc).splitlines()[0]) from exc
    return run(settings)


def _cmd_stream(args: argparse.Namespace) -> int:
    import asyncio

    from rnnserve.client.stream import stream_text

    if args.file is None:
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise RnnserveError(f"cannot read {args.file!r}: {exc.strerror}") from exc
    return asyncio.run(stream_text(args.server, args.model, args.model_version, data,
                                   args.chunk_bytes, args.timeout))


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    require_train_extra("training")
    from rnnserve.training.train import PRESETS, train_text

    cfg = PRESETS["quick" if args.quick else "default"]
    overrides = {k: getattr(args, k) for k in (
        "hidden_size", "num_layers", "embed_size", "dropout", "batch_size", "seq_len", "lr",
        "eval_every", "seed", "sources", "threads") if getattr(args, k) is not None}
    if args.resume and (overrides or args.quick):
        raise RnnserveError("--resume continues the saved run; only --steps may change it")
    try:
        cfg = replace(cfg, task=args.task, arch=args.arch, **overrides)
        cfg.model_config()  # validate dimensions before loading data
    except ValueError as exc:
        raise RnnserveError(str(exc)) from exc
    result = train_text(cfg, args.out, resume=args.resume, steps=args.steps,
                        overwrite=args.overwrite, progress=not args.no_progress)
    print(f"validation: {result['val_bits_per_byte']:.3f} bits per byte "
          f"(unigram entropy of the same text: {result['unigram_entropy_bits']:.2f}); "
          f"{result['steps']} steps in {result['train_seconds']:.0f}s; "
          f"checkpoints in {args.out}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    require_train_extra("init")
    from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint
    from rnnserve.training.model import ModelConfig

    if args.input_kind == "features" and args.input_size is None:
        raise RnnserveError("--input features needs --input-size")
    input_size = 256 if args.input_kind == "bytes" else args.input_size
    outputs = args.outputs or (256 if args.input_kind == "bytes" else None)
    if outputs is None:
        raise RnnserveError("--input features needs --outputs")
    cfg = ModelConfig(arch=args.arch, input_kind=args.input_kind, input_size=input_size,
                      output_size=outputs, hidden_size=args.hidden_size,
                      num_layers=args.num_layers, embed_size=args.embed_size)
    task = "text" if args.input_kind == "bytes" else "features"
    try:
        save_checkpoint(args.out, new_model_checkpoint(cfg, task, seed=args.seed))
    except OSError as exc:
        raise RnnserveError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
    print(f"wrote untrained {args.arch} checkpoint {args.out}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    require_train_extra("export")
    from rnnserve.export.onnx_export import export_checkpoint

    mv = export_checkpoint(args.checkpoint, args.repo, args.name, args.model_version,
                           overwrite=args.overwrite, tolerance=args.tolerance, log=_log)
    print(f"exported {mv.name} version {mv.version}: {mv.path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnserve.export import repository
    from rnnserve.export.verify import verify_file

    mv = repository.resolve(args.model)
    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = _recorded_checkpoint(mv.path)
        if checkpoint is not None:
            _log(f"comparing with the checkpoint recorded at export: {checkpoint}")
    elif not Path(checkpoint).is_file():
        raise RnnserveError(f"checkpoint {checkpoint!r} not found")
    report = verify_file(mv.path, checkpoint=checkpoint, tolerance=args.tolerance,
                         seed=args.seed, n_cases=args.cases, write=not args.no_write, log=_log)
    report.raise_if_failed()
    print(f"verified {mv.path}")
    return 0


def _recorded_checkpoint(model_path: object) -> str | None:
    """The export's checkpoint when it still exists with the same sha256 and torch is here."""
    from pathlib import Path

    import onnxruntime as ort

    from rnnserve.export.metadata import ModelMetadata

    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map, str(model_path))
    path = meta.export.get("checkpoint")
    if not path or not Path(path).is_file():
        return None
    from rnnserve.training.checkpoint import file_sha256

    return path if file_sha256(path) == meta.export.get("checkpoint_sha256") else None


def _cmd_models(args: argparse.Namespace) -> int:
    import onnxruntime as ort

    from rnnserve.export import repository
    from rnnserve.export.metadata import ModelMetadata

    found = repository.list_models(args.repo)
    if not found:
        print(f"no models in {args.repo}")
        return 0
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    for mv in found:
        sess = ort.InferenceSession(str(mv.path), opts, providers=["CPUExecutionProvider"])
        meta = ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map, str(mv.path))
        ver = meta.verification
        status = "verified" if ver.get("passed") else "NOT verified"
        print(f"{mv.name}\t{mv.version}\t{meta.arch} {meta.num_layers}x{meta.hidden_size}\t"
              f"{meta.task}\t{meta.input.kind}\t{status}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except RnnserveError as exc:
        print(f"rnnserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"rnnserve {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if os.environ.get("RNNSERVE_DEBUG"):
            raise
        print(f"rnnserve {args.command}: internal error: {type(exc).__name__}: "
              f"{str(exc).splitlines()[0] if str(exc) else ''} "
              "(set RNNSERVE_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
