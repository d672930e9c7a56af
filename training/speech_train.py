"""Training loop for the streaming keyword model (``rnnserve train --task speech``).

Features come from the model's own front end (``LogMelFrontEnd``), computed once
per clip; the recurrent part learns per-frame posteriors over silence, unknown
word and the keywords. Frame targets follow the decision rule the model will be
judged by (``rnnserve.kws``): the word's class from a little before the word ends
to ``target_after`` frames after it, silence (nothing to report) elsewhere, no loss
on the few frames where the decision changes.

Validation streams each held-out-voice clip through the model from a zero state
and applies the streaming decision rule; accuracy is the share of clips it
classifies as their keyword, unknown or silence. Runs are seeded and resumable
(``last.pt`` holds the optimizer and the random generators).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rnnserve.audio import FRONT_END
from rnnserve.errors import CheckpointError, UsageError
from rnnserve.kws import DecisionRule, calibrate, classify_many
from rnnserve.training.checkpoint import load_checkpoint, save_checkpoint
from rnnserve.training.model import ModelConfig, count_parameters
from rnnserve.training.speech_data import (
    LABELS,
    SpeechData,
    SpeechDataConfig,
    SpeechSplit,
    load_speech_data,
)
from rnnserve.training.speech_model import LogMelFrontEnd, SpeechModel
from rnnserve.training.train import BEST, LAST, _Progress, _StopAfterStep, lr_at

IGNORE = -100
TRANSITION = 6


@dataclass(frozen=True)
class SpeechTrainConfig:
    task: str = "speech"
    arch: str = "lstm"
    hidden_size: int = 256
    num_layers: int = 2
    embed_size: int = 128
    dropout: float = 0.1
    batch_size: int = 128
    steps: int = 2400
    lr: float = 5e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 400
    seed: int = 1234
    threads: int = 0
    target_before: int = 2  # frames of the word's end that carry its class
    target_after: int = 15  # frames after the word's end that carry its class
    silence_weight: float = 0.3  # loss weight of silence frames (the other labels: 1)
    crop_frames: int = 70  # train on windows this long around the word end (0: whole clips)
    warp: float = 0.0  # frequency warping: mel axis stretched by up to +-warp per clip
    freq_masks: int = 1  # SpecAugment: masked bands of up to ``freq_mask_width`` each
    freq_mask_width: int = 8
    data: SpeechDataConfig = SpeechDataConfig()
    rule: DecisionRule = DecisionRule()  # the rule used when ``calibrate`` is off
    calibrate: bool = True  # pick the rule's smoothing and threshold on training clips

    def model_config(self) -> ModelConfig:
        return ModelConfig(arch=self.arch, input_kind="features", input_size=FRONT_END.n_mels,
                           output_size=len(LABELS), hidden_size=self.hidden_size,
                           num_layers=self.num_layers, embed_size=self.embed_size,
                           dropout=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SpeechTrainConfig:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw["data"] = SpeechDataConfig.from_dict(kw.get("data", {}))
        kw["rule"] = DecisionRule.from_dict(kw["rule"]) if "rule" in kw else DecisionRule()
        return cls(**kw)


# "quick": a GRU, 1 x 256: under 5 minutes on a 2-core machine, synthesis included.
# "default": a GRU, 2 x 256, learning rate 5e-3, 2.5x the steps (about 20 minutes).
# Measured on the same data: quick 96.4%, default 97.3% (best.pt 98.3%); a 1 x 256 GRU
# trained longer did not improve (95.6%), nor did 2.5x the data (95.2%). LSTMs
# (--arch lstm) learn this task more slowly per step; see docs/speech.md.
PRESETS: dict[str, SpeechTrainConfig] = {
    "default": SpeechTrainConfig(arch="gru", hidden_size=256, num_layers=2, embed_size=64,
                                 steps=2500, batch_size=128, lr=5e-3, warmup_steps=30,
                                 eval_every=500),
    "quick": SpeechTrainConfig(arch="gru", hidden_size=256, num_layers=1, embed_size=64,
                               steps=1000, batch_size=128, lr=1e-2, warmup_steps=30,
                               eval_every=250),
}


def augment(x: torch.Tensor, cfg: SpeechTrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Speaker-like variation on normalised log-mel (B, T, M): a random warp of the
    frequency axis per clip (a shorter or longer vocal tract moves the formants) and
    SpecAugment-style band masks."""
    b, _, m = x.shape
    if cfg.warp > 0:
        alpha = 1 + (torch.rand(b, 1, generator=gen) * 2 - 1) * cfg.warp  # (B, 1)
        pos = (torch.arange(m, dtype=x.dtype)[None, :] / alpha).clamp(0, m - 1)  # (B, M)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=m - 1)
        w = (pos - lo.to(x.dtype))[:, None, :]  # (B, 1, M)
        gather = lambda idx: torch.gather(x, 2, idx[:, None, :].expand(-1, x.shape[1], -1))  # noqa: E731
        x = gather(lo) * (1 - w) + gather(hi) * w
    for _ in range(cfg.freq_masks):
        width = torch.randint(0, cfg.freq_mask_width + 1, (b, 1), generator=gen)
        start = (torch.rand(b, 1, generator=gen) * (m - width)).long()
        band = torch.arange(m)[None, :]
        mask = (band >= start) & (band < start + width)  # (B, M)
        x = x.masked_fill(mask[:, None, :], 0.0)
    return x


def crop_starts(ends: torch.Tensor, n_frames: int, cfg: SpeechTrainConfig,
                gen: torch.Generator) -> torch.Tensor:
    """Start frame per clip of a ``crop_frames`` window that ends 0..20 frames after the
    word's target frames (anywhere for silence), so the model sees the whole word,
    its decision and the return to silence, at a fraction of the cost of whole clips."""
    b = len(ends)
    slack = torch.randint(0, 21, (b,), generator=gen)
    anywhere = torch.randint(0, n_frames - cfg.crop_frames + 1, (b,), generator=gen)
    last = torch.where(ends >= 0, ends + cfg.target_after + 1 + slack,
                       anywhere + cfg.crop_frames)
    return (last.clamp(max=n_frames) - cfg.crop_frames).clamp(min=0)


def frame_targets(split: SpeechSplit, n_frames: int, before: int, after: int) -> np.ndarray:
    """(N, T) class per frame: the word's class from ``before`` frames before its end to
    ``after`` frames after it; silence elsewhere, the word's start included (nothing
    may fire before the word can be told apart); no target in the ``TRANSITION``
    frames just before the class starts."""
    hop = FRONT_END.hop_samples
    y = np.zeros((len(split), n_frames), dtype=np.int64)  # silence
    assert split.prev_label is not None and split.prev_offset is not None
    for i in range(len(split)):
        # the first of two words, then the last word (which wins where they overlap)
        for label, offset in ((split.prev_label[i], split.prev_offset[i]),
                              (split.label[i], split.offset[i])):
            if offset < 0:
                continue
            end = -(-int(offset) // hop) - 1  # the frame holding the word's last sample
            lo = max(0, end - before)
            y[i, max(0, lo - TRANSITION):lo] = IGNORE
            y[i, lo:min(n_frames, end + after + 1)] = label
    return y


@torch.no_grad()
def compute_features(frontend: LogMelFrontEnd, audio: np.ndarray, batch: int = 256
                     ) -> torch.Tensor:
    """(N, samples) int16 -> (N, frames, mels) log-mel, each clip from a zero state."""
    out = []
    for a in range(0, len(audio), batch):
        x = torch.from_numpy(audio[a:a + batch])
        feats, _ = frontend(x, frontend.initial_state(len(x)))
        out.append(feats)
    return torch.cat(out)


@torch.no_grad()
def posteriors_of(model: SpeechModel, feats: torch.Tensor, batch: int = 512) -> np.ndarray:
    """(N, T, labels) posteriors of whole clips, each from a zero state."""
    was = model.training
    model.eval()
    out = []
    for a in range(0, len(feats), batch):
        logits, _ = model.rnn(model.normalize(feats[a:a + batch]))
        out.append(torch.softmax(logits, dim=-1).numpy())
    model.train(was)
    return np.concatenate(out)


def evaluate(model: SpeechModel, feats: torch.Tensor, split: SpeechSplit, rule: DecisionRule
             ) -> dict[str, Any]:
    """Clip accuracy under the streaming decision rule, per label too."""
    predicted = classify_many(posteriors_of(model, feats), rule)
    correct = predicted == split.label
    per_label = {LABELS[c]: float(correct[split.label == c].mean())
                 for c in range(len(LABELS)) if (split.label == c).any()}
    keyword = split.label >= 2
    return {
        "val_accuracy": float(correct.mean()),
        "val_accuracy_by_label": per_label,
        "val_false_alarms": int(((predicted >= 2) & ~keyword).sum()),
        "val_missed_keywords": int((keyword & (predicted < 2)).sum()),
        "val_clips": len(split),
    }


def train_speech(
    cfg: SpeechTrainConfig,
    out_dir: str | Path,
    *,
    resume: bool = False,
    steps: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    data: SpeechData | None = None,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the keyword model; write ``last.pt`` / ``best.pt``; return the final metrics."""
    if steps is not None and not resume:
        cfg = replace(cfg, steps=steps)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a directory")
    last_path = out / LAST
    ckpt: dict[str, Any] | None = None
    start_step = 0
    if resume:
        ckpt = load_checkpoint(last_path)
        if ckpt.get("task") != "speech" or "optimizer_state" not in ckpt:
            raise CheckpointError(f"{str(last_path)!r} holds no speech training state to resume")
        cfg = SpeechTrainConfig.from_dict(ckpt["train_config"])
        if steps is not None:
            cfg = replace(cfg, steps=steps)
        start_step = int(ckpt["step"])
    elif last_path.exists() and not overwrite:
        raise UsageError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue "
                         "it or --overwrite to start again")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write checkpoints to {str(out)!r}: {exc.strerror}") from exc

    bar_log = log or (lambda line: None)
    started = time.perf_counter()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    if data is None:
        data = load_speech_data(cfg.data, cache_dir, log=bar_log)
    if ckpt is not None and ckpt.get("data") != data.describe():
        raise CheckpointError(
            "the speech data differs from the one this run started on (another espeak-ng "
            "version?); start a new run instead of resuming"
        )
    frontend = LogMelFrontEnd(FRONT_END)
    train_feats = compute_features(frontend, data.train.audio)  # (N, T, mels)
    val_feats = compute_features(frontend, data.val.audio)
    n_frames = train_feats.shape[1]
    targets = torch.from_numpy(frame_targets(data.train, n_frames, cfg.target_before,
                                             cfg.target_after))
    hop = FRONT_END.hop_samples
    word_end = torch.from_numpy(np.where(data.train.offset >= 0,
                                         -(-data.train.offset // hop) - 1, -1))
    crop = 0 < cfg.crop_frames < n_frames
    mean = train_feats.mean(dim=(0, 1))
    std = train_feats.std(dim=(0, 1)).clamp_min(1e-3)
    model = SpeechModel(cfg.model_config(), FRONT_END, mean, std)
    best = -1.0
    if ckpt is not None:
        model.rnn.load_state_dict(ckpt["model_state"])
        model.mean.copy_(torch.as_tensor(ckpt["feature_mean"]))
        model.std.copy_(torch.as_tensor(ckpt["feature_std"]))
        best = float(ckpt["metrics"].get("best_val_accuracy", -1.0))
    opt = torch.optim.AdamW(model.rnn.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer_state"])
        gen.set_state(ckpt["rng"]["data"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    class_weight = torch.ones(len(LABELS))
    class_weight[0] = cfg.silence_weight
    model.train()
    prep_seconds = time.perf_counter() - started
    params = count_parameters(model.rnn)
    if overwrite and not resume:  # none of the old run's files may pass for this one's
        for name in (LAST, BEST):
            (out / name).unlink(missing_ok=True)
    bar = _Progress(cfg.steps, start_step, progress)
    bar.write(f"{cfg.arch.upper()} {cfg.num_layers}x{cfg.hidden_size}, {params:,} parameters; "
              f"{len(data.train)} training clips, {len(data.val)} validation clips from "
              f"{len(data.val_variants)} held-out voice variants; data ready in "
              f"{prep_seconds:.0f}s; steps {start_step}->{cfg.steps}")
    step = start_step
    elapsed_before = float(ckpt["metrics"].get("train_seconds", 0.0)) if ckpt else 0.0
    metrics: dict[str, Any] = dict(ckpt["metrics"]) if ckpt else {}
    loss_ema: float | None = None
    loop_started = time.perf_counter()
    decision = DecisionRule.from_dict(ckpt["decision_rule"]) if ckpt else cfg.rule
    best_at = {"step": int(ckpt["metrics"].get("best_val_step", 0)) if ckpt else 0,
               "val_accuracy": best}

    def snapshot() -> dict[str, Any]:
        return {
            "task": "speech",
            "model_config": model.config.to_dict(),
            "train_config": cfg.to_dict(),
            "model_state": model.rnn.state_dict(),
            "frontend": asdict(FRONT_END),
            "feature_mean": model.mean.clone(),
            "feature_std": model.std.clone(),
            "labels": list(LABELS),
            "decision_rule": decision.to_dict(),
            "optimizer_state": opt.state_dict(),
            "rng": {"data": gen.get_state(), "torch": torch.get_rng_state()},
            "step": step,
            "data": data.describe(),
            "metrics": {**metrics, "best_val_accuracy": best,
                        "best_val_step": best_at["step"],
                        "train_seconds": elapsed_before + time.perf_counter() - loop_started,
                        "data_seconds": prep_seconds, "torch": str(torch.__version__)},
        }

    stop = _StopAfterStep()
    try:
        with stop:
            while step < cfg.steps:
                if stop.requested:
                    save_checkpoint(last_path, snapshot())
                    raise KeyboardInterrupt
                lr = lr_at(cfg, step)
                for group in opt.param_groups:
                    group["lr"] = lr
                idx = torch.randint(0, len(train_feats), (cfg.batch_size,), generator=gen)
                x, y = train_feats[idx], targets[idx]  # (B, T, mels), (B, T)
                if crop:
                    frames = crop_starts(word_end[idx], n_frames, cfg, gen)[:, None] + torch.arange(
                        cfg.crop_frames)  # (B, crop)
                    x = torch.gather(x, 1, frames[:, :, None].expand(-1, -1, x.shape[2]))
                    y = torch.gather(y, 1, frames)
                x = augment(model.normalize(x), cfg, gen)
                logits, _ = model.rnn(x)  # (B, T, labels)
                loss = F.cross_entropy(logits.reshape(-1, len(LABELS)), y.reshape(-1),
                                       weight=class_weight, ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.rnn.parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                value = loss.item()
                loss_ema = value if loss_ema is None else 0.95 * loss_ema + 0.05 * value
                bar.update(1, loss=f"{loss_ema:.3f}", lr=f"{lr:.1e}")
                if step == cfg.steps or step % cfg.eval_every == 0:
                    if cfg.calibrate:
                        calib = np.nonzero(data.train.single)[0][::2]  # one-word clips
                        rule, train_acc = calibrate(posteriors_of(model, train_feats[calib]),
                                                    data.train.label[calib],
                                                    cfg.rule.refractory_frames)
                    else:
                        rule, train_acc = cfg.rule, math.nan
                    metrics = {**evaluate(model, val_feats, data.val, rule),
                               "val_step": step, "train_loss": loss_ema,
                               "train_accuracy": train_acc}
                    decision = rule
                    improved = metrics["val_accuracy"] > best
                    best = max(best, metrics["val_accuracy"])
                    if improved:
                        best_at = {"step": step, "val_accuracy": best}
                    bar.write(f"step {step}: held-out voices: accuracy "
                              f"{metrics['val_accuracy']:.2%} ({metrics['val_clips']} clips, "
                              f"{metrics['val_false_alarms']} false alarms, "
                              f"{metrics['val_missed_keywords']} missed keywords); training "
                              f"clips {train_acc:.2%}; rule: smooth {rule.smooth_frames} frames, "
                              f"threshold {rule.threshold}")
                    payload = snapshot()
                    save_checkpoint(last_path, payload)
                    if improved:
                        save_checkpoint(out / BEST, payload)
    except KeyboardInterrupt:  # saved above when it was a first Ctrl-C
        bar.close()
        raise
    bar.close()
    result = snapshot()["metrics"]
    result.update({"parameters": params, "steps": step, "best": best_at,
                   "total_seconds": time.perf_counter() - started})
    return result


def new_speech_checkpoint(config: ModelConfig, seed: int = 0) -> dict[str, Any]:
    """An untrained speech model (random weights, identity normalisation) for speed tests."""
    if config.input_kind != "features" or config.input_size != FRONT_END.n_mels:
        raise UsageError(f"a speech model takes {FRONT_END.n_mels} log-mel features")
    torch.manual_seed(seed)
    model = SpeechModel(config, FRONT_END)
    return {
        "task": "speech",
        "model_config": config.to_dict(),
        "model_state": model.rnn.state_dict(),
        "frontend": asdict(FRONT_END),
        "feature_mean": model.mean.clone(),
        "feature_std": model.std.clone(),
        "labels": list(LABELS) if config.output_size == len(LABELS)
        else [f"class{i}" for i in range(config.output_size)],
        "decision_rule": DecisionRule().to_dict(),
        "step": 0,
        "metrics": {},
        "seed": seed,
    }
