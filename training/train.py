"""Training loop for the byte-level text model.

Truncated back-propagation on random windows of the training split, AdamW with a
linear warm-up and cosine decay, gradient clipping. Validation measures what a
streaming server sees: the validation text is cut into a few long contiguous
shards, each read window by window with the recurrent state carried forward, and
the result is reported in bits per byte beside the unigram entropy of that text.

Runs are seeded and resumable: ``last.pt`` holds the optimizer and both random
generators, so an interrupted run resumed with ``resume=True`` ends with the
same weights as one that was never interrupted.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from rnnserve.errors import CheckpointError, UsageError
from rnnserve.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from rnnserve.training.data import (
    DEFAULT_SOURCES,
    TextCorpus,
    bits_per_byte,
    load_text_corpus,
    unigram_entropy_bits,
)
from rnnserve.training.model import ModelConfig, RecurrentModel, count_parameters

LAST = "last.pt"
BEST = "best.pt"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved in its checkpoints."""

    task: str = "text"
    arch: str = "gru"
    hidden_size: int = 512
    num_layers: int = 2
    embed_size: int = 64
    dropout: float = 0.3
    batch_size: int = 32
    seq_len: int = 64
    steps: int = 3000
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decay ends at lr * min_lr_ratio
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 500
    eval_shards: int = 16  # contiguous validation streams evaluated side by side
    seed: int = 1234
    val_percent: int = 10
    sources: tuple[str, ...] = DEFAULT_SOURCES
    threads: int = 0  # torch intra-op threads; 0 = all cores

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            arch=self.arch,
            input_kind="bytes",
            input_size=256,
            output_size=256,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            embed_size=self.embed_size,
            dropout=self.dropout,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sources"] = list(self.sources)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "sources" in kwargs:
            kwargs["sources"] = tuple(kwargs["sources"])
        return cls(**kwargs)


# Presets. "quick": under 3 minutes on a 2-core machine, for demos and smoke runs.
# "default": the text-small reference workload (GRU 2 x 512), under 30 minutes there.
PRESETS: dict[str, TrainConfig] = {
    "default": TrainConfig(),
    "quick": TrainConfig(
        hidden_size=256, dropout=0.0, steps=1200, lr=5e-3, warmup_steps=30, eval_every=400
    ),
}


class Schedule(Protocol):
    """What ``lr_at`` reads: the text and the speech training configs both have it."""

    @property
    def lr(self) -> float: ...
    @property
    def warmup_steps(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def min_lr_ratio(self) -> float: ...


def lr_at(cfg: Schedule, step: int) -> float:
    """Linear warm-up, then cosine decay to ``lr * min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


@torch.no_grad()
def evaluate_bits_per_byte(
    model: RecurrentModel, data: np.ndarray, shards: int = 16, window: int = 256
) -> float:
    """Mean bits per byte predicting ``data[1:]`` from the bytes before, state carried.

    The text is cut into ``shards`` contiguous streams read side by side, each
    window by window with its recurrent state carried, as a streaming server runs.
    """
    was_training = model.training
    model.eval()
    shards = max(1, min(shards, (data.size - 1) // 2))
    per = (data.size - 1) // shards
    if per < 1:
        raise UsageError("validation text is too short to evaluate")
    x_all = torch.from_numpy(data[: per * shards].reshape(shards, per).copy())  # (S, N)
    y_all = torch.from_numpy(data[1 : per * shards + 1].reshape(shards, per).copy())  # (S, N)
    state = None
    total = 0.0
    for start in range(0, per, window):
        x = x_all[:, start : start + window]  # (S, W)
        y = y_all[:, start : start + window].long()  # (S, W)
        logits, state = model(x, state)  # (S, W, 256)
        total += F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1), reduction="sum").item()
    model.train(was_training)
    return bits_per_byte(total / (per * shards))


class _Progress:
    """A tqdm bar on stderr when tqdm is there and enabled; plain lines otherwise."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        self.enabled = enabled
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, initial=initial, unit="step", file=sys.stderr,
                                mininterval=1.0, dynamic_ncols=True, desc="train")
            except ImportError:
                self.bar = None

    def update(self, n: int, **postfix: str) -> None:
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(postfix, refresh=False)

    def write(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _StopAfterStep:
    """Ctrl-C (SIGINT) ends the run at the next step boundary, not inside a step.

    Saved in the middle of a step, ``last.pt`` would hold random generators that had
    drawn the step's batch and dropout, or half-updated weights, against a step
    counter that had not moved: the resumed run would differ from an uninterrupted
    one. The first Ctrl-C is noted and the loop stops once the step (and its
    evaluation) is done; a second one stops at once without saving. Only the main
    thread can catch signals; elsewhere, and where SIGINT is ignored, nothing changes.
    """

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupted: stopping after this step (Ctrl-C again: stop now, no save)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> _StopAfterStep:
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if old is not signal.SIG_IGN:
                self._old = signal.signal(signal.SIGINT, self._handler)
                self._installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)
            self._installed = False


def train_text(
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    steps: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    corpus: TextCorpus | None = None,
    on_eval: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train a byte-level language model; return the final metrics.

    Writes ``last.pt`` (resumable state) at every evaluation and at the end, and
    ``best.pt`` whenever validation improves. With ``resume``, the run continues from
    ``last.pt`` under its saved config (``cfg`` is ignored) and ``steps`` may extend it.
    ``corpus`` lets tests pass a small one.
    """
    if steps is not None and not resume:
        cfg = replace(cfg, steps=steps)
    if cfg.task != "text":
        raise UsageError(f"task {cfg.task!r} is not trained here; 'text' is")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    last_path = out / LAST
    start_step = 0
    best = math.inf
    ckpt: dict[str, Any] | None = None
    if resume:
        ckpt = load_checkpoint(last_path)
        if "train_config" not in ckpt or "optimizer_state" not in ckpt:
            raise CheckpointError(f"{str(last_path)!r} holds no training state to resume")
        cfg = TrainConfig.from_dict(ckpt["train_config"])
        if steps is not None:
            cfg = replace(cfg, steps=steps)
        start_step = int(ckpt["step"])
        best = float(ckpt["metrics"].get("best_val_bits_per_byte", math.inf))
    elif last_path.exists() and not overwrite:
        raise UsageError(
            f"{str(out)!r} already holds a checkpoint; pass --resume to continue it "
            "or --overwrite to start again"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"cannot write checkpoints to {str(out)!r}: {exc.strerror}") from exc

    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if corpus is None:
        corpus = load_text_corpus(cfg.sources, cfg.val_percent)
    entropy = unigram_entropy_bits(corpus.val)
    model = RecurrentModel(cfg.model_config())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                            weight_decay=cfg.weight_decay)
    if ckpt is not None:
        if ckpt.get("data", {}).get("sha256") != corpus.sha256:
            raise CheckpointError(
                "the text corpus differs from the one this run started on "
                "(another Python version?); start a new run instead of resuming"
            )
        model = model_from_checkpoint(ckpt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99),
                                weight_decay=cfg.weight_decay)
        opt.load_state_dict(ckpt["optimizer_state"])
        gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    model.train()

    train_data = torch.from_numpy(corpus.train.copy())  # (N,) uint8
    window = torch.arange(cfg.seq_len + 1)  # (T+1,)
    # a window is T + 1 bytes (inputs and their next bytes): it may start anywhere up to
    # numel - (T + 1), so that the text's last byte is a target too
    n_start = train_data.numel() - cfg.seq_len
    if n_start < 1:
        raise UsageError(f"training text ({train_data.numel()} bytes) is shorter than "
                         f"seq_len + 1 ({cfg.seq_len + 1})")
    info = {
        "parameters": count_parameters(model),
        "corpus": corpus.describe(),
        "unigram_entropy_bits": entropy,
    }
    if overwrite and not resume:  # none of the old run's files may pass for this one's
        for name in (LAST, BEST):
            (out / name).unlink(missing_ok=True)
    bar = _Progress(cfg.steps, start_step, progress)
    bar.write(
        f"{cfg.arch.upper()} {cfg.num_layers}x{cfg.hidden_size}, {info['parameters']:,} "
        f"parameters; {corpus.train.size:,} training bytes, {corpus.val.size:,} validation "
        f"bytes (unigram entropy {entropy:.2f} bits/byte); steps {start_step}->{cfg.steps}"
    )
    started = time.perf_counter()
    elapsed_before = float(ckpt["metrics"].get("train_seconds", 0.0)) if ckpt else 0.0
    loss_ema: float | None = None
    val_bpb = float(ckpt["metrics"].get("val_bits_per_byte", math.nan)) if ckpt else math.nan
    step = start_step
    val_step = int(ckpt["metrics"].get("val_step", start_step)) if ckpt else 0

    def snapshot() -> dict[str, Any]:
        return {
            "task": "text",
            "model_config": model.config.to_dict(),
            "train_config": cfg.to_dict(),
            "model_state": model.state_dict(),
            "optimizer_state": opt.state_dict(),
            "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
            "step": step,
            "data": corpus.describe(),
            "metrics": {
                "val_bits_per_byte": val_bpb,
                "val_step": val_step,
                "best_val_bits_per_byte": best,
                "unigram_entropy_bits": entropy,
                "train_loss_bits_per_byte": bits_per_byte(loss_ema) if loss_ema else math.nan,
                "train_seconds": elapsed_before + time.perf_counter() - started,
                "torch": str(torch.__version__),
            },
        }

    stop = _StopAfterStep()
    try:
        with stop:
            while step < cfg.steps:
                if stop.requested:
                    save_checkpoint(out / LAST, snapshot())
                    raise KeyboardInterrupt
                lr = lr_at(cfg, step)
                for group in opt.param_groups:
                    group["lr"] = lr
                starts = torch.randint(0, n_start, (cfg.batch_size,), generator=gen)  # (B,)
                batch = train_data[starts[:, None] + window]  # (B, T+1)
                x, y = batch[:, :-1], batch[:, 1:].long()  # (B, T) each
                logits, _ = model(x)  # (B, T, 256)
                loss = F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                value = loss.item()
                loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
                seconds = time.perf_counter() - started
                rate = (step - start_step) * cfg.batch_size * cfg.seq_len / max(seconds, 1e-9)
                bar.update(1, loss=f"{bits_per_byte(loss_ema):.3f} bpb",
                           speed=f"{rate / 1e3:.0f} kB/s", lr=f"{lr:.1e}")
                final = step == cfg.steps
                if final or step % cfg.eval_every == 0:
                    val_bpb = evaluate_bits_per_byte(model, corpus.val, cfg.eval_shards)
                    val_step = step
                    improved = val_bpb < best
                    best = min(best, val_bpb)
                    bar.write(f"step {step}: validation {val_bpb:.3f} bits/byte "
                              f"(unigram entropy {entropy:.2f})")
                    payload = snapshot()
                    save_checkpoint(out / LAST, payload)
                    if improved:
                        save_checkpoint(out / BEST, payload)
                    if on_eval is not None:
                        on_eval(step, val_bpb)
    except KeyboardInterrupt:  # saved above when it was a first Ctrl-C
        bar.close()
        raise
    bar.close()
    result = snapshot()["metrics"]
    result.update(info)
    result["steps"] = step
    return result
