"""The shared store's session records: what ``records.encode`` writes, ``decode`` reads."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from rnnserve.server import records
from rnnserve.server.errors import RecordCorrupt
from rnnserve.server.sessions import Answer, HostState, Session


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


def test_a_flipped_byte_anywhere_is_refused() -> None:
    session = Session("s", "m", 1, HostState([np.ones(3, np.float32)]), 1)
    data = records.encode(session)
    for at in range(0, len(data), 7):
        bad = bytearray(data)
        bad[at] ^= 0x40
        with pytest.raises(RecordCorrupt):
            records.decode(bytes(bad), "s")
