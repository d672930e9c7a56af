"""numpy <-> Open Inference Protocol tensors: the one place that knows its datatypes.

A request's input travels either typed (``InferInputTensor.contents``, the field
named after the datatype) or raw (``ModelInferRequest.raw_input_contents``, one
little-endian byte string per input, in input order). Outputs go out either way.
Every conversion checks the element count against the shape and the values
against the datatype's range, and raises ``TensorError`` (a ValueError) saying
what was expected: nothing is silently truncated, wrapped or reinterpreted.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from rnnserve.protos.inference import grpc_service_pb2 as pb
from rnnserve.protos.tensors import TensorError

# datatype -> (numpy dtype on the wire, typed contents field or None for raw only)
DATATYPES: dict[str, tuple[np.dtype[Any], str | None]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), None),  # the protocol has no typed field for FP16
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
BYTES = "BYTES"
_BY_DTYPE = {dt.newbyteorder("="): name for name, (dt, _) in DATATYPES.items()}
CONTENT_FIELDS = ("bool_contents", "int_contents", "int64_contents", "uint_contents",
                  "uint64_contents", "fp32_contents", "fp64_contents", "bytes_contents")
MAX_ELEMENTS = 1 << 31  # far above any gRPC message; guards the shape arithmetic
MAX_DIMS = 16  # numpy takes 64; inputs have two or three


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The protocol's datatype name of a numpy dtype ("FP32" for float32)."""
    name = _BY_DTYPE.get(dtype.newbyteorder("="))
    if name is None:
        raise TensorError(f"dtype {dtype} has no Open Inference Protocol datatype")
    return name


def _count(name: str, shape: Sequence[int]) -> int:
    if any(d < 0 for d in shape):
        raise TensorError(f"input {name!r}: shape {list(shape)} has a negative dimension; "
                          "a request names every dimension")
    if len(shape) > MAX_DIMS:
        raise TensorError(f"input {name!r}: shape {list(shape)} has {len(shape)} dimensions; "
                          f"at most {MAX_DIMS}")
    n = nonzero = 1
    for d in shape:
        n *= d
        nonzero *= d or 1
    if nonzero > MAX_ELEMENTS:  # [0, 2**62]: no data, yet no array takes that shape
        raise TensorError(f"input {name!r}: shape {list(shape)} has too many elements")
    return n


def decode_bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """BYTES in raw form: each element a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise TensorError(f"input {name!r}: BYTES raw contents end inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, i)
        i += 4
        if i + n > len(raw):
            raise TensorError(f"input {name!r}: BYTES element of {n} bytes runs past the end "
                              "of the raw contents")
        out.append(raw[i:i + n])
        i += n
    return out


def encode_bytes_elements(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_input(t: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    """One request input as a native-endian array (BYTES: an object array of bytes).

    ``raw`` is this input's entry of ``raw_input_contents`` when the request uses the
    raw form, else None and the values come from ``t.contents``.
    """
    shape = tuple(int(d) for d in t.shape)
    n = _count(t.name, shape)
    if raw is not None and t.HasField("contents"):
        raise TensorError(f"input {t.name!r} has both typed contents and raw_input_contents; "
                          "send one")
    if t.datatype == BYTES:
        if raw is not None:
            items = decode_bytes_elements(raw, t.name)
        else:
            _only_field(t, "bytes_contents")
            items = list(t.contents.bytes_contents)
        if len(items) != n:
            raise TensorError(f"input {t.name!r} of shape {list(shape)} needs {n} BYTES "
                              f"elements, got {len(items)}")
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(shape)
    spec = DATATYPES.get(t.datatype)
    if spec is None:
        raise TensorError(f"input {t.name!r}: datatype {t.datatype!r} is not supported; use "
                          f"one of {sorted([*DATATYPES, BYTES])}")
    dtype, field = spec
    if raw is not None:
        if n * dtype.itemsize != len(raw):
            raise TensorError(f"input {t.name!r} of shape {list(shape)} and datatype "
                              f"{t.datatype} needs {n * dtype.itemsize} raw bytes, "
                              f"got {len(raw)}")
        a = np.frombuffer(raw, dtype=dtype)
    else:
        if field is None:
            raise TensorError(f"input {t.name!r}: {t.datatype} values have no typed contents "
                              "field in the protocol; send them in raw_input_contents")
        _only_field(t, field)
        values = getattr(t.contents, field)
        if len(values) != n:
            raise TensorError(f"input {t.name!r} of shape {list(shape)} needs {n} values in "
                              f"contents.{field}, got {len(values)}")
        wide = np.asarray(values)
        if dtype.kind in "iu" and n:
            info = np.iinfo(dtype)
            if wide.min() < info.min or wide.max() > info.max:
                raise TensorError(f"input {t.name!r}: a value of contents.{field} is out of "
                                  f"the {t.datatype} range [{info.min}, {info.max}]")
        a = wide.astype(dtype) if n else np.zeros(0, dtype=dtype)
    return a.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def _only_field(t: pb.ModelInferRequest.InferInputTensor, field: str) -> None:
    others = [f for f in CONTENT_FIELDS if f != field and len(getattr(t.contents, f))]
    if others:
        raise TensorError(f"input {t.name!r} of datatype {t.datatype} carries its values in "
                          f"contents.{others[0]}; they belong in contents.{field}")


def encode_output(name: str, a: np.ndarray, typed: bool
                  ) -> tuple[pb.ModelInferResponse.InferOutputTensor, bytes | None]:
    """An output tensor and, in raw form, its bytes for ``raw_output_contents``.

    ``typed`` asks for the values in ``contents``; datatypes without a typed field
    (FP16) always go raw. An object array is BYTES.
    """
    out = pb.ModelInferResponse.InferOutputTensor(name=name, shape=a.shape)
    if a.dtype == object:
        out.datatype = BYTES
        items = [bytes(x) for x in a.reshape(-1)]
        if typed:
            out.contents.bytes_contents.extend(items)
            return out, None
        return out, encode_bytes_elements(items)
    out.datatype = datatype_of(a.dtype)
    dtype, field = DATATYPES[out.datatype]
    if typed and field is not None:
        getattr(out.contents, field).extend(a.reshape(-1).tolist())
        return out, None
    return out, np.ascontiguousarray(a, dtype=dtype).tobytes()


def parameter_value(p: pb.InferParameter) -> bool | int | str | float | None:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)
