"""``rnnserve stream``: stream text or audio to a running server and show what comes back.

Audio (``--wav``): the WAV file is sent as PCM16 chunks of ``--chunk-ms``, one per
chunk duration as a microphone would (or as fast as possible with ``--fast``); the
model's per-frame posteriors go through its streaming decision rule (from its
metadata, ``rnnserve.kws``) and each detection is printed with its time in the audio.
In real time a chunk's latency counts from when its audio was due, not from its send.
``--timeout`` bounds the wait for each chunk's answer, not the stream.

Text:
For a byte-level language model each chunk's outputs are the logits of the byte
that follows each input byte. The command prints, per chunk, the text sent and the
model's most likely next byte at each position, then the bits per byte the model
spent on the whole text (lower is better; about 8 means it guesses blindly).
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
from typing import Any

import grpc
import numpy as np

from rnnserve.audio import resample, to_pcm16
from rnnserve.client.client import AsyncClient
from rnnserve.errors import RnnserveError
from rnnserve.kws import DecisionRule, StreamingDetector
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb


def _show(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "·" for b in data)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


async def _metadata_for(client: AsyncClient, model: str, version: int, kind: str,
                        sends: str) -> pb.ModelMetadata:
    """The model's metadata, refused with a clear message when it takes other input."""
    meta = await client.model_metadata(model, version)
    if meta.input_kind != kind:
        raise RnnserveError(f"model {model!r} takes {meta.input_kind} input; {sends}")
    return meta


async def stream_text(server: str, model: str, version: int, data: bytes, chunk_bytes: int,
                      timeout: float, connect: dict[str, Any] | None = None) -> int:
    """``connect``: AsyncClient's token and TLS arguments."""
    if not data:
        raise RnnserveError("nothing to stream: the input is empty")
    async with AsyncClient(server, timeout=timeout, **(connect or {})) as client:
        try:
            meta = await _metadata_for(client, model, version, "utf8_bytes",
                                       "`rnnserve stream` sends text")
            nats, predicted = 0.0, 0
            prev: np.ndarray | None = None  # log-probabilities for the next byte
            async with client.stream(model, version) as s:
                print(f"session {s.session_id} on {s.model} version {s.version}",
                      file=sys.stderr)
                for start in range(0, len(data), chunk_bytes):
                    piece = data[start:start + chunk_bytes]
                    end = start + chunk_bytes >= len(data)
                    out = await s.send(piece, end=end)
                    logp = _log_softmax(out[meta.outputs[0].name].astype(np.float64))
                    x = np.frombuffer(piece, dtype=np.uint8)
                    if prev is not None:
                        nats -= prev[x[0]]
                        predicted += 1
                    nats -= float(logp[np.arange(len(x) - 1), x[1:]].sum())
                    predicted += len(x) - 1
                    prev = logp[-1]
                    guess = bytes(logp.argmax(axis=-1).astype(np.uint8))
                    print(f"{s.next_seq - 1:5d}  sent {_show(piece)!s:<{chunk_bytes}}  "
                          f"next-byte guesses {_show(guess)}", flush=True)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            raise _failed(exc) from None
    if predicted:
        print(f"{len(data)} bytes in {math.ceil(len(data) / chunk_bytes)} chunks; the model "
              f"spent {nats / predicted / math.log(2):.3f} bits per byte predicting them")
    return 0


def _failed(exc: grpc.aio.AioRpcError | ConnectionError) -> RnnserveError:
    """A stream's failure as one line: its status, or (a stream that ended without an
    answer, say after a late one) the client's words."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return RnnserveError(f"{exc.code().name}: {exc.details()}")
    return RnnserveError(str(exc))


def decision_rule(meta: pb.ModelMetadata) -> tuple[DecisionRule, str, float]:
    """The model's streaming decision rule, silence label and frame duration (metadata)."""
    raw = meta.properties.get("rnnserve.decoding")
    if not raw:
        raise RnnserveError(f"model {meta.name!r} declares no decision rule "
                            "(rnnserve.decoding); is it a keyword model?")
    d = json.loads(raw)
    return DecisionRule.from_dict(d), str(d["silence_label"]), float(d["frame_seconds"])


async def stream_audio(server: str, model: str, version: int, pcm: np.ndarray, rate: int,
                       chunk_ms: int, realtime: bool, timeout: float,
                       show_unknown: bool = False, connect: dict[str, Any] | None = None
                       ) -> int:
    """Stream int16 audio at ``rate`` Hz (resampled to the model's rate) chunk by chunk,
    as a microphone would; print the detections. ``connect``: AsyncClient's token and
    TLS arguments."""
    async with AsyncClient(server, timeout=timeout, **(connect or {})) as client:
        try:
            meta = await _metadata_for(client, model, version, "pcm16",
                                       "`rnnserve stream --wav` sends PCM16 audio")
            if rate != meta.sample_rate:
                pcm = to_pcm16(resample(pcm / 32768.0, rate, meta.sample_rate))
            rule, silence, frame_seconds = decision_rule(meta)
            labels = list(meta.labels)
            chunk = meta.sample_rate * chunk_ms // 1000
            if chunk < 1 or chunk % meta.hop_samples or (meta.sample_rate * chunk_ms) % 1000:
                raise RnnserveError(
                    f"--chunk-ms {chunk_ms} is not a whole number of {meta.hop_samples}-sample "
                    f"hops at {meta.sample_rate} Hz (use a multiple of "
                    f"{1000 * meta.hop_samples // meta.sample_rate} ms)")
            pcm = np.concatenate([pcm, np.zeros((-len(pcm)) % meta.hop_samples, np.int16)])
            if not len(pcm):
                raise RnnserveError("nothing to stream: the audio is empty")
            detector = StreamingDetector(labels, rule, labels.index(silence))
            latencies: list[float] = []
            detections = 0
            loop = asyncio.get_running_loop()
            async with client.stream(model, version, pcm16=True) as s:
                print(f"session {s.session_id} on {s.model} version {s.version}: "
                      f"{len(pcm) / meta.sample_rate:.2f}s of audio in {chunk_ms} ms chunks"
                      f"{' in real time' if realtime else ', as fast as possible'}",
                      file=sys.stderr)
                started = loop.time()
                for i, a in enumerate(range(0, len(pcm), chunk)):
                    due = loop.time()  # what its latency counts from
                    if realtime:  # open loop: chunk i leaves when its audio has been heard
                        # (later if the last answer came late); its latency counts from
                        # then, so a server that falls behind cannot hide its queue
                        due = started + (i + 1) * chunk_ms / 1000
                        await asyncio.sleep(max(0.0, due - loop.time()))
                    piece = pcm[a:a + chunk]
                    out = await s.send(piece.astype("<i2").tobytes(),
                                       end=a + chunk >= len(pcm))
                    latencies.append(loop.time() - due)
                    for d in detector.push(out[meta.outputs[0].name]):
                        if d.label == silence or (d.label.startswith("_") and not show_unknown):
                            continue
                        detections += 1
                        print(f"{d.seconds(frame_seconds):7.2f}s  {d.label:<10} "
                              f"score {d.score:.2f}", flush=True)
        except (grpc.aio.AioRpcError, ConnectionError) as exc:
            raise _failed(exc) from None
    lat = np.array(latencies) * 1000
    print(f"{detections} detection(s); {len(lat)} chunks; chunk latency p50 "
          f"{np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, "
          f"max {lat.max():.1f} ms", file=sys.stderr)
    return 0
