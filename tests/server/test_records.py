"""The shared store's session records: what ``records.encode`` writes, ``decode`` reads."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rnnserve.server import records
from rnnserve.server.errors import RecordCorrupt
from rnnserve.server.sessions import Answer, HostState, RowAnswer, Session, digest, digest_rows


def _header(data: bytes) -> dict:
    (n,) = struct.unpack_from("<I", data, len(records.MAGIC))
    start = len(records.MAGIC) + 4
    return json.loads(data[start:start + n])


@pytest.mark.parametrize("sid", ["plain", 'quote"back\\slash', "ünïcode-κλειδί", "tab\tnl\n"])
def test_the_header_is_the_json_of_the_session_and_it_round_trips(sid) -> None:
    rng = np.random.default_rng(0)
    state = [rng.standard_normal((2, 8)).astype(np.float32), np.arange(6, dtype=np.int16)]
    session = Session(sid, "m\u00e9", 3, HostState(state), 7, owner='own"er')
    new_state = [a + 1 for a in state]
    for answer in (None,
                   Answer(7, bytes(range(16)), [("y", rng.standard_normal((4, 5)).astype(
                       np.float32)), ("z", np.zeros((0, 2), np.float64))], end=True)):
        for _ in range(2):  # the second time from the cached pieces
            data = records.encode(session, new_state, 8, answer)
            want = {"id": sid, "model": "m\u00e9", "version": 3, "owner": 'own"er',
                    "next_seq": 8, "state": [["float32", [2, 8]], ["int16", [6]]],
                    "answer": None if answer is None else {
                        "seq": 7, "digest": bytes(range(16)).hex(), "end": True,
                        "outputs": [["y", "float32", [4, 5]], ["z", "float64", [0, 2]]]}}
            assert _header(data) == want
            back = records.decode(data, sid)
            assert (back.model, back.version, back.next_seq, back.owner) == \
                ("m\u00e9", 3, 8, 'own"er')
            for got, exp in zip(back.state.arrays, new_state, strict=True):
                assert got.dtype == exp.dtype
                np.testing.assert_array_equal(got, exp)
            if answer is None:
                assert back.answer is None
            else:
                assert back.answer is not None and back.answer.digest == answer.digest
                for (gn, ga), (en, ea) in zip(back.answer.outputs, answer.outputs,
                                              strict=True):
                    assert gn == en
                    np.testing.assert_array_equal(ga, ea)


@pytest.mark.parametrize("order", ["<", ">"])
def test_a_blocks_records_are_each_sessions_own_record_byte_for_byte(order) -> None:
    """``encode_rows`` (a packed block's sessions, written in one commit) gives what
    ``encode`` gives each session, states and outputs in either byte order, strided or
    not; ``digest_rows`` what
    ``digest`` gives each chunk."""
    rng = np.random.default_rng(3)
    n = 5
    states = [rng.standard_normal((n, 2, 8)).astype(f"{order}f4"),
              rng.integers(-9, 9, (n, 6)).astype(f"{order}i2")]
    outs = rng.standard_normal((n, 3, 4)).astype(f"{order}f4").transpose(0, 2, 1)  # strided
    chunks = rng.standard_normal((n, 4, 20)).astype(np.float32)[:, ::2]  # not contiguous
    digests = digest_rows(chunks)
    assert digests == [digest(c) for c in chunks]
    sessions = [Session(f"s{j}", "m", 2, HostState([a[j] for a in states]), 7 + j,
                        owner="o" if j % 2 else "") for j in range(n)]
    answers: list[Answer] = [RowAnswer(7 + j, ["y"], (outs[j].copy(),), None, j == 3,
                                       digests[j]) for j in range(n)]
    for _ in range(2):  # the second time from the cached pieces
        got = records.encode_rows(sessions, states, answers, [outs])
        want = [records.encode(m, [a[j] for a in states], 8 + j, answers[j])
                for j, m in enumerate(sessions)]
        assert got == want
    back = records.decode(got[3], "s3")
    assert back.next_seq == 11 and back.answer is not None and back.answer.end
    np.testing.assert_array_equal(back.state.arrays[0], states[0][3])
    assert records.encode_rows([], states, [], [outs]) == []


def test_a_flipped_byte_anywhere_is_refused() -> None:
    session = Session("s", "m", 1, HostState([np.ones(3, np.float32)]), 1)
    data = records.encode(session)
    for at in range(0, len(data), 7):
        bad = bytearray(data)
        bad[at] ^= 0x40
        with pytest.raises(RecordCorrupt):
            records.decode(bytes(bad), "s")


def _record(header: dict | bytes, payload: bytes = b"") -> bytes:
    import zlib

    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    body = records.MAGIC + struct.pack("<I", len(head)) + head + payload
    return body + struct.pack("<I", zlib.crc32(body))


_BASE = {"id": "s", "model": "m", "version": 1, "owner": "", "next_seq": 0, "answer": None}


_CRAFTED = {
    "state entry not a pair": _record(dict(_BASE, state=[5])),
    "state entry of three": _record(dict(_BASE, state=[["float32", [1], 9]])),
    "dtype a list": _record(dict(_BASE, state=[[["float32"], [1]]])),
    "dimension a bool": _record(dict(_BASE, state=[["float32", [True]]]), b"\0" * 4),
    "dimension a float": _record(dict(_BASE, state=[["float32", [1.0]]]), b"\0" * 4),
    "shape product past int64": _record(dict(_BASE, state=[["float32", [2**32, 2**32]]])),
    "dimension past int64": _record(dict(_BASE, state=[["float32", [2**70]]])),
    "empty but huge": _record(dict(_BASE, state=[["float32", [0, 2**70]]])),
    "65 dimensions": _record(dict(_BASE, state=[["float32", [1] * 65]]), b"\0" * 4),
    "state past the payload": _record(dict(_BASE, state=[["float32", [2]]]), b"\0" * 4),
    "payload past the state": _record(dict(_BASE, state=[["float32", [1]]]), b"\0" * 8),
    "state an object": _record(dict(_BASE, state={"a": 1})),
    "answer a list": _record(dict(_BASE, state=[], answer=[1])),
    "output not a triple": _record(dict(_BASE, state=[], answer={
        "seq": 1, "digest": "00", "end": True, "outputs": [5]})),
    "answer seq infinite": _record(dict(_BASE, state=[], answer={
        "seq": 1e400, "digest": "00", "end": True, "outputs": []})),
    "next_seq a list": _record(dict(_BASE, state=[], next_seq=[1])),
    "version Infinity": _record(b'{"id":"s","model":"m","version":Infinity,"owner":"",'
                                b'"next_seq":0,"state":[],"answer":null}'),
    "next_seq NaN": _record(b'{"id":"s","model":"m","version":1,"next_seq":NaN,'
                            b'"state":[],"answer":null}'),
    "header nested 100k deep": _record(
        b'{"id":"s","model":"m","version":1,"next_seq":0,"answer":null,"state":'
        + b"[" * 100000 + b"]" * 100000 + b"}"),
    "header a list": _record(b"[1, 2]"),
    "header not utf-8": _record(b"\xff\xfe"),
}


@pytest.mark.parametrize("record", list(_CRAFTED.values()), ids=list(_CRAFTED))
def test_a_crafted_record_with_a_valid_checksum_is_refused_as_corrupt(record) -> None:
    with pytest.raises(RecordCorrupt):
        records.decode(record, "s")


def test_the_header_length_cannot_point_past_the_record() -> None:
    import zlib

    body = records.MAGIC + struct.pack("<I", 1 << 30) + b"{}"
    with pytest.raises(RecordCorrupt):
        records.decode(body + struct.pack("<I", zlib.crc32(body)), "s")
