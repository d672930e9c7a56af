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
from typing import Any, NoReturn

import rnnserve
from rnnserve.errors import RnnserveError, UsageError, require_train_extra

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


def _pitch(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer 0..99, got {text!r}") from None
    if not 0 <= value <= 99:  # espeak-ng clamps it silently
        raise argparse.ArgumentTypeError(f"expected an integer 0..99, got {value}")
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
    t.add_argument("--task", choices=["text", "speech"], default="text",
                   help="text: byte-level language model on text shipped with Python; "
                   "speech: keyword spotting on audio synthesized with espeak-ng")
    t.add_argument("--arch", choices=["lstm", "gru"],
                   help="recurrent layer (default: gru)")
    t.add_argument("--out", required=True, help="directory for the checkpoint files")
    t.add_argument("--quick", action="store_true",
                   help="small fast preset (text about 2.5 minutes, speech about 4)")
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
                   help="text: comma-separated text sources (default: pydoc_topics,idle_docs; "
                   "also: stdlib_docstrings)")
    t.add_argument("--data-dir", help="speech: cache of the synthesized data set "
                   "(default: ~/.cache/rnnserve/speech)")
    t.add_argument("--threads", type=_positive, help="torch threads (default: all cores)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("init", help="write an untrained checkpoint (for speed tests)")
    i.add_argument("--arch", choices=["lstm", "gru"], required=True)
    i.add_argument("--input", choices=["bytes", "features", "pcm16"], required=True,
                   dest="input_kind", help="pcm16: a speech model with the log-mel front end")
    i.add_argument("--input-size", type=_positive, help="feature size (features input)")
    i.add_argument("--outputs", type=_positive,
                   help="output size (default: 256 for bytes, the keyword labels for pcm16)")
    i.add_argument("--hidden", type=_positive, default=256, dest="hidden_size")
    i.add_argument("--layers", type=_positive, default=2, dest="num_layers")
    i.add_argument("--embed", type=_positive, default=64, dest="embed_size")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True, help="checkpoint file to write (*.pt)")
    i.set_defaults(func=_cmd_init)

    e = sub.add_parser("export", help="export a checkpoint into a model repository, verified")
    e.add_argument("checkpoint", help="a *.pt file written by `rnnserve train` or `init`; "
                   "with --module, your model's state dict (torch.save(model.state_dict()))")
    e.add_argument("--repo", required=True, help="model repository: REPO/NAME/VERSION/model.onnx")
    e.add_argument("--name", required=True, help="model name in the repository")
    e.add_argument("--version", type=_positive, dest="model_version",
                   help="version number (default: one past the highest)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing version")
    e.add_argument("--tolerance", type=float, default=1e-5,
                   help="largest difference allowed (default 1e-5); with --fp16 it applies "
                   "to the fp32 graph, verified before the conversion")
    e.add_argument("--fp16", action="store_true",
                   help="recurrent layers and their states in half precision (for GPUs), "
                   "the input, front end, output layer and outputs in fp32: the fp32 graph "
                   "is verified first (within --tolerance), then the fp16 graph within "
                   "1e-2 x max(1, largest |reference|) for each output and state, against "
                   "torch also x max(1, feature scale / 10)")
    own = e.add_argument_group("a model of your own (README: Your own PyTorch model)")
    own.add_argument("--module", metavar="PACKAGE.MODULE:NAME",
                   help="your nn.Module: a class or factory called without arguments, "
                   "importable from here; its recurrence one nn.LSTM/nn.GRU, forward(x, "
                   "state) -> (y, state) in that layer's state layout")
    own.add_argument("--input-kind", choices=["features", "utf8_bytes"],
                   help="with --module: (batch, time, F) float32 frames (default) or "
                   "byte values (given to the module as int64)")
    own.add_argument("--feature-size", type=_positive,
                   help="with --module: F (default: the recurrent layer's input size)")
    own.add_argument("--labels", help="with --module: comma-separated names of the outputs")
    own.add_argument("--meaning", help="with --module: what the outputs are, for clients")
    e.set_defaults(func=_cmd_export)

    v = sub.add_parser("verify", help="verify an exported model (file, version or model dir)")
    v.add_argument("model", help="model.onnx, REPO/NAME/VERSION or REPO/NAME (highest version)")
    v.add_argument("--checkpoint", help="compare with this checkpoint, or with these "
                   "weights for --module (default: the checkpoint the export recorded, when "
                   "it is still there and unchanged)")
    v.add_argument("--module", help="a model of one's own: compare with this module "
                   "(package.module:Name, importable from here) holding the --checkpoint "
                   "weights")
    v.add_argument("--tolerance", type=float,
                   help="largest difference allowed (default 1e-5); not for an fp16 model, "
                   "whose bound is relative (see export --fp16)")
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

    st = sub.add_parser("stream", help="stream a text file (or stdin) or a WAV file to a "
                        "running server")
    st.add_argument("file", nargs="?", help="text file (default: standard input)")
    st.add_argument("--wav", help="stream this WAV file (16-bit PCM; resampled to the "
                    "model's rate) to a speech model and print its detections")
    st.add_argument("--chunk-ms", type=_positive, default=40,
                    help="audio per chunk in milliseconds (default 40)")
    st.add_argument("--fast", action="store_true",
                    help="send audio as fast as the server answers instead of in real time")
    st.add_argument("--show-unknown", action="store_true",
                    help="also print detections of words that are not keywords")
    st.add_argument("--model", required=True)
    st.add_argument("--version", type=int, default=0, dest="model_version",
                    help="model version (default: the highest)")
    st.add_argument("--server", default="127.0.0.1:8001", help="HOST:PORT of rnnserve serve")
    st.add_argument("--chunk-bytes", type=_positive, default=16, help="bytes per chunk")
    st.add_argument("--timeout", type=float, default=30.0,
                    help="seconds to wait for each chunk's answer (default 30)")
    st.add_argument("--keepalive-s", type=float, default=0.0, metavar="S",
                    help="ping the server after S seconds without activity and give up "
                    "on the connection when no answer comes within 20 s (0: off, the "
                    "default; keep S at or above the server's --min-client-ping-s)")
    st.add_argument("--token-file",
                    help="file holding the bearer token to send (a server with "
                    "--tokens-file); default: $RNNSERVE_TOKEN when set")
    st.add_argument("--tls-ca-file",
                    help="PEM CA certificate(s) to verify a TLS server with (connects over "
                    "TLS)")
    st.add_argument("--tls-cert-file", help="PEM client certificate (mutual TLS)")
    st.add_argument("--tls-key-file", help="PEM private key of --tls-cert-file")
    st.set_defaults(func=_cmd_stream)

    sy = sub.add_parser("say", help="synthesize speech with espeak-ng into a 16 kHz WAV file "
                        "(to stream to a keyword model)")
    sy.add_argument("text", help="what to say, e.g. \"Go left. Stop.\"")
    sy.add_argument("--out", required=True, help="WAV file to write")
    sy.add_argument("--voice", default="en-us+m3", help="espeak-ng voice[+variant]")
    sy.add_argument("--speed", type=_positive, default=150, help="words per minute")
    sy.add_argument("--pitch", type=_pitch, default=50, help="0..99")
    sy.set_defaults(func=_cmd_say)

    b = sub.add_parser(
        "bench", help="real-time streams swept over concurrency: latency percentiles, "
        "throughput, capacity; writes bench.json and bench.png",
        description="Each stream sends one chunk per --chunk-ms (open loop). Capacity is the "
        "most streams with p99 chunk latency <= 100 ms and no errors, every smaller level "
        "passing too.")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", help="HOST:PORT of a running rnnserve serve")
    where.add_argument("--repo", help="start rnnserve serve on 127.0.0.1 with this repository "
                       "for the run, and stop it after")
    where.add_argument("--workload", choices=["speech-small", "speech-large", "text-small",
                                              "speech-tiny"],
                       help="a reference workload (random weights; built on first use into "
                       "--workload-dir, needs the train extra) served like --repo")
    b.add_argument("--workload-dir", default="runs/workloads",
                   help="where the reference workloads are built (default runs/workloads)")
    b.add_argument("--model", help="model name (with --server or --repo)")
    b.add_argument("--version", type=int, default=0, dest="model_version",
                   help="model version (default: the highest)")
    b.add_argument("--streams", default="1,4,16,64",
                   help="comma-separated numbers of concurrent streams (default 1,4,16,64)")
    b.add_argument("--duration-s", type=float, default=10.0, help="seconds per level")
    b.add_argument("--chunk-ms", type=_positive, default=40, help="audio per chunk (ms); "
                   "for feature models one frame per hop, for text see --chunk-bytes")
    b.add_argument("--chunk-bytes", type=_positive, default=16, help="bytes per text chunk")
    b.add_argument("--out", default="runs/bench", help="where bench.json and bench.png go")
    b.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                   help="extra flag for the started server (with --repo), e.g. "
                   "--serve-arg=--max-batch-delay-ms=5; repeatable (its batch size "
                   "is --max-batch-size, whatever its config or environment says)")
    b.add_argument("--no-plot", action="store_true", help="write bench.json only")
    b.add_argument("--baselines", action="store_true",
                   help="also measure the transport ceiling (no model), rnnserve unbatched "
                   "and the compute ceiling (onnxruntime alone), and print the ratios")
    b.add_argument("--redis-store", action="store_true",
                   help="also run the levels with a server on the Redis session store (a "
                   "redis-server started for the run), the two servers taking turns at "
                   "each level, and compare the capacities")
    b.add_argument("--redis-shards", type=int, default=1, metavar="N",
                   help="with --redis-store: N redis-servers, the session store sharded "
                   "over them")
    b.add_argument("--soak-s", type=float, default=0.0, metavar="S",
                   help="after the levels, a soak: one level for S seconds at "
                   "--soak-streams (default 70%% of the capacity found), reporting p99 per "
                   "30 s window and the server's memory")
    b.add_argument("--soak-streams", type=int, default=0,
                   help="streams of the soak (default: 70%% of the capacity found)")
    b.add_argument("--repeats", type=_positive, default=1,
                   help="run each level this many times (servers taking turns); the repeat "
                   "with the median p99 counts, errors of any repeat count; the closed "
                   "loops too, the run with the median throughput counting, and with "
                   "--baselines each round's ratio to the echo server's (default 1)")
    b.add_argument("--load-procs", type=_positive, default=2,
                   help="processes generating the load (default 2)")
    b.add_argument("--connections", type=int, default=0,
                   help="gRPC connections per load process, spread over the server's "
                   "worker processes (default: as many as it has, which ListModels' "
                   "answer says; 1 for a server that does not)")
    b.add_argument("--spread", choices=("even", "kernel"), default="even",
                   help="with several --connections: even (default) reopens connections "
                   "until each worker process holds its share, and the streams take the "
                   "workers in turn; kernel keeps where the kernel's hash puts them")
    b.add_argument("--many", type=int, default=0, metavar="N",
                   help="send the streams N at a time on StreamMany streams, one message "
                   "per tick for N sessions, as a gateway would (default: one Stream each)")
    b.add_argument("--packed", action="store_true",
                   help="with --many N: send each tick's N chunks in one array on "
                   "StreamPacked streams instead of StreamMany items")
    b.add_argument("--max-batch-size", type=_positive, default=64,
                   help="the started server's max batch size, also the compute ceiling's "
                   "batch (default 64)")
    b.add_argument("--idle-sessions", type=int, default=0, metavar="N",
                   help="also open N idle sessions on a fresh server and report its resident "
                   "memory growth against their raw state bytes")
    b.add_argument("--saturation-streams", type=int, default=0,
                   help="streams of the closed-loop saturation run (default: the most "
                   "of --streams)")
    b.set_defaults(func=_cmd_bench)

    r = sub.add_parser(
        "reshard", help="move the shared store's sessions to a new list of Redis shards "
        "(with the servers stopped, or online)",
        description="A new list of shards for --session-store puts some sessions on "
        "another shard; this moves them there (record, lease, final answer, with their "
        "time to live) and marks every shard with its new place. Stop the servers first; "
        "start them again with the --to list. Or, with --online, keep them serving: "
        "restart each with --session-store NEW --session-store-from OLD (they hand off "
        "the sessions they load), then run this to hand off the rest; the servers may "
        "then drop --session-store-from. Safe to run again after an interruption.")
    r.add_argument("--from", dest="old", required=True, metavar="URLS",
                   help="the store URLs the servers ran with, comma-separated, in order")
    r.add_argument("--to", dest="new", required=True, metavar="URLS",
                   help="the new list, comma-separated, in the order the servers will use")
    r.add_argument("--prefix", default="rnnserve", help="the store's key prefix")
    r.add_argument("--dry-run", action="store_true", help="say what would move; move nothing")
    r.add_argument("--ignore-leases", action="store_true",
                   help="move sessions whose lease is live (a server may be writing them)")
    r.add_argument("--online", action="store_true",
                   help="the servers keep running, every one of them on --session-store NEW "
                   "--session-store-from OLD: hand off the sessions they have not")
    r.add_argument("--wait-s", type=float, default=30.0, metavar="S",
                   help="with --online: how long to wait for the leases of sessions still "
                   "written on the old list to lapse (default 30)")
    r.set_defaults(func=_cmd_reshard)

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


class _Refusing(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not a usage text and exit
        raise UsageError(message)


def settings_given(flags: Sequence[str]) -> set[str]:
    """The server settings that ``flags`` set as ``rnnserve serve`` reads them
    (argparse's own reading: ``--max-batch-s=8`` is ``--max-batch-size``); flags it
    cannot read (an ambiguous abbreviation, a missing value) are a UsageError."""
    parser = _Refusing(add_help=False)
    parser.add_argument("--config")
    _add_settings_flags(parser)
    args, _ = parser.parse_known_args(list(flags))
    return {k for k, v in vars(args).items() if v is not None and k != "config"}


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


def _read_file(path: str, what: str = "") -> bytes:
    """A file's bytes, or a one-line error naming it (and ``what`` it is: a flag)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise RnnserveError(f"cannot read {what + ' ' if what else ''}{path!r}: "
                            f"{exc.strerror}") from exc


def _connection(args: argparse.Namespace) -> dict[str, Any]:
    """AsyncClient's token, TLS and keepalive arguments from ``stream``'s flags (the
    token from a file or the environment, not the command line, where other users may
    read it)."""
    def read(flag: str, path: str | None) -> bytes | None:
        return None if path is None else _read_file(path, flag)

    if (args.tls_cert_file is None) != (args.tls_key_file is None):
        raise RnnserveError("--tls-cert-file and --tls-key-file go together")
    raw = read("--token-file", args.token_file)
    token = raw.decode(errors="replace").strip() if raw is not None else \
        os.environ.get("RNNSERVE_TOKEN", "").strip()
    if raw is not None and not token:
        raise RnnserveError(f"--token-file {args.token_file!r} is empty")
    from rnnserve.protos.headers import MAX_MS_SECONDS

    if not 0 <= args.keepalive_s <= MAX_MS_SECONDS:  # nan too
        raise RnnserveError(f"--keepalive-s must be from 0 to {MAX_MS_SECONDS} seconds")
    return {"token": token or None, "keepalive_s": args.keepalive_s,
            "root_certificates": read("--tls-ca-file", args.tls_ca_file),
            "certificate_chain": read("--tls-cert-file", args.tls_cert_file),
            "private_key": read("--tls-key-file", args.tls_key_file)}


def _cmd_stream(args: argparse.Namespace) -> int:
    import asyncio

    from rnnserve.client.stream import stream_audio, stream_text

    connect = _connection(args)
    if args.wav is not None:
        if args.file is not None:
            raise RnnserveError("give either a text file or --wav, not both")
        from rnnserve.audio import read_wav

        pcm, rate = read_wav(args.wav)
        return asyncio.run(stream_audio(args.server, args.model, args.model_version, pcm, rate,
                                        args.chunk_ms, not args.fast, args.timeout,
                                        args.show_unknown, connect))

    if args.file is None:
        data = sys.stdin.buffer.read()
    else:
        data = _read_file(args.file)
    return asyncio.run(stream_text(args.server, args.model, args.model_version, data,
                                   args.chunk_bytes, args.timeout, connect))


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnserve.client.bench import run_bench

    try:
        levels = [int(x) for x in args.streams.split(",") if x.strip()]
    except ValueError:
        raise RnnserveError(f"--streams takes numbers like 1,4,16, not {args.streams!r}") from None
    if args.duration_s <= 0:
        raise RnnserveError("--duration-s must be positive")
    repo, model, chunk_ms, chunk_bytes = args.repo, args.model, args.chunk_ms, args.chunk_bytes
    if args.workload:
        from rnnserve.client.bench import build_workload

        built, chunk = build_workload(args.workload, Path(args.workload_dir))
        repo, model = str(built), args.workload
        if args.workload.startswith("text"):
            chunk_bytes = chunk
        else:
            chunk_ms = chunk
    elif not model:
        raise RnnserveError("--model is needed with --server or --repo")
    run_bench(args.server, repo, model, args.model_version, levels, args.duration_s,
              chunk_ms, chunk_bytes, Path(args.out), args.serve_arg,
              make_plot=not args.no_plot, baselines=args.baselines,
              load_procs=args.load_procs, max_batch_size=args.max_batch_size,
              saturation_streams=args.saturation_streams, idle_sessions=args.idle_sessions,
              redis_store=args.redis_store, repeats=args.repeats, soak_s=args.soak_s,
              soak_streams=args.soak_streams, connections=args.connections,
              many=args.many, spread=args.spread == "even", packed=args.packed,
              redis_shards=args.redis_shards)
    return 0


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    require_train_extra("training")
    if args.task == "speech":
        return _train_speech(args)
    if args.data_dir is not None:
        raise RnnserveError("--data-dir is for --task speech")
    from rnnserve.training.train import PRESETS, train_text

    cfg = PRESETS["quick" if args.quick else "default"]
    overrides = {k: getattr(args, k) for k in (
        "hidden_size", "num_layers", "embed_size", "dropout", "batch_size", "seq_len", "lr",
        "eval_every", "seed", "sources", "threads") if getattr(args, k) is not None}
    if args.arch is not None:
        overrides["arch"] = args.arch
    if args.resume and (overrides or args.quick):
        raise RnnserveError("--resume continues the saved run; only --steps may change it")
    try:
        cfg = replace(cfg, task=args.task, **overrides)
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


def _train_speech(args: argparse.Namespace) -> int:
    from rnnserve.training.speech_train import PRESETS, train_speech

    for flag in ("seq_len", "sources"):
        if getattr(args, flag) is not None:
            raise RnnserveError(f"--{flag.replace('_', '-')} is for --task text")
    cfg = PRESETS["quick" if args.quick else "default"]
    overrides = {k: getattr(args, k) for k in (
        "hidden_size", "num_layers", "embed_size", "dropout", "batch_size", "lr",
        "eval_every", "seed", "threads") if getattr(args, k) is not None}
    if args.arch is not None:
        overrides["arch"] = args.arch
    if args.resume and (overrides or args.quick):
        raise RnnserveError("--resume continues the saved run; only --steps may change it")
    try:
        cfg = replace(cfg, **overrides)
        cfg.model_config()
    except ValueError as exc:
        raise RnnserveError(str(exc)) from exc
    result = train_speech(cfg, args.out, resume=args.resume, steps=args.steps,
                          overwrite=args.overwrite, progress=not args.no_progress,
                          cache_dir=args.data_dir, log=_log)
    by_label = ", ".join(f"{k} {v:.0%}" for k, v in result["val_accuracy_by_label"].items())
    print(f"held-out voices: accuracy {result['val_accuracy']:.2%} on {result['val_clips']} "
          f"clips ({result['val_false_alarms']} false alarms, {result['val_missed_keywords']} "
          f"missed keywords; by label: {by_label}); {result['steps']} steps, "
          f"{result['total_seconds']:.0f}s in all; checkpoints in {args.out}")
    best = result["best"]
    if best["step"] != result["steps"]:
        print(f"best.pt is the evaluation at step {best['step']}: held-out accuracy "
              f"{best['val_accuracy']:.2%}")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    require_train_extra("init")
    from rnnserve.training.checkpoint import new_model_checkpoint, save_checkpoint
    from rnnserve.training.model import ModelConfig

    if args.input_kind == "pcm16":
        from rnnserve.audio import FRONT_END
        from rnnserve.training.speech_data import LABELS
        from rnnserve.training.speech_train import new_speech_checkpoint

        cfg = ModelConfig(arch=args.arch, input_kind="features", input_size=FRONT_END.n_mels,
                          output_size=args.outputs or len(LABELS), hidden_size=args.hidden_size,
                          num_layers=args.num_layers, embed_size=args.embed_size)
        ckpt = new_speech_checkpoint(cfg, seed=args.seed)
        try:
            save_checkpoint(args.out, ckpt)
        except OSError as exc:
            raise RnnserveError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
        print(f"wrote untrained {args.arch} speech checkpoint {args.out}")
        return 0
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

    own = {"--input-kind": args.input_kind, "--feature-size": args.feature_size,
           "--labels": args.labels, "--meaning": args.meaning}
    if args.module is None:
        given = [flag for flag, value in own.items() if value is not None]
        if given:
            raise RnnserveError(f"{', '.join(given)} only with --module (a checkpoint of "
                                "rnnserve train describes itself)")
        mv = export_checkpoint(args.checkpoint, args.repo, args.name, args.model_version,
                               overwrite=args.overwrite, tolerance=args.tolerance,
                               fp16=args.fp16, log=_log)
    else:
        from pathlib import Path

        from rnnserve.export.module_export import export_module, load_module
        from rnnserve.training.checkpoint import file_sha256

        module = load_module(args.module, args.checkpoint)
        weights = Path(args.checkpoint)
        provenance = {"module_spec": args.module, "weights": str(weights.resolve()),
                      "weights_sha256": file_sha256(weights)}
        mv = export_module(module, args.repo, args.name, args.model_version,
                           provenance=provenance,
                           input_kind=args.input_kind or "features",
                           feature_size=args.feature_size,
                           labels=args.labels.split(",") if args.labels else None,
                           meaning=args.meaning or "", overwrite=args.overwrite,
                           tolerance=args.tolerance, fp16=args.fp16, log=_log)
    print(f"exported {mv.name} version {mv.version}: {mv.path}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnserve.export import repository
    from rnnserve.export.verify import verify_file

    mv = repository.resolve(args.model)
    checkpoint, model = args.checkpoint, None
    if args.module:
        if checkpoint is None:
            raise UsageError("--module needs --checkpoint WEIGHTS (the module's state dict)")
        model = _module_reference(mv.path, args.module, checkpoint)
        checkpoint = None
    elif checkpoint is None:
        checkpoint = _recorded_checkpoint(mv.path)
    elif not Path(checkpoint).is_file():
        raise RnnserveError(f"checkpoint {checkpoint!r} not found")
    report = verify_file(mv.path, model=model, checkpoint=checkpoint,
                         tolerance=args.tolerance, seed=args.seed, n_cases=args.cases,
                         write=not args.no_write, log=_log)
    report.raise_if_failed()
    print(f"verified {mv.path}")
    return 0


def _exported_metadata(model_path: object) -> Any:
    import onnxruntime as ort

    from rnnserve.export.metadata import ModelMetadata

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    return ModelMetadata.from_props(sess.get_modelmeta().custom_metadata_map, str(model_path))


def _module_reference(model_path: object, spec: str, weights: str) -> object:
    """The module ``spec`` with ``weights``, as the export compared with it."""
    require_train_extra("verify --module")
    meta = _exported_metadata(model_path)
    if meta.training.get("source") != "export_module":
        raise UsageError(f"{model_path} was not exported from a module of one's own; "
                         "verify it with --checkpoint alone")
    adapter = _adapted(meta, spec, weights)
    _log(f"comparing with {spec} holding {weights}")
    return adapter


def _adapted(meta: Any, spec: str, weights: str) -> object:
    """The module ``spec`` with ``weights`` in the graph's layout, as export compares."""
    from rnnserve.export.module_export import ModuleAdapter, load_module

    return ModuleAdapter(load_module(spec, weights), lstm=meta.arch == "lstm",
                         byte_input=meta.input.kind == "utf8_bytes")


def _recorded_checkpoint(model_path: object) -> str | None:
    """The checkpoint the export compared with, when it is still there unchanged and
    torch is here; None otherwise. A model of one's own is never
    rebuilt from what its file names (that would import and call code a model file
    chose): verify says how to name the module with ``--module``."""
    from pathlib import Path

    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    meta = _exported_metadata(model_path)
    from rnnserve.training.checkpoint import file_sha256

    if meta.training.get("source") == "export_module":
        # a model file names its module, but verify imports code only when told to
        from rnnserve.export.module_export import verify_module_hint

        _log(f"not comparing with torch: {verify_module_hint(model_path, meta.export)}")
        return None
    path = meta.export.get("checkpoint")
    if not path or not Path(path).is_file() or \
            file_sha256(path) != meta.export.get("checkpoint_sha256"):
        return None
    _log(f"comparing with the checkpoint recorded at export: {path}")
    return path


def _cmd_say(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rnnserve.audio import FRONT_END, write_wav
    from rnnserve.training.speech_data import synthesize_sentence

    if not args.text.strip():
        raise RnnserveError("nothing to say: the text is empty")
    pcm = synthesize_sentence(args.text, args.voice, args.speed, args.pitch)
    try:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_wav(args.out, pcm, FRONT_END.sample_rate)
    except OSError as exc:
        raise RnnserveError(f"cannot write {args.out!r}: {exc.strerror or exc}") from exc
    print(f"wrote {args.out}: {len(pcm) / FRONT_END.sample_rate:.2f}s at "
          f"{FRONT_END.sample_rate} Hz")
    return 0


def _cmd_reshard(args: argparse.Namespace) -> int:
    from rnnserve.server.reshard import reshard

    def urls(v: str) -> list[str]:
        return [u.strip() for u in v.split(",") if u.strip()]

    def log(line: str) -> None:
        print(line, flush=True)

    if args.online:
        from rnnserve.server.reshard import reshard_online

        if args.dry_run or args.ignore_leases:
            raise UsageError("--online moves sessions as the servers run: it has no "
                             "--dry-run, and waits for leases rather than ignoring them")
        reshard_online(urls(args.old), urls(args.new), prefix=args.prefix,
                       wait_s=args.wait_s, log=log)
        return 0
    reshard(urls(args.old), urls(args.new), prefix=args.prefix, dry_run=args.dry_run,
            ignore_leases=args.ignore_leases, log=log)
    return 0


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
