"""``serve --repo-poll-s``: model versions added to the repository while the server runs
are loaded and served, sessions open already stay on theirs; a file being written or
broken is not served, and one that failed is tried again once it changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnserve.client import AsyncClient, Client, many_item, packed_request
from rnnserve.protos.inference import grpc_service_pb2 as oip_pb
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

from ..oip.test_protocol import request as oip_request
from .serving import metric_value, start_server
from .test_grpc_api import whole_run

SENTENCE = b"The quick brown fox jumps over the lazy dog."


def wait_for(log: Path, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = log.read_text()
        if text in got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log: {log.read_text()[-3000:]}")


def move_in(src: Path, repo: Path, name: str, version: int, tmp: Path) -> None:
    """A version written elsewhere and moved into the repository in one rename."""
    staging = tmp / f"staging-{name}-{version}"
    shutil.copytree(src, staging)
    (repo / name).mkdir(exist_ok=True)
    os.rename(staging, repo / name / str(version))


@pytest.fixture
def small_repo(repo, tmp_path) -> Path:
    """text v1 and feat v1 of the shared repository; text v2 is added by the tests."""
    out = tmp_path / "models"
    for name in ("text", "feat"):
        shutil.copytree(repo / name / "1", out / name / "1")
    return out


def test_a_version_added_while_serving_serves_new_sessions_and_leaves_open_ones(
        repo, small_repo, tmp_path) -> None:
    x = np.frombuffer(SENTENCE, dtype=np.uint8)
    log = tmp_path / "server.log"
    scratch = tmp_path / "scratch"  # where the version is prepared apart (TMPDIR)
    scratch.mkdir()
    ended = subprocess.Popen(["true"])
    ended.wait()
    left = scratch / f"rnnserve-load-{ended.pid}-abc"  # a load of a server killed then
    left.mkdir()
    (left / "pooled.onnx").write_bytes(b"x")
    kept = scratch / f"rnnserve-load-{os.getpid()}-abc"  # a live process's
    kept.mkdir()
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1",
                       env={"TMPDIR": str(scratch)})
    try:
        with Client(srv.target, timeout=10) as client:
            old = client.open_session("text")
            assert old.version == 1
            ys_old = [client.step(old.session_id, 0, SENTENCE[:20])["logits"]]
            move_in(repo / "text" / "2", small_repo, "text", 2, tmp_path)
            wait_for(log, "serving text version 2")
            new = client.open_session("text")  # no version named: the highest, now 2
            ys_new = [client.step(new.session_id, 0, SENTENCE[:7])["logits"]]
            ys_old.append(client.step(old.session_id, 1, SENTENCE[20:])["logits"])
            ys_new.append(client.step(new.session_id, 1, SENTENCE[7:])["logits"])
            listed = sorted((m.name, m.version) for m in client.list_models())
            named = client.open_session("text", version=1)
            text = srv.metrics()
        assert new.version == 2 and named.version == 1
        assert listed == [("feat", 1), ("text", 1), ("text", 2)]
        assert np.abs(np.concatenate(ys_old) - whole_run(repo, "text", 1, x)).max() <= 1e-5
        assert np.abs(np.concatenate(ys_new) - whole_run(repo, "text", 2, x)).max() <= 1e-5
        assert metric_value(text, "rnnserve_sessions_started_total", model="text",
                            version="2") == 1
        assert metric_value(text, "rnnserve_model_load_seconds", model="text",
                            version="2") > 0
        # parsed in another process (parsing holds the GIL), in a folder gone since;
        # a dead server's folder swept at the start, a live one's kept
        assert "its file parsed in a process apart" in log.read_text()
        assert list(scratch.glob("rnnserve-load-*")) == [kept]
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_broken_version_is_not_served_and_is_tried_again_once_it_changes(
        repo, small_repo, tmp_path) -> None:
    """A model.onnx cut short (as a copy in progress leaves it): refused with the reason
    in the log, once; the server serves on. Written whole, it is loaded."""
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1")
    try:
        good = (repo / "text" / "2" / "model.onnx").read_bytes()
        (small_repo / "text" / "2").mkdir()
        part = small_repo / "text" / "2" / "model.onnx.part"
        part.write_bytes(good[:len(good) // 2])
        os.replace(part, small_repo / "text" / "2" / "model.onnx")
        wait_for(log, "not loaded")
        time.sleep(0.5)  # five more looks: the same broken file is not tried again
        with Client(srv.target, timeout=10) as client:
            assert client.open_session("text").version == 1
            with pytest.raises(grpc.RpcError) as err:
                client.open_session("text", version=2)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            tmp = small_repo / "text" / "2" / "model.onnx.part"
            tmp.write_bytes(good)
            os.replace(tmp, small_repo / "text" / "2" / "model.onnx")
            wait_for(log, "serving text version 2")
            assert client.open_session("text").version == 2
        text = log.read_text()
        assert text.count("not loaded") == 1, text
        assert "not a readable ONNX model" in text  # the reason, from the process apart
        assert metric_value(srv.metrics(), "rnnserve_model_load_failures_total",
                            model="text", version="2") == 1
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def versions_listed(client: Client) -> dict[tuple[str, int], tuple[int, list, list]]:
    """ListModels' entries: (default version, versions, withdrawn versions), and those
    of GetModelMetadata for the version, which must agree."""
    got = {}
    for m in client.list_models():
        one = client.stub.GetModelMetadata(pb.GetModelMetadataRequest(model=m.name,
                                                                      version=m.version))
        assert one == m
        got[(m.name, m.version)] = (m.default_version, list(m.versions),
                                    list(m.withdrawn_versions))
    return got


def test_a_failed_version_is_loading_again_once_its_file_changes(
        repo, small_repo, tmp_path) -> None:
    """A version whose load failed is refused as not served (NOT_FOUND) while its file
    is as it failed; once the file changes it is "not loaded yet" (UNAVAILABLE, retry)
    until it is tried again, and not served again when that fails too."""
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "1")
    good = (repo / "text" / "2" / "model.onnx").read_bytes()
    target = small_repo / "text" / "2" / "model.onnx"

    def publish(data: bytes) -> None:
        part = target.with_name("model.onnx.part")
        part.write_bytes(data)
        os.replace(part, target)

    def status(client: Client) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as err:
            client.open_session("text", version=2)
        return err.value.code()

    try:
        target.parent.mkdir()
        publish(good[:len(good) // 2])
        wait_for(log, "not loaded")
        with Client(srv.target, timeout=10) as client:
            first = status(client)
            publish(good[:len(good) // 3])
            seen = []
            deadline = time.monotonic() + 20
            while log.read_text().count("not loaded") < 2 and time.monotonic() < deadline:
                seen.append(status(client))
                time.sleep(0.05)
            assert log.read_text().count("not loaded") == 2, log.read_text()[-3000:]
            last = status(client)
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]
    assert first == last == grpc.StatusCode.NOT_FOUND
    assert grpc.StatusCode.UNAVAILABLE in seen, seen


def test_a_version_removed_while_serving_is_withdrawn_and_served_again_once_back(
        repo, small_repo, tmp_path) -> None:
    """Removing the highest version (a rollback) sends new sessions to the one below
    within two looks; the session open on it finishes exactly, and naming it still
    reaches it. A model removed whole serves on (its last version stays the default).
    Moved back, the version is the default again."""
    x = np.frombuffer(SENTENCE, dtype=np.uint8)
    move_in(repo / "text" / "2", small_repo, "text", 2, tmp_path)
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1")
    try:
        with Client(srv.target, timeout=10) as client:
            live = client.open_session("text")
            ys = [client.step(live.session_id, 0, SENTENCE[:9])["logits"]]
            os.rename(small_repo / "text" / "2", tmp_path / "away-text-2")
            os.rename(small_repo / "feat", tmp_path / "away-feat")
            wait_for(log, "model feat version 1 was removed")
            wait_for(log, "model text version 2 was removed")
            gone = metric_value(srv.metrics(), "rnnserve_model_withdrawn", model="text",
                                version="2")
            after = client.open_session("text")
            named = client.open_session("text", version=2)
            ys.append(client.step(live.session_id, 1, SENTENCE[9:])["logits"])
            whole = client.open_session("feat")
            listed = versions_listed(client)
            os.rename(tmp_path / "away-text-2", small_repo / "text" / "2")
            wait_for(log, "model text version 2 is in the repository again")
            back = client.open_session("text")
            relisted = versions_listed(client)
            withdrawn = [metric_value(srv.metrics(), "rnnserve_model_withdrawn", model=m,
                                      version=v) for m, v in (("text", "2"), ("feat", "1"))]
        assert (live.version, after.version, named.version, back.version) == (2, 1, 2, 2)
        assert whole.version == 1
        assert gone == 1 and withdrawn == [0, 1]
        # every version listed, each model's default and withdrawn ones said (a model
        # removed whole keeps its last as the default)
        assert listed == {("feat", 1): (1, [1], [1]), ("text", 1): (1, [1, 2], [2]),
                          ("text", 2): (1, [1, 2], [2])}
        assert relisted == {("feat", 1): (1, [1], [1]), ("text", 1): (2, [1, 2], []),
                            ("text", 2): (2, [1, 2], [])}
        assert np.abs(np.concatenate(ys) - whole_run(repo, "text", 2, x)).max() <= 1e-5
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_loaded_version_whose_file_changes_is_served_as_loaded_and_said_so(
        repo, small_repo, tmp_path) -> None:
    """A version is read once: its file replaced in place (another model under the same
    number) changes nothing served, and the log says to publish a new version."""
    x = np.frombuffer(SENTENCE, dtype=np.uint8)
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1")
    try:
        part = small_repo / "text" / "1" / "model.onnx.part"
        shutil.copyfile(repo / "text" / "2" / "model.onnx", part)
        os.replace(part, small_repo / "text" / "1" / "model.onnx")
        wait_for(log, "model text version 1 changed in the repository")
        with Client(srv.target, timeout=10) as client:
            sid = client.open_session("text").session_id
            y = client.step(sid, 0, SENTENCE)["logits"]
        assert np.abs(y - whole_run(repo, "text", 1, x)).max() <= 1e-5
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_repository_that_looks_empty_withdraws_nothing(repo, small_repo, tmp_path) -> None:
    """A volume remounted can show an empty folder a moment: with no model there at
    all, no version is withdrawn (text 2 stays the default)."""
    move_in(repo / "text" / "2", small_repo, "text", 2, tmp_path)
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1")
    try:
        away = tmp_path / "away"
        os.rename(small_repo, away)
        small_repo.mkdir()
        wait_for(log, "holds no model now")
        time.sleep(0.3)  # three looks more
        with Client(srv.target, timeout=10) as client:
            assert client.open_session("text").version == 2
        assert "was removed" not in log.read_text()
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def test_a_many_request_is_bounded_by_the_models_added_while_serving(
        repo, small_repo, tmp_path) -> None:
    """StreamMany bounds a request's answers by the largest model's, cached per chunk
    length: a model added while serving (text: 1 KiB per step, against feat's 28
    bytes) counts from then on. Three 25-byte text chunks (~77 KB) in a 64 KiB message:
    the items that fit run and the rest are refused, the stream goes on."""
    shutil.rmtree(small_repo / "text")
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "0.1", "--max-message-bytes",
                       "65536")

    async def main() -> list:
        async with AsyncClient(srv.target, timeout=10) as client, client.many() as m:
            first = await m.send([many_item("f", 0, np.zeros((25, 20), np.float32),
                                            open_model="feat")])
            move_in(repo / "text" / "1", small_repo, "text", 1, tmp_path)
            await asyncio.to_thread(wait_for, log, "serving text version 1")
            texts = await m.send([many_item(sid, 0, "x" * 25, open_model="text")
                                  for sid in "abc"])
            return [(r.session_id, r.code) for r in [*first, *texts]]

    try:
        got = asyncio.run(main())
        refused = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert got == [("f", 0), ("a", 0), ("b", 0), ("c", refused)]
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]


def pushback(err: grpc.RpcError) -> str | None:
    """The grpc-retry-pushback-ms trailer of a refused call."""
    return dict(err.trailing_metadata() or ()).get("grpc-retry-pushback-ms")


@contextlib.contextmanager
def kept_unsettled(path: Path) -> Iterator[None]:
    """``path``'s mtime moved on every 20 ms: to the server's looks, a file still being
    written, which it does not load (it stays "not loaded yet") until the block ends."""
    stop = threading.Event()

    def touch() -> None:
        while not stop.wait(0.02):
            os.utime(path, ns=(time.time_ns(), time.time_ns()))

    toucher = threading.Thread(target=touch)
    toucher.start()
    try:
        yield
    finally:
        stop.set()
        toucher.join()


def until_seen(client: Client, model: str, version: int, timeout: float = 30) -> None:
    """Until the server's look found the version (its open is "not loaded yet")."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            client.open_session(model, version=version)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                return
            assert err.code() == grpc.StatusCode.NOT_FOUND and time.monotonic() < deadline
        else:
            raise AssertionError(f"{model} version {version} is served already")
        time.sleep(0.05)


def test_requests_naming_a_version_not_loaded_yet_are_told_when_to_retry(
        repo, small_repo, tmp_path) -> None:
    """A version the server's look found in the repository and it has not loaded yet
    (published a moment ago; another replica may serve it already) is UNAVAILABLE "not
    loaded yet" with a retry hint on every API, not NOT_FOUND, which no client retries.
    Looks every 5 s, so the hint is 5 s: a client whose resumes have 2 s takes the
    refusal at once, rather than trying every 50-500 ms."""
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "5")
    move_in(repo / "text" / "2", small_repo, "text", 2, tmp_path)
    chunk = np.frombuffer(SENTENCE[:5], np.uint8)[None]

    async def clients() -> tuple[grpc.aio.AioRpcError, grpc.aio.AioRpcError, float]:
        async with AsyncClient(srv.target, timeout=10, reconnect_s=2) as client:
            async with client.packed() as p:
                with pytest.raises(grpc.aio.AioRpcError) as packed:
                    await p.send(packed_request("text", ["p"], [0], chunk, version=2,
                                                opens=[0]))
                answer = await p.send(packed_request("text", ["q"], [0], chunk, opens=[0]))
                assert not answer.failures  # the stream goes on, on the loaded version
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async with client.stream("text", version=2):
                    pass
            return packed.value, streamed.value, time.monotonic() - started

    try:
        with kept_unsettled(small_repo / "text" / "2" / "model.onnx"):
            with Client(srv.target, timeout=10) as client:
                until_seen(client, "text", 2)
                with pytest.raises(grpc.RpcError) as opened:
                    client.open_session("text", version=2)
                with pytest.raises(grpc.RpcError) as unknown:
                    client.open_session("text", version=3)  # not in the repository
                meta = client.stub.GetModelMetadata(pb.GetModelMetadataRequest(model="text"))
            with grpc.insecure_channel(srv.target) as channel:
                oip = oip_grpc.GRPCInferenceServiceStub(channel)
                with pytest.raises(grpc.RpcError) as inferred:
                    oip.ModelInfer(oip_request(np.zeros((1, 5), np.uint8), "text",
                                               datatype="UINT8", version="2"))
                with pytest.raises(grpc.RpcError) as described:
                    oip.ModelMetadata(oip_pb.ModelMetadataRequest(name="text", version="2"))
                ready = oip.ModelReady(oip_pb.ModelReadyRequest(name="text", version="2"))
            packed, streamed, waited = asyncio.run(clients())
            text = srv.metrics()
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]
    for err in (opened.value, inferred.value, described.value, packed, streamed):
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err.details()
        assert "model 'text' version 2 is in this server's model repository but not " \
               "loaded yet" in err.details(), err.details()
        assert pushback(err) == "5000"
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert (meta.version, meta.default_version, list(meta.versions)) == (1, 1, [1])
    assert not ready.ready
    # the stream's open was refused once; its resumes were told to come back past
    # their deadline, and did not try
    assert waited < 1
    assert metric_value(text, "rnnserve_requests_total", method="Stream",
                        code="UNAVAILABLE") == 1


def test_a_client_waits_the_hint_and_opens_the_version_once_loaded(
        repo, small_repo, tmp_path) -> None:
    """The Python client's resumes take the hint (1 s here, the poll period): a stream
    opened on a version the server is loading tries again once a second, not every
    50-500 ms, and opens once the version is served, exact."""
    x = np.frombuffer(SENTENCE, dtype=np.uint8)
    log = tmp_path / "server.log"
    srv = start_server(small_repo, log, "--repo-poll-s", "1")
    move_in(repo / "text" / "2", small_repo, "text", 2, tmp_path)

    async def main() -> tuple[int, np.ndarray, float]:
        async with AsyncClient(srv.target, timeout=10, reconnect_s=30) as client:
            started = time.monotonic()
            async with client.stream("text", version=2) as s:
                took = time.monotonic() - started
                y = (await s.send(SENTENCE, end=True))["logits"]
                return s.version, y, took

    try:
        with Client(srv.target, timeout=10) as client:
            with kept_unsettled(small_repo / "text" / "2" / "model.onnx"):
                until_seen(client, "text", 2)
                got: list[tuple[int, np.ndarray, float]] = []
                opening = threading.Thread(target=lambda: got.append(asyncio.run(main())))
                opening.start()
                time.sleep(3)  # refused meanwhile: the file does not settle
            opening.join(30)
        refusals = metric_value(srv.metrics(), "rnnserve_requests_total", method="Stream",
                                code="UNAVAILABLE")
    finally:
        assert srv.stop() == 0, log.read_text()[-3000:]
    ((version, y, took),) = got
    assert version == 2 and took >= 3
    # a try at most once a second (backing off from 50 ms, ten in the first 3 s)
    assert 3 <= refusals <= took + 1, (refusals, took)
    assert np.abs(y - whole_run(repo, "text", 2, x)).max() <= 1e-5


def test_a_retry_hint_holds_back_its_own_target_not_the_others(
        repo, small_repo, tmp_path) -> None:
    """Two replicas loading the version: A looks every 5 s (hint 5 s, past the client's
    4 s to resume), B every 0.3 s (hint 0.3 s), and loads it once its file settles,
    half a second after the stream first tries. The stream opens on B once loaded,
    and A is asked once: A's hint past the deadline does not end the retries while
    B's does not."""
    repos = {name: tmp_path / f"models-{name}" for name in "ab"}
    for path in repos.values():
        shutil.copytree(small_repo, path)
    a = start_server(repos["a"], tmp_path / "a.log", "--repo-poll-s", "5")
    b = start_server(repos["b"], tmp_path / "b.log", "--repo-poll-s", "0.3")
    for name, path in repos.items():
        move_in(repo / "text" / "2", path, "text", 2, tmp_path / name)

    async def main() -> tuple[int, int]:
        async with AsyncClient([a.target, b.target], timeout=10, reconnect_s=4) as client:
            async with client.stream("text", version=2) as s:
                await s.send(SENTENCE)
                return s.version, s.resumes

    try:
        with kept_unsettled(repos["a"] / "text" / "2" / "model.onnx"):
            with kept_unsettled(repos["b"] / "text" / "2" / "model.onnx"):
                for srv in (a, b):
                    with Client(srv.target, timeout=10) as client:
                        until_seen(client, "text", 2)
                got: list[tuple[int, int]] = []
                opening = threading.Thread(target=lambda: got.append(asyncio.run(main())))
                opening.start()
                time.sleep(0.5)
            opening.join(30)
        refused = [metric_value(srv.metrics(), "rnnserve_requests_total", method="Stream",
                                code="UNAVAILABLE") for srv in (a, b)]
    finally:
        for srv in (a, b):
            assert srv.stop() == 0, srv.log.read_text()[-3000:]
    assert got == [(2, 1)]
    assert refused[0] == 1 and refused[1] >= 1, refused


def test_a_prepare_child_whose_server_is_gone_leaves_nothing_behind(repo, tmp_path) -> None:
    """``python -m rnnserve.server.prepare`` writes the pooled graph into its server's
    folder (rnnserve-load-PID-*) and prints the metadata; when that server is not its
    parent any more (killed mid-load: the folder would stay in a pod's /tmp), it
    removes the folder instead and exits 3."""
    src = repo / "text" / "1" / "model.onnx"
    ended = subprocess.Popen(["true"])
    ended.wait()
    runs = {}
    for pid in (os.getpid(), ended.pid):  # this test's process is the child's parent
        folder = tmp_path / f"rnnserve-load-{pid}-abc"
        folder.mkdir()
        runs[pid] = subprocess.run(
            [sys.executable, "-P", "-m", "rnnserve.server.prepare", str(src),
             str(folder / "pooled.onnx")], capture_output=True, text=True, cwd=tmp_path)
    ours, orphan = runs[os.getpid()], runs[ended.pid]
    assert ours.returncode == 0, ours.stderr
    info = json.loads(ours.stdout.splitlines()[-1])
    assert "rnnserve.model" in info["props"] and info["opset"] >= 13
    assert (tmp_path / f"rnnserve-load-{os.getpid()}-abc" / "pooled.onnx").stat().st_size
    assert orphan.returncode == 3 and "is gone" in orphan.stderr, orphan.stderr
    assert not (tmp_path / f"rnnserve-load-{ended.pid}-abc").exists()
