from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from rnnserve.errors import UsageError
from rnnserve.training.checkpoint import load_checkpoint
from rnnserve.training.train import BEST, LAST, PRESETS, TrainConfig, train_text

TINY = replace(PRESETS["quick"], hidden_size=32, num_layers=1, embed_size=16, batch_size=16,
               seq_len=32, steps=150, lr=2e-2, warmup_steps=5, eval_every=75,
               eval_shards=4, sources=("pydoc_topics",), threads=1)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_tiny_model_learns_and_writes_checkpoints(tmp_path, small_corpus, arch) -> None:
    evals: list[tuple[int, float]] = []
    result = train_text(replace(TINY, arch=arch), tmp_path, progress=False,
                        corpus=small_corpus, on_eval=lambda s, v: evals.append((s, v)))
    assert [s for s, _ in evals] == [75, 150]
    # better than a model that ignores context
    assert result["val_bits_per_byte"] < result["unigram_entropy_bits"] - 0.3
    ckpt = load_checkpoint(tmp_path / LAST)
    assert ckpt["step"] == 150 and ckpt["model_config"]["arch"] == arch
    assert ckpt["metrics"]["val_step"] == 150
    assert ckpt["metrics"]["val_bits_per_byte"] == evals[-1][1]
    assert (tmp_path / BEST).is_file()
    assert TrainConfig.from_dict(ckpt["train_config"]) == replace(TINY, arch=arch)


def test_a_finished_run_can_be_extended(tmp_path, small_corpus) -> None:
    cfg = replace(TINY, steps=10, eval_every=10)
    train_text(cfg, tmp_path, progress=False, corpus=small_corpus)
    train_text(TINY, tmp_path, progress=False, corpus=small_corpus, resume=True, steps=16)
    ckpt = load_checkpoint(tmp_path / LAST)
    assert ckpt["step"] == 16 and ckpt["train_config"]["steps"] == 16


def test_interrupted_run_resumes_bit_exactly(tmp_path, small_corpus) -> None:
    cfg = replace(TINY, steps=40, eval_every=20, dropout=0.1, num_layers=2)
    train_text(cfg, tmp_path / "straight", progress=False, corpus=small_corpus)

    class Stop(Exception):
        pass

    def stop_at_20(step: int, _: float) -> None:
        if step == 20:
            raise Stop

    with pytest.raises(Stop):
        train_text(cfg, tmp_path / "cut", progress=False, corpus=small_corpus, on_eval=stop_at_20)
    assert load_checkpoint(tmp_path / "cut" / LAST)["step"] == 20
    train_text(cfg, tmp_path / "cut", progress=False, corpus=small_corpus, resume=True)
    a = load_checkpoint(tmp_path / "straight" / LAST)["model_state"]
    b = load_checkpoint(tmp_path / "cut" / LAST)["model_state"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_existing_run_is_not_overwritten_silently(tmp_path, small_corpus) -> None:
    train_text(replace(TINY, steps=2, eval_every=2), tmp_path, progress=False, corpus=small_corpus)
    with pytest.raises(UsageError, match="--resume"):
        train_text(TINY, tmp_path, progress=False, corpus=small_corpus)


def test_val_metric_is_finite_bits_per_byte(tmp_path, small_corpus) -> None:
    r = train_text(replace(TINY, steps=3, eval_every=3), tmp_path, progress=False,
                   corpus=small_corpus)
    assert math.isfinite(r["val_bits_per_byte"]) and 0 < r["val_bits_per_byte"] < 9


@contextlib.contextmanager
def interrupt_at_forward(calls: int) -> Iterator[None]:
    """A real SIGINT raised inside the model's forward pass of a training step: Ctrl-C
    lands mid-step (the data generator and dropout have drawn, no update yet). SIGINT is
    handled as at a terminal meanwhile: a test run started in the background by a script
    (``cmd &``, nohup; CI) inherits it ignored, and training then leaves it so."""
    from rnnserve.training.model import RecurrentModel

    seen = 0

    def hook(module, args, output):  # noqa: ANN001, ANN202
        nonlocal seen
        if isinstance(module, RecurrentModel) and module.training:
            seen += 1
            if seen == calls:
                signal.raise_signal(signal.SIGINT)

    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
        signal.signal(signal.SIGINT, old)


def test_ctrl_c_mid_step_resumes_bit_exactly(tmp_path, small_corpus) -> None:
    cfg = replace(TINY, steps=12, eval_every=100, dropout=0.1, num_layers=2)
    train_text(cfg, tmp_path / "straight", progress=False, corpus=small_corpus)
    with interrupt_at_forward(7):
        with pytest.raises(KeyboardInterrupt):
            train_text(cfg, tmp_path / "cut", progress=False, corpus=small_corpus)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    saved = load_checkpoint(tmp_path / "cut" / LAST)
    assert saved["step"] in (6, 7)
    train_text(cfg, tmp_path / "cut", progress=False, corpus=small_corpus, resume=True)
    a = load_checkpoint(tmp_path / "straight" / LAST)["model_state"]
    b = load_checkpoint(tmp_path / "cut" / LAST)["model_state"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


def test_overwrite_does_not_keep_the_old_runs_files(tmp_path, small_corpus) -> None:
    train_text(replace(TINY, steps=2, eval_every=2), tmp_path, progress=False,
               corpus=small_corpus)
    # the new run stops before its first evaluation
    with interrupt_at_forward(1), pytest.raises(KeyboardInterrupt):
        train_text(replace(TINY, arch="lstm", steps=4, eval_every=4), tmp_path,
                   progress=False, corpus=small_corpus, overwrite=True)
    assert load_checkpoint(tmp_path / LAST)["model_config"]["arch"] == "lstm"
    # best.pt of the GRU run that was overwritten would pass for this run's best
    assert not (tmp_path / BEST).exists()


def test_a_text_of_one_window_trains_and_one_byte_less_is_refused(tmp_path) -> None:
    """A training window is seq_len + 1 bytes (inputs and their next bytes) and may
    start anywhere it fits, the text's last byte included as a target: a text of
    exactly one window trains, a byte less is refused with the length it needs."""
    import numpy as np

    from rnnserve.training.data import TextCorpus

    rng = np.random.default_rng(3)
    val = rng.integers(32, 127, 256, dtype=np.uint8)
    cfg = replace(TINY, steps=2, eval_every=2)
    for size in (cfg.seq_len + 1, cfg.seq_len):
        corpus = TextCorpus(train=rng.integers(32, 127, size, dtype=np.uint8), val=val,
                            sha256=f"test-{size}", sources=("test",), documents=(1, 1))
        out = tmp_path / str(size)
        if size == cfg.seq_len:
            with pytest.raises(UsageError, match=r"shorter than seq_len \+ 1 \(33\)"):
                train_text(cfg, out, progress=False, corpus=corpus)
        else:
            result = train_text(cfg, out, progress=False, corpus=corpus)
            assert math.isfinite(result["val_bits_per_byte"])
