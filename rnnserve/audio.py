"""Audio helpers shared by training, export verification and the client (numpy only).

- WAV files: ``read_wav`` (PCM16 mono or multi-channel, any rate) and ``write_wav``.
- ``resample``: band-limited change of sample rate (FFT method), for the 22.05 kHz
  output of espeak-ng and for client WAV files that are not 16 kHz.
- The log-mel front end, as an offline reference in float64: ``log_mel``. The
  exported speech models compute the same features inside their ONNX graph
  (``rnnserve.training.frontend``); verification compares the two.

Front end definition (``FrontEnd``), the one contract between training, the graph
and this reference:

- 16 kHz mono, samples scaled to [-1, 1) by dividing PCM16 values by 32768;
- frames of 400 samples (25 ms) every 160 samples (10 ms), periodic Hann window,
  512-point DFT, power spectrum;
- 80 triangular mel bands (Slaney's mel scale: linear below 1 kHz, logarithmic
  above) from 0 Hz to 8 kHz, each normalised to unit area;
- features ``ln(mel power + 1e-6)``.

Streaming convention: frame ``i`` of a stream ends at sample ``160 * (i + 1)``; the
stream is preceded by 240 zero samples, so ``N`` samples (a multiple of 160) give
exactly ``N / 160`` frames, and a chunked stream carries the last 240 samples of
the previous chunk (the window overlap) as state.
"""

from __future__ import annotations

import io
import math
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnserve.errors import DataError


@dataclass(frozen=True)
class FrontEnd:
    sample_rate: int = 16000
    win_samples: int = 400  # 25 ms
    hop_samples: int = 160  # 10 ms
    n_fft: int = 512
    n_mels: int = 80
    f_min: float = 0.0
    f_max: float = 8000.0
    log_floor: float = 1e-6

    @property
    def overlap(self) -> int:
        """Samples of the previous chunk a frame still needs: carried as state."""
        return self.win_samples - self.hop_samples

    @property
    def n_bins(self) -> int:
        return self.n_fft // 2 + 1

    def check(self) -> None:
        if not 0 < self.hop_samples <= self.win_samples <= self.n_fft:
            raise DataError(f"front end needs 0 < hop <= window <= n_fft, got {self}")
        if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
            raise DataError(f"mel range {self.f_min}..{self.f_max} Hz outside 0..Nyquist")


FRONT_END = FrontEnd()


def hann(n: int) -> np.ndarray:
    """Periodic Hann window (the DFT-even form used for spectral analysis)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 bands per 200 Hz), logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep
    return np.where(f >= min_log_hz, log, lin)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz, min_log_mel = 1000.0, 1000.0 / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(fe: FrontEnd = FRONT_END) -> np.ndarray:
    """(n_bins, n_mels) float64 weights: power spectrum @ weights = mel band powers."""
    fe.check()
    bin_hz = np.arange(fe.n_bins) * fe.sample_rate / fe.n_fft
    edges = mel_to_hz(np.linspace(hz_to_mel(fe.f_min), hz_to_mel(fe.f_max), fe.n_mels + 2))
    weights = np.zeros((fe.n_bins, fe.n_mels))
    for m in range(fe.n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (bin_hz - lo) / (mid - lo)
        falling = (hi - bin_hz) / (hi - mid)
        weights[:, m] = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))
    return weights


def dft_matrices(fe: FrontEnd = FRONT_END) -> tuple[np.ndarray, np.ndarray]:
    """(n_bins, win) windowed cosine and sine rows: one frame @ rows.T = its DFT."""
    n = np.arange(fe.win_samples)
    k = np.arange(fe.n_bins)[:, None]
    angle = 2.0 * np.pi * k * n / fe.n_fft
    w = hann(fe.win_samples)
    return np.cos(angle) * w, -np.sin(angle) * w


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    return np.asarray(pcm, dtype=np.float64) / 32768.0


def log_mel(pcm: np.ndarray, fe: FrontEnd = FRONT_END) -> np.ndarray:
    """Offline reference: PCM16 samples (N,) with N a multiple of the hop -> (N / hop, n_mels).

    float64 throughout; uses ``numpy.fft.rfft`` (not the DFT matrices of the graph),
    so it is an independent implementation of the same definition.
    """
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise DataError(f"log_mel takes one channel of samples, got shape {pcm.shape}")
    if len(pcm) % fe.hop_samples:
        raise DataError(f"{len(pcm)} samples is not a multiple of the hop ({fe.hop_samples})")
    x = np.concatenate([np.zeros(fe.overlap), pcm_to_float(pcm)])
    n_frames = len(pcm) // fe.hop_samples
    idx = np.arange(fe.win_samples)[None, :] + fe.hop_samples * np.arange(n_frames)[:, None]
    frames = x[idx] * hann(fe.win_samples)  # (T, win)
    spec = np.fft.rfft(frames, n=fe.n_fft, axis=-1)
    power = spec.real**2 + spec.imag**2  # (T, n_bins)
    return np.log(power @ mel_filterbank(fe) + fe.log_floor)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Band-limited resampling of a float signal (FFT method; the signal's ends are quiet)."""
    x = np.asarray(x, dtype=np.float64)
    if rate_in == rate_out or len(x) == 0:
        return x.copy()
    n_out = int(round(len(x) * rate_out / rate_in))
    spec = np.fft.rfft(x)
    n_keep = n_out // 2 + 1
    if len(spec) >= n_keep:
        spec = spec[:n_keep]
    else:
        spec = np.concatenate([spec, np.zeros(n_keep - len(spec), dtype=spec.dtype)])
    return np.fft.irfft(spec, n=n_out) * (n_out / len(x))


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """Float samples in [-1, 1) -> int16, rounded and clipped."""
    return np.clip(np.round(np.asarray(x) * 32768.0), -32768, 32767).astype(np.int16)


def read_wav(source: str | Path | bytes, rate: int | None = None) -> tuple[np.ndarray, int]:
    """PCM16 WAV -> (int16 mono samples, sample rate); channels averaged, resampled to ``rate``."""
    name = "WAV data" if isinstance(source, bytes) else repr(str(source))
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as w:
            width, channels, sr = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except FileNotFoundError:
        raise DataError(f"{name} not found") from None
    except (wave.Error, EOFError, OSError) as exc:
        raise DataError(f"cannot read {name} as a WAV file: {exc}") from None
    if width != 2:
        raise DataError(f"{name} has {8 * width}-bit samples; rnnserve reads 16-bit PCM WAV")
    pcm = np.frombuffer(raw, dtype="<i2").reshape(-1, channels)
    mono = pcm.astype(np.float64).mean(axis=1) / 32768.0 if channels > 1 else None
    if rate is not None and rate != sr:
        mono = resample(mono if mono is not None else pcm[:, 0] / 32768.0, sr, rate)
        return to_pcm16(mono), rate
    return (to_pcm16(mono) if mono is not None else pcm[:, 0].astype(np.int16)), sr


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, dtype="<i2").tobytes())
