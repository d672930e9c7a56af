"""Client library for ``rnnserve.v1.Inference``.

Streaming (asyncio)::

    async with AsyncClient("127.0.0.1:8001") as client:
        async with client.stream("text") as s:
            out = await s.send("Hello, ")           # {"logits": array (time, 256)}
            out = await s.send("world", end=True)

Unary (sync, for clients that cannot stream)::

    with Client("127.0.0.1:8001") as client:
        sid = client.open_session("text").session_id
        out = client.step(sid, 0, "Hello")
        client.close_session(sid)

Data for a chunk may be ``str`` (text models), ``bytes`` (PCM16 audio for pcm16
models, raw byte values for text models) or a numpy array shaped (time, *frame).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from rnnserve.protos.headers import SESSION_HEADER
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import from_tensor, to_tensor

Data = str | bytes | np.ndarray


def make_chunk(seq: int, data: Data, end: bool = False, *, pcm16: bool = False) -> pb.Chunk:
    if isinstance(data, str):
        return pb.Chunk(seq=seq, text=data, end=end)
    if isinstance(data, bytes | bytearray | memoryview):
        if pcm16:
            return pb.Chunk(seq=seq, pcm16=bytes(data), end=end)
        return pb.Chunk(seq=seq, tensor=to_tensor(np.frombuffer(data, dtype=np.uint8)),
                        end=end)
    return pb.Chunk(seq=seq, tensor=to_tensor(np.asarray(data)), end=end)


def new_session_id() -> str:
    """Sessions are named by the client, so that the first call already carries the
    routing header a load balancer hashes (the server takes the id as given)."""
    return uuid.uuid4().hex


def _routing(session_id: str) -> tuple[tuple[str, str], ...]:
    return ((SESSION_HEADER, session_id),)


def outputs(result: pb.ChunkResult) -> dict[str, np.ndarray]:
    return {o.name: from_tensor(o.tensor) for o in result.outputs}


class StreamSession:
    """One session on one bidirectional stream; chunks are numbered for you.

    Requests flow through a queue that grpc consumes on its own: when the server
    ends the stream (say, while draining), the next ``send`` raises the server's
    status, not a local write error.
    """

    def __init__(self, stub: pb_grpc.InferenceStub, open_req: pb.OpenSessionRequest,
                 timeout: float | None) -> None:
        self._stub, self._open, self._timeout = stub, open_req, timeout
        self._call: Any = None
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self.session_id = ""
        self.model = ""
        self.version = 0
        self.next_seq = 0
        self.pcm16 = False
        self._failed = False

    async def _requests(self) -> AsyncIterator[pb.StreamRequest]:
        while (req := await self._outbox.get()) is not None:
            yield req

    async def _read(self, what: str) -> pb.StreamResponse:
        try:
            resp = await self._call.read()  # raises AioRpcError with the server's status
        except grpc.aio.AioRpcError:
            self._failed = True  # the stream is over; its status was raised once
            raise
        if resp is grpc.aio.EOF:
            self._failed = True
            raise ConnectionError(f"the server ended the stream without {what}")
        return resp

    async def __aenter__(self) -> StreamSession:
        self._call = self._stub.Stream(self._requests(), timeout=self._timeout,
                                       metadata=_routing(self._open.session_id))
        self._outbox.put_nowait(pb.StreamRequest(open=self._open))
        info = (await self._read("opening the session")).opened
        self.session_id, self.model, self.version = info.session_id, info.model, info.version
        self.next_seq = info.next_seq
        return self

    async def send(self, data: Data, end: bool = False) -> dict[str, np.ndarray]:
        """Send one chunk and wait for its outputs (name -> array shaped (time, ...))."""
        chunk = make_chunk(self.next_seq, data, end, pcm16=self.pcm16)
        self._outbox.put_nowait(pb.StreamRequest(chunk=chunk))
        resp = await self._read("answering the chunk")
        self.next_seq += 1
        return outputs(resp.result)

    async def __aexit__(self, et: type[BaseException] | None, e: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._call is None:
            return
        self._outbox.put_nowait(None)  # half-close
        if self._failed:
            return
        if et is not None:
            self._call.cancel()
            return
        while await self._call.read() is not grpc.aio.EOF:
            pass


class AsyncClient:
    def __init__(self, target: str, *, timeout: float | None = None,
                 options: list[tuple[str, Any]] | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def stream(self, model: str, version: int = 0, session_id: str = "",
               resume: bool = False, *, pcm16: bool = False) -> StreamSession:
        """A streaming session; ``pcm16``: ``bytes`` chunks are PCM16 audio, not tensors."""
        req = pb.OpenSessionRequest(model=model, version=version,
                                    session_id=session_id or new_session_id(),
                                    resume=resume)
        session = StreamSession(self.stub, req, self.timeout)
        session.pcm16 = pcm16
        return session

    async def list_models(self) -> list[pb.ModelMetadata]:
        resp = await self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout)
        return list(resp.models)

    async def model_metadata(self, model: str, version: int = 0) -> pb.ModelMetadata:
        return await self.stub.GetModelMetadata(
            pb.GetModelMetadataRequest(model=model, version=version), timeout=self.timeout)


class Client:
    """Synchronous client: unary calls for clients that cannot stream."""

    def __init__(self, target: str, *, timeout: float | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.InferenceStub(self._channel)
        self.timeout = timeout

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self._channel.close()

    def open_session(self, model: str, version: int = 0, session_id: str = "",
                     resume: bool = False) -> pb.SessionInfo:
        session_id = session_id or new_session_id()
        return self.stub.OpenSession(pb.OpenSessionRequest(
            model=model, version=version, session_id=session_id, resume=resume),
            timeout=self.timeout, metadata=_routing(session_id))

    def step(self, session_id: str, seq: int, data: Data, end: bool = False,
             pcm16: bool = False) -> dict[str, np.ndarray]:
        resp = self.stub.Step(pb.StepRequest(session_id=session_id,
                                             chunk=make_chunk(seq, data, end, pcm16=pcm16)),
                              timeout=self.timeout, metadata=_routing(session_id))
        return outputs(resp.result)

    def close_session(self, session_id: str) -> None:
        self.stub.CloseSession(pb.CloseSessionRequest(session_id=session_id),
                               timeout=self.timeout, metadata=_routing(session_id))

    def list_models(self) -> list[pb.ModelMetadata]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout).models)
