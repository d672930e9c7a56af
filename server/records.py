"""A session as bytes, for the shared store: checked on the way back, never trusted.

Layout (little-endian)::

    b"RNNSREC1"            magic and format version
    u32                    length of the header
    header                 JSON: id, model, version, owner, next_seq,
                           state [[dtype, shape]...],
                           answer (null or seq, digest, end, outputs [[name, dtype, shape]...])
    payload                the state arrays, then the answer's outputs, row-major
    u32                    CRC-32 of everything before it

``decode`` refuses a record that is truncated, damaged or not a session record
(``RecordCorrupt``, DATA_LOSS) or that belongs to another session; ``check`` refuses
one whose model, version or state layout differ from what the server has loaded
(``RecordForeign``, FAILED_PRECONDITION): such a record is never loaded.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

from rnnserve.server.errors import RecordCorrupt, RecordForeign
from rnnserve.server.runtime import ModelRuntime
from rnnserve.server.sessions import Answer, HostState, Session

MAGIC = b"RNNSREC1"
_DTYPES = {"float32", "float16", "float64", "int8", "int16", "int32", "int64", "uint8"}


def encode(session: Session, state: list[np.ndarray] | None = None, next_seq: int | None = None,
           answer: Answer | None = None) -> bytes:
    """The record of ``session``, or of what it becomes with ``state``, ``next_seq`` and
    ``answer`` (a step not yet applied)."""
    state = session.state.arrays if state is None else state
    next_seq = session.next_seq if next_seq is None else next_seq
    answer = session.answer if answer is None else answer
    # On every step's path with a shared store, so the header is put together from
    # JSON pieces cached per session and per array layout; only the numbers and the
    # digest are formatted per step. It parses as the same JSON object as json.dumps
    # would give (a test checks). No copies where the arrays are little-endian already.
    prefix = session.record_prefix or _prefix(session)
    arrays = list(state)
    if answer is None:
        tail = "null"
    else:
        tail = (f'{{"seq":{int(answer.seq)},"digest":"{answer.digest.hex()}",'
                f'"end":{"true" if answer.end else "false"},'
                f'"outputs":{_outputs_spec(answer.outputs)}}}')
        arrays += [a for _, a in answer.outputs]
    head = (f'{prefix}{int(next_seq)},"state":{_state_spec(state)},"answer":{tail}}}'
            ).encode()
    body = b"".join([MAGIC, struct.pack("<I", len(head)), head, *map(_le_bytes, arrays)])
    return body + struct.pack("<I", zlib.crc32(body))


def encode_rows(sessions: list[Session], states: list[np.ndarray],
                answers: list[Answer], outputs: list[np.ndarray]) -> list[bytes]:
    """``encode`` of each of a block's sessions as it becomes with its answer: session j's
    new state is row j of each of ``states`` (sessions, ...), its next seq follows its
    answer's, and its answer's outputs are row j of each of ``outputs``. Byte for byte
    what ``encode`` gives (a test checks), the pieces all rows share (layouts, byte
    order) worked out once and the rows joined as they lie, without a copy each."""
    if not sessions:
        return []
    states = [np.ascontiguousarray(_le(a)) for a in states]
    outputs = [np.ascontiguousarray(_le(a)) for a in outputs]
    state_spec = _state_spec([a[0] for a in states])
    outputs_spec = _outputs_spec(answers[0].outputs)
    magic, pack, crc = MAGIC, struct.pack, zlib.crc32
    out = []
    for session, answer, *rows in zip(sessions, answers, *states, *outputs, strict=True):
        seq = int(answer.seq)
        head = (f'{session.record_prefix or _prefix(session)}{seq + 1},"state":{state_spec},'
                f'"answer":{{"seq":{seq},"digest":"{answer.digest.hex()}",'
                f'"end":{"true" if answer.end else "false"},"outputs":{outputs_spec}}}}}'
                ).encode()
        body = b"".join([magic, pack("<I", len(head)), head, *rows])
        out.append(body + pack("<I", crc(body)))
    return out


def _prefix(session: Session) -> str:
    """The start of a session's header, up to its next seq (cached on the session)."""
    session.record_prefix = (
        f'{{"id":{json.dumps(session.id)},"model":{json.dumps(session.model)},'
        f'"version":{int(session.version)},"owner":{json.dumps(session.owner)},'
        '"next_seq":')
    return session.record_prefix


def _le(a: np.ndarray) -> np.ndarray:
    return a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a


_SPECS: dict[tuple[Any, ...], str] = {}


def _state_spec(state: list[np.ndarray]) -> str:
    key = tuple((a.dtype, a.shape) for a in state)
    spec = _SPECS.get(key)
    if spec is None:
        spec = _SPECS[key] = json.dumps([[_name(a), list(a.shape)] for a in state],
                                        separators=(",", ":"))
    return spec


def _outputs_spec(outputs: list[tuple[str, np.ndarray]]) -> str:
    key = tuple((n, a.dtype, a.shape) for n, a in outputs)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) > 4096:  # chunk lengths vary per request: keep the cache bounded
            _SPECS.clear()
        spec = _SPECS[key] = json.dumps([[n, _name(a), list(a.shape)] for n, a in outputs],
                                        separators=(",", ":"))
    return spec


_NAMES: dict[np.dtype[Any], str] = {}


def _name(a: np.ndarray) -> str:
    name = _NAMES.get(a.dtype)
    if name is None:
        name = _NAMES[a.dtype] = a.dtype.name
    return name


def _le_bytes(a: np.ndarray) -> bytes:
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a.tobytes()


def _corrupt(session_id: str, why: str) -> RecordCorrupt:
    return RecordCorrupt(f"the stored record of session {session_id!r} is {why}; it was not "
                         "loaded (open a new session)")


_MAX_DIMS = 32  # numpy's limit before 2.0
_MAX_INT = 2**63  # numbers in a header are below it (int64), and so is every array's size


def _int(value: Any, what: str, session_id: str) -> int:
    if type(value) is not int or not 0 <= value < _MAX_INT:  # no bool, float, inf or nan
        raise _corrupt(session_id, f"damaged (header: bad {what})")
    return value


def _array(spec: Any, buf: memoryview, at: int, session_id: str) -> tuple[np.ndarray, int]:
    """The array that ``spec`` ([dtype, shape]) describes at ``at`` in ``buf``; a spec that
    is not exactly that, or a size that the bytes left do not hold, is corrupt."""
    if type(spec) is not list or len(spec) != 2:
        raise _corrupt(session_id, "damaged (bad array description)")
    dtype_name, shape = spec
    if type(dtype_name) is not str or dtype_name not in _DTYPES or \
            type(shape) is not list or len(shape) > _MAX_DIMS or \
            not all(type(d) is int and 0 <= d < _MAX_INT for d in shape):
        raise _corrupt(session_id, "damaged (bad array description)")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    count = bound = 1
    for d in shape:  # Python ints: no overflow; numpy refuses sizes past int64, zeros aside
        count *= d
        bound *= max(d, 1)
    if bound * dtype.itemsize >= _MAX_INT:
        raise _corrupt(session_id, "damaged (bad array description)")
    n = count * dtype.itemsize
    if at + n > len(buf):
        raise _corrupt(session_id, "truncated")
    a = np.frombuffer(buf[at:at + n], dtype=dtype).reshape(shape)
    return a.astype(dtype.newbyteorder("="), copy=True), at + n


def decode(data: bytes, session_id: str) -> Session:
    """The session stored in ``data``; raises RecordCorrupt or RecordForeign."""
    if len(data) < len(MAGIC) + 8:
        raise _corrupt(session_id, "truncated")
    if not data.startswith(MAGIC):
        raise _corrupt(session_id, "not an rnnserve session record (or of another format)")
    body, (crc,) = data[:-4], struct.unpack("<I", data[-4:])
    if zlib.crc32(body) != crc:
        raise _corrupt(session_id, "damaged or truncated (checksum mismatch)")
    (n,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(body):
        raise _corrupt(session_id, "truncated")
    try:
        h = json.loads(body[start:start + n])
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
        raise _corrupt(session_id, f"damaged (header: {exc.__class__.__name__})") from None
    if type(h) is not dict or not {"id", "model", "version", "next_seq", "state",
                                   "answer"} <= h.keys():
        raise _corrupt(session_id, "damaged (header: not a session's)")
    record_id, model, owner = h["id"], h["model"], h.get("owner", "")
    if not (type(record_id) is str and type(model) is str and type(owner) is str):
        raise _corrupt(session_id, "damaged (header: bad id, model or owner)")
    version = _int(h["version"], "version", session_id)
    next_seq = _int(h["next_seq"], "next_seq", session_id)
    state_specs, ans = h["state"], h["answer"]
    if type(state_specs) is not list:
        raise _corrupt(session_id, "damaged (header: bad state)")
    if record_id != session_id:
        raise RecordForeign(f"the stored record under session {session_id!r} belongs to "
                            f"session {record_id!r}; it was not loaded")
    buf, at = memoryview(body), start + n
    state = []
    for spec in state_specs:
        a, at = _array(spec, buf, at, session_id)
        state.append(a)
    answer = None
    if ans is not None:
        if type(ans) is not dict or type(ans.get("outputs")) is not list or \
                type(ans.get("digest")) is not str or type(ans.get("end")) is not bool:
            raise _corrupt(session_id, "damaged (answer: not an answer)")
        seq = _int(ans.get("seq"), "answer seq", session_id)
        try:
            digest = bytes.fromhex(ans["digest"])
        except ValueError:
            raise _corrupt(session_id, "damaged (answer: bad digest)") from None
        outputs = []
        for out in ans["outputs"]:
            if type(out) is not list or len(out) != 3 or type(out[0]) is not str:
                raise _corrupt(session_id, "damaged (answer: bad output)")
            a, at = _array(out[1:], buf, at, session_id)
            outputs.append((out[0], a))
        answer = Answer(seq, digest, outputs, ans["end"])
    if at != len(body):
        raise _corrupt(session_id, "damaged (payload length)")
    return Session(session_id, model, version, HostState(state), next_seq, answer=answer,
                   owner=owner)


def check(session: Session, runtime: ModelRuntime) -> None:
    """Refuse a record that the loaded model cannot continue."""
    if (session.model, session.version) != (runtime.name, runtime.version):
        raise RecordForeign(f"the stored record of session {session.id!r} is for model "
                            f"{session.model!r} version {session.version}, not {runtime.name!r} "
                            f"version {runtime.version}; it was not loaded")
    want = [(a.dtype, a.shape) for a in runtime.zero_state()]
    got = [(a.dtype, a.shape) for a in session.state.arrays]
    if got != want:
        raise RecordForeign(f"the stored record of session {session.id!r} holds a state of "
                            f"{[(str(d), list(s)) for d, s in got]}, but model "
                            f"{runtime.name!r} version {runtime.version} needs "
                            f"{[(str(d), list(s)) for d, s in want]}; it was not loaded")
    if session.answer is not None:
        names = {n for n, _ in session.answer.outputs}
        if not names <= set(runtime.data_output_names):
            raise RecordForeign(f"the stored record of session {session.id!r} answers with "
                                f"outputs {sorted(names)} that model {runtime.name!r} lacks")
