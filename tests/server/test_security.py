"""TLS, mutual TLS and bearer tokens on a real server, with certificates made by the
test (openssl): who is refused, with which status, and that health stays open."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnserve.client import Client
from rnnserve.protos.inference import grpc_service_pb2 as oip
from rnnserve.protos.inference import grpc_service_pb2_grpc as oip_grpc

from .serving import metric_value, start_server

TOKEN = "s3cret-token-0123456789"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN={ca}", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, ca, ext in (("server", "ca", ["-extfile", "san.ext"]), ("client", "ca", []),
                          ("rogue", "rogue-ca", [])):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", *ext, cwd=d)
    return d


def works(client: Client) -> bool:
    try:
        sid = client.open_session("feat").session_id
        client.step(sid, 0, np.zeros((2, 20), dtype=np.float32), end=True)
        return True
    except grpc.RpcError:
        return False


def test_tls_serves_tls_clients_only(repo, pki, tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--tls-cert-file", str(pki / "server.pem"),
                       "--tls-key-file", str(pki / "server.key"))
    try:
        ca = (pki / "ca.pem").read_bytes()
        with Client(srv.target, timeout=5, root_certificates=ca) as client:
            assert works(client)
        with Client(srv.target, timeout=5) as plaintext:
            with pytest.raises(grpc.RpcError) as info:
                plaintext.open_session("feat")
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        rogue = (pki / "rogue-ca.pem").read_bytes()  # the client does not trust the server
        with Client(srv.target, timeout=5, root_certificates=rogue) as client:
            assert not works(client)
    finally:
        assert srv.stop() == 0
    assert "gRPC over TLS" in (tmp_path / "s.log").read_text()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(repo, pki,
                                                                      tmp_path) -> None:
    srv = start_server(repo, tmp_path / "s.log", "--tls-cert-file", str(pki / "server.pem"),
                       "--tls-key-file", str(pki / "server.key"),
                       "--tls-client-ca-file", str(pki / "ca.pem"))
    ca = (pki / "ca.pem").read_bytes()
    try:
        with Client(srv.target, timeout=5, root_certificates=ca,
                    private_key=(pki / "client.key").read_bytes(),
                    certificate_chain=(pki / "client.pem").read_bytes()) as client:
            assert works(client)
        with Client(srv.target, timeout=5, root_certificates=ca) as no_cert:
            assert not works(no_cert)
        with Client(srv.target, timeout=5, root_certificates=ca,
                    private_key=(pki / "rogue.key").read_bytes(),
                    certificate_chain=(pki / "rogue.pem").read_bytes()) as rogue:
            assert not works(rogue)
    finally:
        assert srv.stop() == 0


def test_the_stream_command_reaches_a_server_with_mutual_tls_and_tokens(repo, pki,
                                                                       tmp_path) -> None:
    """`rnnserve stream` takes the CA, the client's certificate and a token (from a file
    or $RNNSERVE_TOKEN, never the command line); without the token it says
    UNAUTHENTICATED in one line."""
    import os
    import subprocess
    import sys

    from ..cli.test_cli import assert_one_line_error, rnnserve

    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n")
    srv = start_server(repo, tmp_path / "s.log", "--tls-cert-file", str(pki / "server.pem"),
                       "--tls-key-file", str(pki / "server.key"),
                       "--tls-client-ca-file", str(pki / "ca.pem"), "--tokens-file",
                       str(tokens))
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "in.txt").write_text("hello, streaming world")
    tls = ["--tls-ca-file", str(pki / "ca.pem"), "--tls-cert-file", str(pki / "client.pem"),
           "--tls-key-file", str(pki / "client.key")]
    command = ["stream", str(tmp_path / "in.txt"), "--model", "text", "--server",
               srv.target, *tls]
    try:
        ok = rnnserve(*command, "--token-file", str(tmp_path / "token"), timeout=120)
        assert ok.returncode == 0, ok.stderr
        assert "bits per byte" in ok.stdout
        env = {**os.environ, "RNNSERVE_TOKEN": TOKEN}
        by_env = subprocess.run([sys.executable, "-m", "rnnserve", *command],
                                capture_output=True, text=True, env=env, timeout=120)
        assert by_env.returncode == 0, by_env.stderr
        assert_one_line_error(rnnserve(*command, timeout=120), "UNAUTHENTICATED")
        assert_one_line_error(rnnserve(*command[:-2], timeout=120), "go together")
    finally:
        assert srv.stop() == 0


def test_bearer_tokens_guard_both_apis_but_not_health(repo, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# token principal\n{TOKEN} alice\n{'x' * 20} bob\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens))
    try:
        with Client(srv.target, timeout=5, token=TOKEN) as client:
            assert works(client)
        for token in (None, "wrong-token-0123456789", TOKEN[:-1]):
            with Client(srv.target, timeout=5, token=token) as client:
                with pytest.raises(grpc.RpcError) as info:
                    client.open_session("feat")
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "bearer token" in info.value.details()
        with grpc.insecure_channel(srv.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ServerMetadata(oip.ServerMetadataRequest())
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            meta = stub.ServerMetadata(oip.ServerMetadataRequest(),
                                       metadata=(("authorization", f"Bearer {TOKEN}"),))
            assert meta.name == "rnnserve"
            with pytest.raises(grpc.RpcError) as info:  # streams are refused too
                list(stub.ModelStreamInfer(iter([oip.ModelInferRequest(model_name="feat")])))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel)  # probes carry no token
            assert health.Check(health_pb2.HealthCheckRequest()).status == \
                health_pb2.HealthCheckResponse.SERVING
        text = srv.metrics()
        assert metric_value(text, "rnnserve_requests_total", code="UNAUTHENTICATED") >= 5
    finally:
        assert srv.stop() == 0


def test_bad_security_settings_fail_at_start_with_one_line(repo, tmp_path) -> None:
    short = tmp_path / "short"
    short.write_text("tooshort alice\n")
    twice = tmp_path / "twice"
    twice.write_text(f"{TOKEN} alice\n{TOKEN} bob\n")
    for flags, needle in [
        (["--tls-cert-file", str(tmp_path / "c.pem")], "tls_cert_file and tls_key_file"),
        (["--tls-client-ca-file", str(tmp_path / "ca.pem")], "needs tls_cert_file"),
        (["--tokens-file", str(short)], "at least 16 characters"),
        (["--tokens-file", str(twice)], "listed twice (lines 1 and 2)"),
        (["--tokens-file", str(tmp_path / "missing")], "cannot read the tokens file"),
    ]:
        with pytest.raises(RuntimeError) as info:
            start_server(repo, tmp_path / "bad.log", *flags)
        assert needle in str(info.value), str(info.value)


def test_a_session_belongs_to_the_principal_that_opened_it(repo, tmp_path) -> None:
    """Bob cannot step, resume or close Alice's session; Alice's outputs are as if Bob
    never tried."""
    bob_token = "bob-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n{bob_token} bob\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens))
    x = np.random.default_rng(7).standard_normal((6, 20)).astype(np.float32)
    denied = grpc.StatusCode.PERMISSION_DENIED
    try:
        with Client(srv.target, timeout=5, token=TOKEN) as alice, \
                Client(srv.target, timeout=5, token=bob_token) as bob:
            sid = alice.open_session("feat").session_id
            a = alice.step(sid, 0, x[:3])["logits"]
            for call in (lambda: bob.step(sid, 1, x[3:]),
                         lambda: bob.open_session("feat", session_id=sid, resume=True),
                         lambda: bob.close_session(sid)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == denied, info.value.details()
                assert "belongs to another principal" in info.value.details()
            b = alice.step(sid, 1, x[3:], end=True)["logits"]
            with Client(srv.target, timeout=5, token=TOKEN) as again:
                alone = again.open_session("feat").session_id
                want = np.concatenate([again.step(alone, 0, x[:3])["logits"],
                                       again.step(alone, 1, x[3:], end=True)["logits"]])
            assert np.array_equal(np.concatenate([a, b]), want)
    finally:
        assert srv.stop() == 0


def test_each_principal_has_sequence_ids_of_its_own(repo, tmp_path) -> None:
    """Open Inference Protocol sequence ids are scoped per principal: Alice and Bob both
    run sequence 1 of the same model, interleaved, each exactly as if alone. Bob cannot
    continue Alice's sequence (he has none of that id, and is told nothing of hers: not
    its version), nor reach it by its session id on the native API, nor open that id
    first; a principal whose name holds '@' cannot meet another's ids."""
    from ..oip.test_protocol import logits, request

    bob_token, odd_token = "bob-token-0123456789", "odd-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n{bob_token} bob\n{odd_token} alice@bob\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens))
    rng = np.random.default_rng(8)
    xa, xb = (rng.standard_normal((6, 20)).astype(np.float32) for _ in range(2))
    try:
        with grpc.insecure_channel(srv.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            as_alice = (("authorization", f"Bearer {TOKEN}"),)
            as_bob = (("authorization", f"Bearer {bob_token}"),)
            as_odd = (("authorization", f"Bearer {odd_token}"),)

            def whole(x: np.ndarray) -> np.ndarray:  # sequence 9 of its own, alone
                return np.concatenate([logits(stub.ModelInfer(
                    request(x[None, i:i + 2], sequence_id=9, sequence_start=i == 0,
                            sequence_end=i == 4), metadata=as_alice)) for i in (0, 2, 4)],
                    axis=1)[0]

            want_a, want_b = whole(xa), whole(xb)
            # both run sequence 1, interleaved; Bob's ends, Alice's goes on
            got: dict[str, list[np.ndarray]] = {"a": [], "b": []}
            for i in (0, 2, 4):
                for who, x, meta in (("a", xa, as_alice), ("b", xb, as_bob)):
                    got[who].append(logits(stub.ModelInfer(
                        request(x[None, i:i + 2], sequence_id=1, sequence_start=i == 0,
                                sequence_end=i == 4 and who == "b"), metadata=meta)))
            np.testing.assert_array_equal(np.concatenate(got["a"], axis=1)[0], want_a)
            np.testing.assert_array_equal(np.concatenate(got["b"], axis=1)[0], want_b)
            # Bob continuing Alice's text sequence 5 finds none of his own and is told
            # nothing of hers (not even the version it runs on)
            text = np.frombuffer(b"abcdef", np.uint8)[None]
            stub.ModelInfer(request(text, "text", datatype="UINT8", version="1",
                                    sequence_id=5, sequence_start=True), metadata=as_alice)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request(text, "text", datatype="UINT8", version="2",
                                        sequence_id=5), metadata=as_bob)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "must specify the START flag" in info.value.details()
            assert "runs on version" not in info.value.details()
            # "alice@bob"'s sequence "x" and Bob's sequence "x@alice" would both be
            # feat/x@alice@bob unescaped: each starts from a zero state, alone
            # (the second start would have met the first's owner: PERMISSION_DENIED)
            pairs = (("x", as_odd), ("x@alice", as_bob))
            firsts = [logits(stub.ModelInfer(request(xb[None, :2], sequence_id=label,
                                                     sequence_start=True), metadata=meta))
                      for label, meta in pairs]
            for first, (label, meta) in zip(firsts, pairs, strict=True):
                nxt = logits(stub.ModelInfer(request(xb[None, 2:4], sequence_id=label),
                                             metadata=meta))
                np.testing.assert_array_equal(np.concatenate([first, nxt], axis=1)[0],
                                              want_b[:4])
        with Client(srv.target, timeout=5, token=bob_token) as bob, \
                Client(srv.target, timeout=5, token=TOKEN) as alice:
            with pytest.raises(grpc.RpcError) as info:
                bob.step("feat/1@alice", 3, xa[:1])
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # Alice's sequence is hers on the native API too, and went on untouched
            tail = alice.step("feat/1@alice", 3, xa[:1], end=True)["logits"]
            with Client(srv.target, timeout=5, token=TOKEN) as again:
                sid = again.open_session("feat").session_id
                for k in range(3):
                    again.step(sid, k, xa[2 * k:2 * k + 2])
                expect = again.step(sid, 3, xa[:1], end=True)["logits"]
            np.testing.assert_array_equal(tail, expect)
            # nor can Alice take Bob's sequence ids ahead of him on the native API (they
            # are numbered: she could hold his sequence 7 for as long as she liked);
            # ids of her own of that form are hers to open; a model not served counts
            # too (it may be added while serving: serve --repo-poll-s)
            for taken in ("feat/7@bob", "later/7@bob"):
                with pytest.raises(grpc.RpcError) as info:
                    alice.open_session("feat", session_id=taken)
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "another principal's Open Inference Protocol sequence" in \
                    info.value.details()
            alice.close_session(alice.open_session("feat", session_id="feat/7@alice")
                                .session_id)
            alice.close_session(alice.open_session("feat", session_id="/7@bob").session_id)
            with grpc.insecure_channel(srv.target) as channel:
                first = logits(oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                    request(xb[None, :2], sequence_id=7, sequence_start=True,
                            sequence_end=True), metadata=as_bob))
            np.testing.assert_array_equal(first[0], want_b[:2])
    finally:
        assert srv.stop() == 0


def test_an_unnamed_tokens_principal_comes_from_the_token_not_its_line(tmp_path) -> None:
    """An unnamed token's principal is derived from the token: it cannot be named
    explicitly by accident ('token2') and stays the same when lines are added above it
    (the shared store keeps owners by name across restarts)."""
    import hashlib

    from rnnserve.server.auth import load_tokens

    bob = "bob-secret-11111111111"
    bob_name = "token-" + hashlib.sha256(bob.encode()).hexdigest()[:12]
    before, after = tmp_path / "before", tmp_path / "after"
    before.write_text(f"{TOKEN} token2\n{bob}\n")
    after.write_text(f"# rotated\n\n{TOKEN} token2\ncarol-secret-2222222222\n{bob}\n")
    assert load_tokens(before) == [(TOKEN.encode(), "token2"), (bob.encode(), bob_name)]
    assert dict(load_tokens(after))[bob.encode()] == bob_name
    names = [who for _, who in load_tokens(after)]
    assert len(set(names)) == 3


def test_a_token_listed_twice_is_refused_naming_the_lines_not_the_token(tmp_path) -> None:
    from rnnserve.errors import UsageError
    from rnnserve.server.auth import load_tokens

    same = "same-token-0000000000"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{same} alice\n{TOKEN} carol\n{same} bob\n")
    with pytest.raises(UsageError) as info:
        load_tokens(tokens)
    assert "lines 1 and 3" in str(info.value) and same not in str(info.value)
    # several tokens for one principal (rotation) stay allowed
    tokens.write_text(f"{same} alice\n{TOKEN} alice\n")
    assert [who for _, who in load_tokens(tokens)] == ["alice", "alice"]


def test_a_hash_starts_a_comment_only_at_a_line_start_or_after_whitespace(tmp_path) -> None:
    from rnnserve.server.auth import TokenAuth, load_tokens

    tokens = tmp_path / "tokens"
    tokens.write_text("0123456789abcdef#Zq9!longer alice\n"
                      "   # an indented comment\n"
                      f"{TOKEN} bob # bob's, since May\n"
                      f"{'x' * 20}\t#no principal here\n"
                      f"{'y' * 20} carol#2\n")
    assert load_tokens(tokens)[:2] == [(b"0123456789abcdef#Zq9!longer", "alice"),
                                       (TOKEN.encode(), "bob")]
    assert load_tokens(tokens)[2][1].startswith("token-")
    assert load_tokens(tokens)[3][1] == "carol#2"
    auth = TokenAuth(load_tokens(tokens))
    assert auth._match(b"0123456789abcdef") is None
    assert auth._match(b"0123456789abcdef#Zq9!longer") == "alice"


def test_an_explicit_principal_named_like_a_line_cannot_reach_an_unnamed_tokens_session(
        repo, tmp_path) -> None:
    bob_token = "bob-secret-11111111111"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} token2\n{bob_token}\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens))
    x = np.random.default_rng(1).standard_normal((6, 20)).astype(np.float32)
    try:
        with Client(srv.target, timeout=5, token=TOKEN) as alice, \
                Client(srv.target, timeout=5, token=bob_token) as bob:
            sid = bob.open_session("feat").session_id
            bob.step(sid, 0, x[:3])
            with pytest.raises(grpc.RpcError) as info:
                alice.step(sid, 1, x[3:])
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            bob.step(sid, 1, x[3:], end=True)
    finally:
        assert srv.stop() == 0


def test_a_packed_request_steps_only_its_principals_sessions(repo, tmp_path) -> None:
    """Bob's packed request naming Alice's session beside his own: hers is refused
    (PERMISSION_DENIED) and unchanged, his is answered."""
    import asyncio

    from rnnserve.client import AsyncClient, packed_request

    bob_token = "bob-token-0123456789"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN} alice\n{bob_token} bob\n")
    srv = start_server(repo, tmp_path / "s.log", "--tokens-file", str(tokens))
    x = np.random.default_rng(8).standard_normal((2, 6, 20)).astype(np.float32)

    async def main() -> np.ndarray:
        async with AsyncClient(srv.target, timeout=10, token=TOKEN) as alice, \
                AsyncClient(srv.target, timeout=10, token=bob_token) as bob, \
                alice.packed() as pa, bob.packed() as pb_:
            first = await pa.send(packed_request("feat", ["a"], [0], x[:1, :3], opens=[0]))
            mixed = await pb_.send(packed_request("feat", ["a", "b"], [1, 0], x[:, :3],
                                                  opens=[1]))
            assert list(mixed.failures) == [0], mixed.failures
            code, message, _ = mixed.failures[0]
            assert code == grpc.StatusCode.PERMISSION_DENIED and \
                "belongs to another principal" in message
            rest = await pa.send(packed_request("feat", ["a"], [1], x[:1, 3:], ends=[0]))
            assert not rest.failures, rest.failures
            return np.concatenate([first.outputs["logits"][0], rest.outputs["logits"][0]])

    try:
        y = asyncio.run(main())
        with Client(srv.target, timeout=5, token=TOKEN) as again:
            alone = again.open_session("feat").session_id
            want = np.concatenate([again.step(alone, 0, x[0, :3])["logits"],
                                   again.step(alone, 1, x[0, 3:], end=True)["logits"]])
        assert np.array_equal(y, want)
    finally:
        assert srv.stop() == 0
