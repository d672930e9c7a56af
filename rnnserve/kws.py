"""The streaming decision rule of the keyword models (numpy only; the client uses it).

A speech model emits, every 10 ms frame, posteriors over its labels: silence,
unknown word, and the keywords. The rule turns them into detections as the audio
arrives, with no look-ahead:

1. smoothing: each label's posterior is averaged over the last ``smooth_frames``
   frames (fewer at the start of the stream);
2. threshold: a label other than silence fires when its smoothed posterior reaches
   ``threshold``; when several do in the same frame, the highest fires;
3. refractory: after a detection nothing fires for ``refractory_frames`` frames,
   and the same label fires again only after its smoothed posterior has fallen
   below the threshold (one spoken word, one detection).

"Unknown word" detections are reported like keywords; callers may hide them. A
clip is classified as the label of its first detection, or as silence when
nothing fires: that is how training measures accuracy, so the reported score is
the score of this rule. Training picks ``smooth_frames`` and ``threshold`` from a
small grid by accuracy on training clips (``calibrate``), never on the held-out
voices; the chosen parameters travel in the model's metadata.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DecisionRule:
    smooth_frames: int = 12
    threshold: float = 0.8
    refractory_frames: int = 30

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecisionRule:
        return cls(smooth_frames=int(d["smooth_frames"]), threshold=float(d["threshold"]),
                   refractory_frames=int(d["refractory_frames"]))


@dataclass(frozen=True)
class Detection:
    frame: int  # frame index in the stream (frame i ends at (i + 1) * hop samples)
    label: str
    score: float  # smoothed posterior when it fired

    def seconds(self, frame_seconds: float) -> float:
        """Time of the end of the frame that fired, from the start of the stream."""
        return (self.frame + 1) * frame_seconds


class StreamingDetector:
    """Feed posteriors chunk by chunk; get the detections each chunk completes."""

    def __init__(self, labels: tuple[str, ...] | list[str], rule: DecisionRule,
                 silence: int = 0) -> None:
        self.labels = tuple(labels)
        self.rule = rule
        self.silence = silence
        self._history = np.zeros((0, len(self.labels)))
        self._frame = 0
        self._quiet_until = 0
        self._armed = np.ones(len(self.labels), dtype=bool)

    def push(self, posteriors: np.ndarray) -> list[Detection]:
        p = np.asarray(posteriors, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != len(self.labels):
            raise ValueError(f"posteriors must be (frames, {len(self.labels)}), got {p.shape}")
        w = self.rule.smooth_frames
        keep = len(self._history)
        full = np.concatenate([self._history, p])
        csum = np.concatenate([np.zeros((1, p.shape[1])), np.cumsum(full, axis=0)])
        found: list[Detection] = []
        for i in range(keep, len(full)):
            lo = max(0, i + 1 - w)
            # frames before this stream's history are absent at the start: average what is there
            n = min(w, self._frame + 1)
            smooth = (csum[i + 1] - csum[lo]) / n
            above = smooth >= self.rule.threshold
            above[self.silence] = False
            self._armed |= ~above
            candidates = above & self._armed
            if self._frame >= self._quiet_until and candidates.any():
                c = int(np.argmax(np.where(candidates, smooth, -1.0)))
                found.append(Detection(self._frame, self.labels[c], float(smooth[c])))
                self._armed[c] = False
                self._quiet_until = self._frame + 1 + self.rule.refractory_frames
            self._frame += 1
        self._history = full[max(0, len(full) - (w - 1)):] if w > 1 else full[:0]
        return found


def classify(posteriors: np.ndarray, labels: tuple[str, ...] | list[str], rule: DecisionRule,
             silence: int = 0) -> int:
    """A clip's class: the label index of its first detection, or ``silence``."""
    found = StreamingDetector(labels, rule, silence).push(posteriors)
    return list(labels).index(found[0].label) if found else silence


def smoothed(posteriors: np.ndarray, smooth_frames: int) -> np.ndarray:
    """Trailing moving average over time of (..., frames, labels), as the detector smooths."""
    p = np.asarray(posteriors, dtype=np.float64)
    csum = np.cumsum(p, axis=-2)
    lagged = np.zeros_like(csum)
    lagged[..., smooth_frames:, :] = csum[..., :-smooth_frames, :]
    count = np.minimum(np.arange(1, p.shape[-2] + 1), smooth_frames)[:, None]
    return (csum - lagged) / count


def classify_many(posteriors: np.ndarray, rule: DecisionRule, silence: int = 0) -> np.ndarray:
    """``classify`` for a batch of clips (clips, frames, labels) at once, vectorised."""
    s = smoothed(posteriors, rule.smooth_frames)
    s[..., silence] = -1.0
    above = s >= rule.threshold  # (N, T, C)
    fired = above.any(axis=-1)  # (N, T)
    first = fired.argmax(axis=-1)  # (N,) first frame where something fired (0 if none)
    at_first = s[np.arange(len(s)), first]  # (N, C)
    best = np.where(above[np.arange(len(s)), first], at_first, -np.inf).argmax(axis=-1)
    return np.where(fired.any(axis=-1), best, silence)


# The grid ``calibrate`` searches: smoothing 40..160 ms, thresholds 0.5..0.9.
SMOOTH_GRID = (4, 8, 12, 16)
THRESHOLD_GRID = (0.5, 0.6, 0.7, 0.8, 0.9)


def calibrate(posteriors: np.ndarray, labels: np.ndarray, refractory_frames: int = 30,
              silence: int = 0) -> tuple[DecisionRule, float]:
    """The rule of the grid that classifies these clips best (ties: less smoothing and
    the lower threshold, i.e. the faster and more sensitive rule), and its accuracy.
    Training calibrates on training clips only; held-out voices only measure."""
    best: tuple[float, DecisionRule] | None = None
    for w in SMOOTH_GRID:
        for th in THRESHOLD_GRID:
            rule = DecisionRule(w, th, refractory_frames)
            acc = float((classify_many(posteriors, rule, silence) == labels).mean())
            if best is None or acc > best[0]:
                best = (acc, rule)
    assert best is not None
    return best[1], best[0]
