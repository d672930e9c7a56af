"""The transport ceiling for ``rnnserve bench``: the native streaming API with no model.

It speaks ``rnnserve.v1.Inference`` like the real server (same messages, same sizes):
``Stream`` opens a session and answers every chunk at once with an output tensor of
the shape the real model would return, taken from the model's metadata; ``StreamMany``
answers every item of a request so (``bench --many``). No
inference, no batching, no state: what is left is gRPC, protobuf and asyncio, the
most any server written this way can do on the machine.

    python -m rnnserve.client.echo --metadata meta.bin [--port 0]

prints ``{"event": "ready", "grpc_port": N}`` like ``rnnserve serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator

import grpc
import numpy as np

from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.protos.tensors import WIRE, to_tensor


def output_frames(meta: pb.ModelMetadata, chunk: pb.Chunk) -> int:
    """Time steps the real model answers for this chunk."""
    if chunk.WhichOneof("data") == "pcm16":
        return len(chunk.pcm16) // 2 // max(1, meta.hop_samples)
    if chunk.WhichOneof("data") == "text":
        return len(chunk.text.encode())
    return int(chunk.tensor.shape[0]) if chunk.tensor.shape else 0


class EchoServicer(pb_grpc.InferenceServicer):
    def __init__(self, meta: pb.ModelMetadata) -> None:
        self.meta = meta
        self._answers: dict[int, list[pb.NamedTensor]] = {}
        self._sessions = 0

    def _outputs(self, frames: int) -> list[pb.NamedTensor]:
        if frames not in self._answers:  # built once per chunk length, like a cache hit
            self._answers[frames] = [
                pb.NamedTensor(name=o.name, tensor=to_tensor(np.zeros(
                    [frames if d < 0 else d for d in o.shape], dtype=WIRE[o.dtype])))
                for o in self.meta.outputs]
        return self._answers[frames]

    async def Stream(self, request_iterator: AsyncIterator[pb.StreamRequest],
                     context: grpc.aio.ServicerContext) -> AsyncIterator[pb.StreamResponse]:
        async for req in request_iterator:
            if req.WhichOneof("kind") == "open":
                self._sessions += 1
                yield pb.StreamResponse(opened=pb.SessionInfo(
                    session_id=req.open.session_id or f"echo-{self._sessions}",
                    model=self.meta.name, version=self.meta.version))
            else:
                c = req.chunk
                yield pb.StreamResponse(result=pb.ChunkResult(
                    seq=c.seq, end=c.end, outputs=self._outputs(output_frames(self.meta, c))))

    async def StreamMany(self, request_iterator: AsyncIterator[pb.ManyRequest],
                         context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ManyResponse]:
        """Every item answered at once, its session opened first where it asks to be."""
        async for req in request_iterator:
            results = []
            for item in req.items:
                r = pb.ManyResult(session_id=item.session_id)
                if item.HasField("open"):
                    self._sessions += 1
                    r.session_id = r.session_id or f"echo-{self._sessions}"
                    r.opened.CopyFrom(pb.SessionInfo(session_id=r.session_id,
                                                     model=self.meta.name,
                                                     version=self.meta.version))
                if item.HasField("chunk"):
                    c = item.chunk
                    r.result.CopyFrom(pb.ChunkResult(
                        seq=c.seq, end=c.end,
                        outputs=self._outputs(output_frames(self.meta, c))))
                results.append(r)
            yield pb.ManyResponse(id=req.id, results=results)

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self.meta])

    async def GetModelMetadata(self, request: pb.GetModelMetadataRequest,
                               context: grpc.aio.ServicerContext) -> pb.ModelMetadata:
        return self.meta


async def serve(meta: pb.ModelMetadata, host: str, port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_InferenceServicer_to_server(EchoServicer(meta), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(json.dumps({"event": "ready", "grpc_port": bound}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--metadata", required=True, help="a serialized ModelMetadata message")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    meta = pb.ModelMetadata()
    with open(args.metadata, "rb") as f:
        meta.ParseFromString(f.read())
    asyncio.run(serve(meta, args.host, args.port))


if __name__ == "__main__":
    main()
