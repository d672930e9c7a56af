"""``serve --repo-poll-s`` with a shared store: a session opened on a version another
server has not loaded yet is UNAVAILABLE there (clients that resume retry) while that
version is in its repository, and resumes exactly once it is loaded."""

from __future__ import annotations

import shutil

import grpc
import numpy as np

from rnnserve.client import Client

from ..server.test_grpc_api import whole_run
from ..server.test_repo_poll import SENTENCE, move_in, wait_for
from .test_failover import code_and_message, serve


def test_a_session_on_a_version_not_loaded_here_yet_is_unavailable_until_it_is(
        repo, redis_server, tmp_path) -> None:
    x = np.frombuffer(SENTENCE, dtype=np.uint8)
    repo_a, repo_b = tmp_path / "a-models", tmp_path / "b-models"
    for name, version in (("text", 1), ("text", 2)):
        shutil.copytree(repo / name / str(version), repo_a / name / str(version))
    shutil.copytree(repo / "text" / "1", repo_b / "text" / "1")
    a = serve(repo_a, tmp_path, "a", redis_server.url)
    b = serve(repo_b, tmp_path, "b", redis_server.url, "--repo-poll-s", "2")
    try:
        with Client(a.target, timeout=10) as on_a:
            sid = on_a.open_session("text").session_id  # version 2, the highest on A
            ys = [on_a.step(sid, 0, SENTENCE[:9])["logits"]]
        assert a.stop() == 0  # its lease let go: B may take the session at once
        with Client(b.target, timeout=10) as on_b:
            code, msg = code_and_message(on_b.open_session, "text", session_id=sid,
                                         resume=True)
            assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
            assert "which this server does not serve" in msg
            # B loads it two looks after it came, 2 s apart at least: not yet
            move_in(repo / "text" / "2", repo_b, "text", 2, tmp_path)
            code, msg = code_and_message(on_b.open_session, "text", session_id=sid,
                                         resume=True)
            assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
            assert "in this server's model repository but not loaded yet" in msg
            wait_for(tmp_path / "b.log", "serving text version 2")
            info = on_b.open_session("text", session_id=sid, resume=True)
            ys.append(on_b.step(sid, 1, SENTENCE[9:])["logits"])
        assert (info.version, info.next_seq) == (2, 1)
        assert np.abs(np.concatenate(ys) - whole_run(repo, "text", 2, x)).max() <= 1e-5
    finally:
        a.stop()
        assert b.stop() == 0, (tmp_path / "b.log").read_text()[-3000:]


def test_a_session_on_a_version_that_failed_to_load_here_is_refused_not_retried(
        repo, redis_server, tmp_path) -> None:
    """A version in the repository whose load failed here (a broken file) is not
    "loading": the resume is refused as a version this server does not serve
    (FAILED_PRECONDITION), not UNAVAILABLE for clients to retry in vain."""
    repo_a, repo_b = tmp_path / "a-models", tmp_path / "b-models"
    shutil.copytree(repo / "text" / "2", repo_a / "text" / "2")
    shutil.copytree(repo / "text" / "1", repo_b / "text" / "1")
    a = serve(repo_a, tmp_path, "a", redis_server.url)
    b = serve(repo_b, tmp_path, "b", redis_server.url, "--repo-poll-s", "0.1")
    try:
        with Client(a.target, timeout=10) as on_a:
            sid = on_a.open_session("text").session_id
            on_a.step(sid, 0, SENTENCE[:9])
        assert a.stop() == 0
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "model.onnx").write_bytes(b"not a model")
        (repo_b / "text").mkdir(exist_ok=True)
        broken.rename(repo_b / "text" / "2")
        wait_for(tmp_path / "b.log", "not loaded")
        with Client(b.target, timeout=10) as on_b:
            code, msg = code_and_message(on_b.open_session, "text", session_id=sid,
                                         resume=True)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, msg
        assert "which this server does not serve" in msg
    finally:
        a.stop()
        assert b.stop() == 0, (tmp_path / "b.log").read_text()[-3000:]
