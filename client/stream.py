"""``rnnserve stream``: stream text to a running server and show what the model predicts.

For a byte-level language model each chunk's outputs are the logits of the byte
that follows each input byte. The command prints, per chunk, the text sent and the
model's most likely next byte at each position, then the bits per byte the model
spent on the whole text (lower is better; about 8 means it guesses blindly).
"""

from __future__ import annotations

import math
import sys

import grpc
import numpy as np

from rnnserve.client.client import AsyncClient
from rnnserve.errors import RnnserveError


def _show(data: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 else "·" for b in data)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


async def stream_text(server: str, model: str, version: int, data: bytes, chunk_bytes: int,
                      timeout: float) -> int:
    if not data:
        raise RnnserveError("nothing to stream: the input is empty")
    async with AsyncClient(server, timeout=timeout) as client:
        try:
            meta = await client.model_metadata(model, version)
            if meta.input_kind != "utf8_bytes":
                raise RnnserveError(f"model {model!r} takes {meta.input_kind} input; "
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
        except grpc.aio.AioRpcError as exc:
            raise RnnserveError(f"{exc.code().name}: {exc.details()}") from None
    if predicted:
        print(f"{len(data)} bytes in {math.ceil(len(data) / chunk_bytes)} chunks; the model "
              f"spent {nats / predicted / math.log(2):.3f} bits per byte predicting them")
    return 0
