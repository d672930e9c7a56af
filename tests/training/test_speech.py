"""Speech: the audio helpers, the log-mel front end, the decision rule, the data set."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from rnnserve.audio import (
    FRONT_END,
    FrontEnd,
    log_mel,
    mel_filterbank,
    read_wav,
    resample,
    write_wav,
)
from rnnserve.errors import DataError
from rnnserve.export.verify import probe_signal as make_signal
from rnnserve.kws import (
    SMOOTH_GRID,
    THRESHOLD_GRID,
    DecisionRule,
    StreamingDetector,
    calibrate,
    classify,
    classify_many,
)
from rnnserve.training.checkpoint import load_checkpoint
from rnnserve.training.speech_data import (
    KEYWORDS,
    LABELS,
    SpeechDataConfig,
    SpeechSplit,
    load_speech_data,
    split_variants,
    synthesize,
)
from rnnserve.training.speech_model import LogMelFrontEnd, speech_model_from_checkpoint
from rnnserve.training.speech_train import (
    IGNORE,
    PRESETS,
    TRANSITION,
    frame_targets,
    train_speech,
)

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (scripts/system-deps)")

TINY_DATA = SpeechDataConfig(train_per_keyword=3, train_unknown=12, train_silence=4,
                             train_pairs=6, val_per_keyword=1, val_unknown=4, val_silence=2)


def sine(freq: float, seconds: float = 0.5, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return np.round(amp * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def test_every_mel_band_sees_some_bins_and_bands_rise_in_frequency() -> None:
    w = mel_filterbank()
    assert w.shape == (FRONT_END.n_bins, 80)
    assert (w.sum(axis=0) > 0).all()
    centers = (w * np.arange(FRONT_END.n_bins)[:, None]).sum(0) / w.sum(0)
    assert (np.diff(centers) > 0).all()


@pytest.mark.parametrize("freq", [300.0, 1000.0, 4000.0])
def test_log_mel_of_a_sine_peaks_in_the_band_of_its_frequency(freq: float) -> None:
    feats = log_mel(sine(freq))
    assert feats.shape == (50, 80)
    w = mel_filterbank()
    bin_of = int(round(freq * FRONT_END.n_fft / FRONT_END.sample_rate))
    assert w[bin_of].argmax() == feats[10:].mean(0).argmax()


def test_log_mel_refuses_a_length_that_is_not_whole_hops() -> None:
    with pytest.raises(DataError, match="multiple of the hop"):
        log_mel(np.zeros(161, dtype=np.int16))


def test_resample_keeps_a_tone_and_the_duration() -> None:
    rate = 22050
    t = np.arange(rate) / rate
    y = resample(np.sin(2 * np.pi * 440 * t), rate, 16000)
    assert len(y) == 16000
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(int(spectrum.argmax()) - 440) <= 1


def test_wav_round_trip_stereo_mixdown_and_resampling(tmp_path) -> None:
    x = sine(500.0, 0.25)
    write_wav(tmp_path / "a.wav", x, 16000)
    y, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and np.array_equal(x, y)
    import wave

    with wave.open(str(tmp_path / "s.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.stack([x[:2000], x[:2000]], axis=1).astype("<i2").tobytes())
    z, rate = read_wav(tmp_path / "s.wav", rate=16000)
    assert rate == 16000 and len(z) == 4000
    with pytest.raises(DataError, match="cannot read"):
        read_wav(b"not a wav file")
    with pytest.raises(DataError, match="not found"):
        read_wav(tmp_path / "missing.wav")


def test_front_end_matches_the_offline_reference_and_streams() -> None:
    x = make_signal(16000, 160)
    fe = LogMelFrontEnd(FRONT_END)
    with torch.no_grad():
        whole, _ = fe(torch.from_numpy(x)[None], fe.initial_state(1))
        state, parts = fe.initial_state(1), []
        for a in range(0, len(x), 480):  # 30 ms chunks
            y, state = fe(torch.from_numpy(x[a:a + 480])[None], state)
            parts.append(y)
    assert np.abs(whole[0].numpy() - log_mel(x)).max() < 1e-3
    # torch's matmul blocking may differ with the number of frames: float32 rounding only
    assert (torch.cat(parts, dim=1) - whole).abs().max() < 1e-4
    assert torch.equal(state, torch.from_numpy(x[-240:] / 32768.0).float()[None])


def test_front_end_with_other_window_and_hop() -> None:
    fe_cfg = FrontEnd(win_samples=480, hop_samples=320)  # blocks of 160 samples
    fe = LogMelFrontEnd(fe_cfg)
    x = make_signal(16000, 320)
    with torch.no_grad():
        y, _ = fe(torch.from_numpy(x)[None], fe.initial_state(1))
    assert np.abs(y[0].numpy() - log_mel(x, fe_cfg)).max() < 1e-3


def posteriors_with_word(label: int, at: int, frames: int = 100, length: int = 20) -> np.ndarray:
    p = np.full((frames, len(LABELS)), 0.01)
    p[:, 0] = 0.9
    p[at:at + length, 0] = 0.05
    p[at:at + length, label] = 0.9
    return p / p.sum(1, keepdims=True)


def test_decision_rule_fires_once_per_word_with_its_time() -> None:
    rule = DecisionRule(smooth_frames=4, threshold=0.6, refractory_frames=10)
    p = posteriors_with_word(LABELS.index("stop"), 30)
    found = StreamingDetector(LABELS, rule).push(p)
    assert [d.label for d in found] == ["stop"]
    assert 30 <= found[0].frame <= 34
    assert found[0].seconds(0.01) == pytest.approx((found[0].frame + 1) * 0.01)
    # the same word again after it ended fires again; while it lasts, it does not
    two = np.concatenate([p[:60], posteriors_with_word(LABELS.index("stop"), 10)])
    assert [d.label for d in StreamingDetector(LABELS, rule).push(two)] == ["stop", "stop"]


@pytest.mark.parametrize("chunk", [1, 2, 4, 7, 10, 100])
def test_decision_rule_gives_the_same_detections_in_any_chunking(chunk: int) -> None:
    rng = np.random.default_rng(chunk)
    p = 0.5 * rng.dirichlet(np.full(len(LABELS), 0.3), size=300)
    p[:, 0] += 0.5
    for at in range(10, 290, 40):  # a word every 400 ms, some of them back to back
        p[at:at + int(rng.integers(8, 30)), int(rng.integers(1, len(LABELS)))] += 1.0
    p /= p.sum(1, keepdims=True)
    rule = DecisionRule(smooth_frames=5, threshold=0.4, refractory_frames=7)
    whole = StreamingDetector(LABELS, rule).push(p)
    det = StreamingDetector(LABELS, rule)
    parts = [d for a in range(0, 300, chunk) for d in det.push(p[a:a + chunk])]
    assert len(whole) >= 5
    assert [(d.frame, d.label) for d in parts] == [(d.frame, d.label) for d in whole]
    assert [d.score for d in parts] == pytest.approx([d.score for d in whole], abs=1e-12)


def test_classify_is_silence_when_nothing_fires() -> None:
    p = np.zeros((50, len(LABELS)))
    p[:, 0] = 1.0
    assert classify(p, LABELS, DecisionRule()) == 0
    assert classify(posteriors_with_word(5, 20), LABELS, DecisionRule()) == 5


def test_classify_many_is_the_streaming_rule_vectorised() -> None:
    rng = np.random.default_rng(0)
    clips = rng.dirichlet(np.full(len(LABELS), 0.2), size=(200, 60))
    clips[:50, :, 0] += 3.0  # some clips where nothing fires
    clips /= clips.sum(-1, keepdims=True)
    for rule in (DecisionRule(1, 0.5, 5), DecisionRule(4, 0.4, 30), DecisionRule(12, 0.3, 30)):
        one_by_one = [classify(c, LABELS, rule) for c in clips]
        assert classify_many(clips, rule).tolist() == one_by_one
        assert 0 in one_by_one and len(set(one_by_one)) > 3


def test_calibrate_picks_the_rule_that_classifies_best() -> None:
    # words whose posterior reaches only 0.65: a threshold of 0.7 or more misses them all
    labels = np.tile(np.arange(2, 14), 2)
    clips = np.stack([posteriors_with_word(c, 30) for c in labels])
    for clip, c in zip(clips, labels, strict=True):
        clip[30:50] = 0.05 / 13
        clip[30:50, 0] = 0.3
        clip[30:50, c] = 0.65
    rule, acc = calibrate(clips, labels)
    assert acc == 1.0 and rule.threshold <= 0.6
    assert (classify_many(clips, DecisionRule(8, 0.7, 30)) == 0).all()


def test_frame_targets_follow_the_word_end() -> None:
    split = SpeechSplit(audio=np.zeros((2, 19200), np.int16), label=np.array([4, 0]),
                        onset=np.array([3200, -1]), offset=np.array([8000, -1]))
    y = frame_targets(split, 120, before=8, after=25)
    end = 8000 // 160 - 1
    assert (y[1] == 0).all()
    assert (y[0, end - 8:end + 26] == 4).all()
    assert (y[0, end - 8 - TRANSITION:end - 8] == IGNORE).all()
    assert (y[0, :end - 8 - TRANSITION] == 0).all() and (y[0, end + 26:] == 0).all()


def test_validation_voices_are_never_heard_in_training() -> None:
    train, val = split_variants(20)
    assert not set(train) & set(val)
    assert 10 <= len(val) <= 30 and len(train) >= 60


@needs_espeak
def test_synthesize_a_word_at_16k_with_silence_trimmed(tmp_path) -> None:
    x = synthesize("stop", "en-us+m3", 160, 50, str(tmp_path))
    assert 0.15 < len(x) / 16000 < 0.9
    assert np.abs(x[:160]).max() > 1e-3  # no leading silence left


@needs_espeak
def test_data_set_is_deterministic_and_cached(tmp_path) -> None:
    a = load_speech_data(TINY_DATA, tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("kws-*.npz"))) == 1
    b = load_speech_data(TINY_DATA, tmp_path / "cache")  # from the cache
    c = load_speech_data(TINY_DATA, tmp_path / "other")  # synthesized again
    for split in ("train", "val"):
        sa, sb, sc = (getattr(d, split) for d in (a, b, c))
        assert np.array_equal(sa.audio, sb.audio) and np.array_equal(sa.audio, sc.audio)
        assert np.array_equal(sa.label, sc.label) and sa.voice == sc.voice
    assert len(a.train) == 3 * len(KEYWORDS) + 12 + 4 + 6 and a.train.single.sum() == 52
    pairs = ~a.train.single
    assert (a.train.label[pairs] >= 1).all()  # two-word clips end with a word
    kept = pairs & (a.train.prev_label >= 0)
    assert kept.any() and (a.train.prev_offset[kept] < a.train.onset[kept]).all()
    assert len(a.val) == len(KEYWORDS) + 4 + 2 and a.val.single.all()
    assert a.train.audio.shape[1] == TINY_DATA.clip_samples
    heard = {v.split("+")[1] for v in a.train.voice if v}
    assert not heard & {v.split("+")[1] for v in a.val.voice if v}
    words = a.train.offset > 0
    assert ((a.train.offset - a.train.onset)[words] > 1000).all()
    other = load_speech_data(replace(TINY_DATA, seed=1), tmp_path / "cache")
    assert not np.array_equal(other.train.audio, a.train.audio)


@needs_espeak
def test_train_speech_writes_a_complete_checkpoint(tmp_path) -> None:
    cfg = replace(PRESETS["quick"], hidden_size=16, embed_size=8, steps=4, batch_size=8,
                  eval_every=2, data=TINY_DATA)
    result = train_speech(cfg, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    assert 0.0 <= result["val_accuracy"] <= 1.0
    assert set(result["val_accuracy_by_label"]) <= set(LABELS)
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    assert ckpt["task"] == "speech" and ckpt["labels"] == list(LABELS)
    rule = DecisionRule.from_dict(ckpt["decision_rule"])  # calibrated on training clips
    assert rule.smooth_frames in SMOOTH_GRID and rule.threshold in THRESHOLD_GRID
    model = speech_model_from_checkpoint(ckpt)
    x = torch.from_numpy(make_signal(16000, 160))[None]
    with torch.no_grad():
        p, state = model(x)
    assert p.shape == (1, x.shape[1] // 160, len(LABELS))
    assert torch.allclose(p.sum(-1), torch.ones(1, p.shape[1]))
    assert [s.shape[1:] for s in state] == [(240,), (1, 16)]  # quick preset: GRU, 1 layer
    resumed = train_speech(cfg, tmp_path / "run", resume=True, steps=6, progress=False,
                           cache_dir=tmp_path / "cache")
    assert resumed["steps"] == 6


@needs_espeak
def test_speech_ctrl_c_mid_step_resumes_bit_exactly(tmp_path) -> None:
    from .test_train import interrupt_at_forward

    data = load_speech_data(TINY_DATA, tmp_path / "cache")
    cfg = replace(PRESETS["quick"], hidden_size=16, embed_size=8, steps=6, batch_size=8,
                  eval_every=100, dropout=0.2, data=TINY_DATA, threads=1)
    train_speech(cfg, tmp_path / "straight", progress=False, data=data)
    with interrupt_at_forward(4), pytest.raises(KeyboardInterrupt):
        train_speech(cfg, tmp_path / "cut", progress=False, data=data)
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] in (3, 4)
    train_speech(cfg, tmp_path / "cut", resume=True, progress=False, data=data)
    a = load_checkpoint(tmp_path / "straight" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "cut" / "last.pt")["model_state"]
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


@needs_espeak
@pytest.mark.parametrize("damage", [b"", b"PK\x03\x04 cut short"])
def test_damaged_cache_is_synthesized_again(tmp_path, damage: bytes) -> None:
    data = load_speech_data(TINY_DATA, tmp_path)
    (path,) = tmp_path.glob("kws-*.npz")
    path.write_bytes(damage)  # an empty file (a crash before it reached the disk), a stub
    lines: list[str] = []
    again = load_speech_data(TINY_DATA, tmp_path, log=lines.append)
    assert any("unreadable" in line for line in lines)
    assert np.array_equal(again.train.audio, data.train.audio)
    assert path.stat().st_size > 1000  # and cached again


def test_front_end_without_overlap_streams() -> None:
    fe_cfg = FrontEnd(win_samples=320, hop_samples=320)  # frames do not overlap: no state
    fe = LogMelFrontEnd(fe_cfg)
    x = torch.from_numpy(make_signal(16000, 320))[None]
    with torch.no_grad():
        whole, _ = fe(x, fe.initial_state(1))
        state, parts = fe.initial_state(1), []
        for a in range(0, x.shape[1], 640):
            y, state = fe(x[:, a:a + 640], state)
            parts.append(y)
    assert state.shape == (1, 0)
    assert (torch.cat(parts, dim=1) - whole).abs().max() < 1e-4


@needs_espeak
def test_resume_refuses_other_speech_data(tmp_path) -> None:
    # e.g. espeak-ng upgraded between the runs: other audio under the same config
    from rnnserve.errors import CheckpointError

    cfg = replace(PRESETS["quick"], hidden_size=8, embed_size=8, steps=2, batch_size=4,
                  eval_every=2, data=TINY_DATA, threads=1)
    train_speech(cfg, tmp_path / "run", progress=False, cache_dir=tmp_path / "cache")
    other = load_speech_data(replace(TINY_DATA, seed=7), tmp_path / "cache")
    with pytest.raises(CheckpointError, match="data"):
        train_speech(cfg, tmp_path / "run", resume=True, steps=4, progress=False, data=other)
