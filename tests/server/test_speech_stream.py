"""PCM16 audio streamed over gRPC to a speech model served by a real ``rnnserve serve``."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from rnnserve.client import AsyncClient, Client
from rnnserve.export.onnx_export import export_checkpoint
from rnnserve.export.verify import probe_signal
from rnnserve.training.speech_data import LABELS

from ..conftest import speech_checkpoint
from .serving import start_server


@pytest.fixture(scope="module")
def speech_repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech-repo")
    speech_checkpoint(root / "sp.pt", hidden_size=48, seed=11, normalised=False)
    export_checkpoint(root / "sp.pt", root / "models", "speech", log=lambda _: None)
    return root / "models"


@pytest.fixture(scope="module")
def server(speech_repo, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    srv = start_server(speech_repo, log, "--max-batch-delay-ms", "2")
    yield srv
    assert srv.stop() == 0, log.read_text()[-3000:]


def utterance(seconds: float = 2.0) -> np.ndarray:
    return probe_signal(16000, 160, seconds)


def whole_run(repo, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(repo / "speech" / "1" / "model.onnx"),
                                providers=["CPUExecutionProvider"])
    feeds = {"input": x[None]}
    for i in sess.get_inputs()[1:]:
        feeds[i.name] = np.zeros((1, *i.shape[1:]), dtype=np.float32)
    return sess.run(["posteriors"], feeds)[0][0]


async def stream(target: str, x: np.ndarray, chunk: int) -> np.ndarray:
    parts = []
    async with AsyncClient(target, timeout=30) as client:
        async with client.stream("speech", pcm16=True) as s:
            for a in range(0, len(x), chunk):
                out = await s.send(x[a:a + chunk].astype("<i2").tobytes(),
                                   end=a + chunk >= len(x))
                parts.append(out["posteriors"])
    return np.concatenate(parts)


@pytest.mark.parametrize("chunk_ms", [20, 40, 100])
def test_streamed_posteriors_equal_the_whole_utterance(server, speech_repo, chunk_ms) -> None:
    x = utterance()
    whole = whole_run(speech_repo, x)
    got = asyncio.run(stream(server.target, x, 16 * chunk_ms))
    assert got.shape == whole.shape == (len(x) // 160, len(LABELS))
    assert np.abs(got - whole).max() <= 1e-4


def test_concurrent_audio_streams_with_different_chunkings_are_each_exact(
        server, speech_repo) -> None:
    rng = np.random.default_rng(3)
    xs = [np.roll(utterance(1.0), int(rng.integers(0, 16000))) for _ in range(12)]
    chunks = [16 * ms for ms in (20, 40, 100, 10, 60, 30) * 2]

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(stream(server.target, x, c)
                                      for x, c in zip(xs, chunks, strict=True)))

    for x, got in zip(xs, asyncio.run(main()), strict=True):
        assert np.abs(got - whole_run(speech_repo, x)).max() <= 1e-4


def test_metadata_tells_a_client_how_to_send_audio(server) -> None:
    with Client(server.target, timeout=10) as c:
        meta = next(m for m in c.list_models() if m.name == "speech")
    assert meta.input_kind == "pcm16" and meta.sample_rate == 16000 and meta.hop_samples == 160
    assert list(meta.labels) == list(LABELS)
    assert list(meta.outputs[0].shape) == [-1, len(LABELS)]
    assert "rnnserve.decoding" in meta.properties


def test_a_chunk_that_is_not_whole_hops_is_refused_and_the_session_goes_on(
        server, speech_repo) -> None:
    x = utterance(0.6)
    whole = whole_run(speech_repo, x)
    with Client(server.target, timeout=10) as c:
        sid = c.open_session("speech").session_id
        first = c.step(sid, 0, x[:320].astype("<i2").tobytes(), pcm16=True)["posteriors"]
        for bad in (x[320:420], x[320:321], x[320:640][:-1]):
            with pytest.raises(grpc.RpcError) as err:
                c.step(sid, 1, bad.astype("<i2").tobytes(), pcm16=True)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "multiple of 160 samples" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # odd byte count: not PCM16 at all
            c.step(sid, 1, x[320:640].astype("<i2").tobytes()[:-1], pcm16=True)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        rest = c.step(sid, 1, x[320:].astype("<i2").tobytes(), end=True,
                      pcm16=True)["posteriors"]
    assert np.abs(np.concatenate([first, rest]) - whole).max() <= 1e-4


def test_answer_bytes_count_frames_of_audio(speech_repo) -> None:
    """A PCM16 model answers one frame per hop: the bound on a chunk's answer (what
    check_chunk refuses chunks by) is what a run gives for chunks of 1 to 25 hops."""
    from rnnserve.server.runtime import ModelRegistry, RuntimeOptions

    rt = ModelRegistry(speech_repo, RuntimeOptions(device="cpu")).get("speech")
    hop = rt.meta.input.hop_samples
    for hops in (1, 4, 25):
        x = utterance(1.0)[:hops * hop].astype(np.int16)
        outs, _ = rt.run([x], [rt.zero_state()])
        assert rt.answer_bytes(hops * hop) == sum(o.nbytes for o in outs[0]), hops
    assert rt.max_steps(4 * rt.answer_bytes(hop)) == 4 * hop


def test_packed_pcm16_streams_equal_the_whole_utterance(server, speech_repo) -> None:
    """README: a gateway's calls as one StreamPacked request per 40 ms tick, their
    samples in one int16 array (the first tick opening them), and as PCM16 bytes of
    every call in turn: each call's posteriors equal one run of its whole audio."""
    from rnnserve.client import packed_request

    n, chunk = 5, 640
    calls = np.stack([np.roll(utterance(1.28), 160 * i) for i in range(n)])
    sids = [f"call-{i}" for i in range(n)]

    async def main() -> np.ndarray:
        parts = []
        async with AsyncClient(server.target, timeout=30) as client, \
                client.packed() as p:
            for k, a in enumerate(range(0, calls.shape[1], chunk)):
                block = calls[:, a:a + chunk].astype(np.int16)
                last = a + chunk >= calls.shape[1]
                req = packed_request("speech", sids, [k] * n,
                                     block if k % 2 else block.astype("<i2").tobytes(),
                                     opens=range(n) if k == 0 else (),
                                     ends=range(n) if last else ())
                answer = await p.send(req)
                assert not answer.failures, answer.failures
                parts.append(answer.outputs["posteriors"])
        return np.concatenate(parts, axis=1)

    y = asyncio.run(main())
    for i in range(n):
        want = whole_run(speech_repo, calls[i].astype(np.int16))
        assert y[i].shape == want.shape
        assert np.abs(y[i] - want).max() <= 1e-4, i
