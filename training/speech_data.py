"""Keyword-spotting data synthesized with espeak-ng: command words, other words, silence.

Each clip is ``clip_seconds`` of 16 kHz audio: one spoken word (a keyword or an
"unknown" word) at a random position, or no word at all ("silence"), mixed with
background noise (white, pink, brown or mains hum) at a random signal-to-noise
ratio and level. Words are spoken by espeak-ng voices: an accent (``-v en-us``,
``en-gb-scotland``, ...) combined with a voice variant (``+m3``, ``+klatt2``,
``+Andy``, ...) at a random speed and pitch.

Held-out speakers: the voice *variants* are split by a hash of their name, so the
validation clips are spoken by variants that training never heard (in every
accent). The score therefore measures generalisation to unheard voices, not
memorisation of the training voices.

The data set is a pure function of ``SpeechDataConfig`` (seeded) and the espeak-ng
version; it is cached on disk (``cache_dir``) under a hash of both, so a second
run loads it in a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rnnserve.audio import FRONT_END, read_wav, resample, to_pcm16
from rnnserve.errors import DataError

SILENCE = "_silence_"
UNKNOWN = "_unknown_"
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
            "start", "pause")
UNKNOWN_WORDS = (
    "house", "tree", "bird", "happy", "seven", "water", "music", "table", "window", "orange",
    "yellow", "marvin", "sheila", "learn", "follow", "forward", "visual", "wow", "bed", "nine",
    "three", "zero", "tomorrow", "garden", "paper", "doctor", "number", "river", "silver",
    "morning", "coffee", "people", "little", "market", "simple", "eleven", "paint", "winter",
    "camera", "button",
)
LABELS = (SILENCE, UNKNOWN, *KEYWORDS)  # class index = position; 0 is silence

ACCENTS = ("en-us", "en", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
           "en-029")
# espeak-ng 1.51 voice variants (files in espeak-ng-data/voices/!v), less the whispers
# and "fast" (a test voice); each one is a different synthetic speaker.
VARIANTS = (
    "Alex", "Alicia", "Andrea", "Andy", "Annie", "AnxiousAndy", "Demonic", "Denis", "Diogo",
    "Gene", "Gene2", "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike",
    "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3", "Storm", "Tweaky", "UniRobot",
    "adam", "anika", "anikaRobot", "announcer", "antonio", "aunty", "belinda", "benjamin",
    "boris", "caleb", "croak", "david", "ed", "edward", "edward2", "f1", "f2", "f3", "f4", "f5",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta",
    "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6", "linda", "m1", "m2", "m3", "m4",
    "m5", "m6", "m7", "m8", "marcelo", "max", "michel", "miguel", "norbert", "pablo", "paul",
    "pedro", "quincy", "rob", "robert", "robosoft", "robosoft2", "robosoft3", "robosoft4",
    "robosoft5", "robosoft6", "robosoft7", "robosoft8", "sandro", "shelby", "steph", "steph2",
    "steph3", "travis", "victor", "zac",
)
NOISES = ("white", "pink", "brown", "hum")
CUT = -2  # prev_label of a two-word clip whose first word is mostly cut off
ESPEAK_RATE = 22050


def is_validation_variant(variant: str, val_percent: int) -> bool:
    return zlib.crc32(variant.encode()) % 100 < val_percent


def split_variants(val_percent: int) -> tuple[list[str], list[str]]:
    val = [v for v in VARIANTS if is_validation_variant(v, val_percent)]
    train = [v for v in VARIANTS if v not in val]
    return train, val


@dataclass(frozen=True)
class SpeechDataConfig:
    """What decides the data set; its hash names the cache file."""

    seed: int = 20261125
    clip_seconds: float = 1.2
    train_per_keyword: int = 160
    train_unknown: int = 640
    train_silence: int = 200
    val_per_keyword: int = 40
    val_unknown: int = 160
    val_silence: int = 60
    train_pairs: int = 1000  # clips of two words in a row (made from the single words)
    pair_gap_ms: tuple[int, int] = (20, 250)  # pause between the two words
    val_percent: int = 20  # share of voice variants held out for validation
    speed_wpm: tuple[int, int] = (115, 230)
    pitch: tuple[int, int] = (10, 90)
    snr_db: tuple[float, float] = (5.0, 30.0)
    peak_dbfs: tuple[float, float] = (-30.0, -1.0)  # level of the word
    silence_rms_dbfs: tuple[float, float] = (-75.0, -30.0)  # level of noise-only clips
    words_after: tuple[int, int] = (25, 45)  # frames kept after the word ends (min, max)

    @property
    def clip_samples(self) -> int:
        hop = FRONT_END.hop_samples
        return int(round(self.clip_seconds * FRONT_END.sample_rate / hop)) * hop

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SpeechDataConfig:
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
              if k in cls.__dataclass_fields__}
        return cls(**kw)  # type: ignore[arg-type]


@dataclass
class SpeechSplit:
    """Clips of one split: audio, class index, and where the word is (in samples)."""

    audio: np.ndarray  # (N, clip_samples) int16
    label: np.ndarray  # (N,) int64 index into LABELS
    onset: np.ndarray  # (N,) int64 first sample of the word (-1 for silence)
    offset: np.ndarray  # (N,) int64 one past the last sample of the word (-1 for silence)
    voice: list[str] = field(default_factory=list)  # "accent+variant" per clip ("" silence)
    # two-word clips: the word before the last one (-1 where there is none; ``CUT``
    # where too little of it is left in the clip to label it)
    prev_label: np.ndarray | None = None
    prev_onset: np.ndarray | None = None
    prev_offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("prev_label", "prev_onset", "prev_offset"):
            if getattr(self, name) is None:
                setattr(self, name, np.full(len(self.label), -1, dtype=np.int64))

    @property
    def single(self) -> np.ndarray:
        """Mask of the clips with at most one word (those accuracy is measured on)."""
        assert self.prev_label is not None
        return self.prev_label == -1

    def __len__(self) -> int:
        return len(self.label)


@dataclass
class SpeechData:
    config: SpeechDataConfig
    train: SpeechSplit
    val: SpeechSplit
    espeak_version: str
    train_variants: list[str]
    val_variants: list[str]

    def describe(self) -> dict[str, object]:
        return {
            "source": f"espeak-ng synthesis ({self.espeak_version}), seed {self.config.seed}",
            "train_clips": len(self.train),
            "train_two_word_clips": int((~self.train.single).sum()),
            "val_clips": len(self.val),
            "keywords": list(KEYWORDS),
            "unknown_words": len(UNKNOWN_WORDS),
            "accents": list(ACCENTS),
            "train_variants": len(self.train_variants),
            "val_variants_held_out": self.val_variants,
        }


def espeak_version() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise DataError("espeak-ng is not installed; the speech data set is synthesized with "
                        "it (Debian: apt-get install espeak-ng)")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return " ".join(out.stdout.split()[:4]) or "espeak-ng (unknown version)"


def synthesize(word: str, voice: str, speed: int, pitch: int, workdir: str) -> np.ndarray:
    """One word spoken by espeak-ng, as float samples at 16 kHz with the silence trimmed."""
    fd, path = tempfile.mkstemp(dir=workdir, suffix=".wav")
    os.close(fd)
    try:
        proc = subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise DataError(f"espeak-ng failed for voice {voice!r}: {proc.stderr.strip()}")
        pcm, rate = read_wav(path)
    finally:
        os.unlink(path)
    x = resample(pcm / 32768.0, rate, FRONT_END.sample_rate)
    return trim(x)


def trim(x: np.ndarray, frame: int = 160, rel_db: float = -40.0) -> np.ndarray:
    """Cut leading and trailing stretches whose 10 ms energy is 40 dB below the peak frame."""
    if len(x) < frame:
        return x
    n = len(x) // frame
    energy = (x[: n * frame].reshape(n, frame) ** 2).mean(axis=1)
    if energy.max() <= 0:
        return x[:0]
    loud = np.nonzero(energy >= energy.max() * 10 ** (rel_db / 10))[0]
    return x[loud[0] * frame: (loud[-1] + 1) * frame]


def noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS background noise of one kind."""
    if kind == "white":
        y = rng.standard_normal(n)
    elif kind in ("pink", "brown"):
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.arange(len(spec), dtype=np.float64)
        f[0] = 1.0
        spec /= np.sqrt(f) if kind == "pink" else f
        spec[0] = 0.0
        y = np.fft.irfft(spec, n=n)
    elif kind == "hum":
        t = np.arange(n) / FRONT_END.sample_rate
        base = rng.choice([50.0, 60.0])
        y = sum(rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * base * k * t + rng.uniform(0, 6.3))
                for k in range(1, 6)) + 0.1 * rng.standard_normal(n)
    else:
        raise DataError(f"unknown noise {kind!r}")
    return y / max(float(np.sqrt(np.mean(y**2))), 1e-12)


def _db(x: float) -> float:
    return 10 ** (x / 20)


@dataclass(frozen=True)
class _Item:
    label: int
    word: str
    voice: str
    speed: int
    pitch: int


def _plan(cfg: SpeechDataConfig, variants: Sequence[str], per_keyword: int, n_unknown: int,
          n_silence: int, rng: np.random.Generator) -> list[_Item]:
    items: list[_Item] = []

    def voice() -> str:
        return f"{ACCENTS[int(rng.integers(len(ACCENTS)))]}+" \
               f"{variants[int(rng.integers(len(variants)))]}"

    def prosody() -> tuple[int, int]:
        return (int(rng.integers(cfg.speed_wpm[0], cfg.speed_wpm[1] + 1)),
                int(rng.integers(cfg.pitch[0], cfg.pitch[1] + 1)))

    for word in KEYWORDS:
        for _ in range(per_keyword):
            items.append(_Item(LABELS.index(word), word, voice(), *prosody()))
    for i in range(n_unknown):
        word = UNKNOWN_WORDS[i % len(UNKNOWN_WORDS)]
        items.append(_Item(LABELS.index(UNKNOWN), word, voice(), *prosody()))
    items += [_Item(0, "", "", 0, 0) for _ in range(n_silence)]
    return items


def _mix(cfg: SpeechDataConfig, word: np.ndarray | None, rng: np.random.Generator
         ) -> tuple[np.ndarray, int, int]:
    """Place the word in a clip with noise; return (int16 clip, onset, offset)."""
    n = cfg.clip_samples
    hop = FRONT_END.hop_samples
    bg = noise(NOISES[rng.integers(len(NOISES))], n, rng)
    if word is None or len(word) == 0:
        level = _db(rng.uniform(*cfg.silence_rms_dbfs))
        return to_pcm16(bg * level), -1, -1
    after = int(rng.integers(cfg.words_after[0], cfg.words_after[1] + 1)) * hop
    max_len = n - after - hop
    if len(word) > max_len:  # a very slow voice: keep the word's end (it decides)
        word = word[len(word) - max_len:]
    start = int(rng.integers(hop, n - after - len(word) + 1))
    peak = float(np.abs(word).max()) or 1.0
    word = word / peak * _db(rng.uniform(*cfg.peak_dbfs))
    speech_rms = float(np.sqrt(np.mean(word**2)))
    clip = bg * speech_rms / _db(rng.uniform(*cfg.snr_db))
    clip[start:start + len(word)] += word
    return to_pcm16(clip), start, start + len(word)


def _build_split(cfg: SpeechDataConfig, items: list[_Item], rng: np.random.Generator,
                 workdir: str, progress: Callable[[int, int], None] | None,
                 n_pairs: int = 0) -> SpeechSplit:
    words: list[np.ndarray | None] = [None] * len(items)
    todo = [i for i, it in enumerate(items) if it.word]
    done = 0

    def job(i: int) -> None:
        it = items[i]
        words[i] = synthesize(it.word, it.voice, it.speed, it.pitch, workdir)

    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for _ in pool.map(job, todo):
            done += 1
            if progress is not None and done % 1000 == 0:
                progress(done, len(todo))
    n = len(items) + n_pairs
    audio = np.zeros((n, cfg.clip_samples), dtype=np.int16)
    onset = np.full(n, -1, dtype=np.int64)
    offset = np.full(n, -1, dtype=np.int64)
    label = np.zeros(n, dtype=np.int64)
    prev = np.full((3, n), -1, dtype=np.int64)  # label, onset, offset of the first word
    voices = [it.voice for it in items]
    for i in range(len(items)):
        audio[i], onset[i], offset[i] = _mix(cfg, words[i], rng)
        label[i] = items[i].label
    for k in range(len(items), n):  # two words in a row, as in a sentence
        a, b = (int(todo[j]) for j in rng.integers(0, len(todo), size=2))
        gap = int(rng.integers(cfg.pair_gap_ms[0], cfg.pair_gap_ms[1] + 1)) * 16
        wa, wb = words[a], words[b]
        assert wa is not None and wb is not None
        level = float(np.abs(wb).max()) / max(float(np.abs(wa).max()), 1e-9)
        joined = np.concatenate([wa * level * _db(rng.uniform(-4, 4)), np.zeros(gap), wb])
        audio[k], start, offset[k] = _mix(cfg, joined, rng)
        onset[k] = offset[k] - len(wb)
        label[k] = items[b].label
        first_end = int(onset[k]) - gap
        first_start = max(start, first_end - len(wa))  # later when _mix cut the start off
        if first_end - first_start >= 10 * FRONT_END.hop_samples:  # enough of it is left
            prev[:, k] = (items[a].label, first_start, first_end)
        else:
            prev[0, k] = CUT
        voices.append(f"{items[a].voice}|{items[b].voice}")
    return SpeechSplit(audio=audio, label=label, onset=onset, offset=offset, voice=voices,
                       prev_label=prev[0], prev_onset=prev[1], prev_offset=prev[2])


def cache_key(cfg: SpeechDataConfig, version: str) -> str:
    blob = json.dumps({"config": cfg.to_dict(), "espeak": version, "labels": LABELS,
                       "unknown": UNKNOWN_WORDS, "accents": ACCENTS, "variants": VARIANTS,
                       "layout": 2}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rnnserve" / "speech"


def load_speech_data(cfg: SpeechDataConfig, cache_dir: str | Path | None = None,
                     log: Callable[[str], None] | None = None) -> SpeechData:
    """The data set for ``cfg``: from the cache when there, else synthesized and cached."""
    version = espeak_version()
    train_variants, val_variants = split_variants(cfg.val_percent)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"kws-{cache_key(cfg, version)}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                splits = {s: SpeechSplit(audio=z[f"{s}_audio"], label=z[f"{s}_label"],
                                         onset=z[f"{s}_onset"], offset=z[f"{s}_offset"],
                                         voice=[str(v) for v in z[f"{s}_voice"]],
                                         prev_label=z[f"{s}_prev_label"],
                                         prev_onset=z[f"{s}_prev_onset"],
                                         prev_offset=z[f"{s}_prev_offset"])
                          for s in ("train", "val")}
            if log:
                log(f"speech data: loaded {path}")
            return SpeechData(cfg, splits["train"], splits["val"], version, train_variants,
                              val_variants)
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            if log:
                log(f"speech data: cache {path} unreadable ({exc}); synthesizing again")
    rng = np.random.default_rng(cfg.seed)
    splits = {}
    with tempfile.TemporaryDirectory(prefix="rnnserve-espeak-") as workdir:
        for name, variants, counts in (
            ("train", train_variants, (cfg.train_per_keyword, cfg.train_unknown,
                                       cfg.train_silence)),
            ("val", val_variants, (cfg.val_per_keyword, cfg.val_unknown, cfg.val_silence)),
        ):
            items = _plan(cfg, variants, *counts, rng=rng)
            if log:
                log(f"speech data: synthesizing {len(items)} {name} clips with espeak-ng "
                    f"({len(variants)} voice variants x {len(ACCENTS)} accents)")
            prog = (lambda d, t, n=name: log(f"  {n}: {d}/{t} words")) if log else None
            splits[name] = _build_split(cfg, items, rng, workdir, prog,
                                        cfg.train_pairs if name == "train" else 0)
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, prefix=".kws-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            arrays: dict[str, Any] = {
                f"{s}_{k}": (np.array(getattr(sp, k)) if k != "voice"
                             else np.array(sp.voice, dtype=str))
                for s, sp in splits.items()
                for k in ("audio", "label", "onset", "offset", "voice",
                          "prev_label", "prev_onset", "prev_offset")}
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if log:
        log(f"speech data: cached in {path}")
    return SpeechData(cfg, splits["train"], splits["val"], version, train_variants, val_variants)


def synthesize_sentence(text: str, voice: str = "en-us+m3", speed: int = 150,
                        pitch: int = 50) -> np.ndarray:
    """A sentence spoken by espeak-ng as int16 PCM at 16 kHz, padded to whole hops."""
    espeak_version()
    with tempfile.TemporaryDirectory(prefix="rnnserve-espeak-") as workdir:
        x = synthesize(text, voice, speed, pitch, workdir)
    hop = FRONT_END.hop_samples
    pad = 30 * hop + (-len(x)) % hop
    return to_pcm16(np.concatenate([np.zeros(20 * hop), x, np.zeros(pad)]))
