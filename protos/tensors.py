"""numpy <-> ``rnnserve.v1.Tensor``: the one place that knows the wire dtypes.

Values travel little-endian, row-major. ``from_tensor`` checks that the byte count
matches the shape and dtype and raises ``TensorError`` (a ValueError) saying what
was expected.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb

WIRE: dict[int, np.dtype[Any]] = {
    pb.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    pb.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    pb.DATA_TYPE_UINT8: np.dtype("u1"),
    pb.DATA_TYPE_INT16: np.dtype("<i2"),
    pb.DATA_TYPE_INT32: np.dtype("<i4"),
    pb.DATA_TYPE_INT64: np.dtype("<i8"),
}
BY_NAME: dict[str, int] = {d.name: code for code, d in WIRE.items()}  # "float32" -> code
_CODES = {d.newbyteorder("="): code for code, d in WIRE.items()}
# dtypes whose bytes travel as they are (the wire's byte order is this machine's): the
# per-answer path, a dict look-up instead of a new dtype and a no-op astype
_AS_IS = {d: code for code, d in WIRE.items() if d == d.newbyteorder("=")}
MAX_DIMS = 16  # numpy takes 64; chunks have two or three
MAX_ELEMENTS = 1 << 31  # far above any gRPC message; guards the shape arithmetic


class TensorError(ValueError):
    pass


def _wire(a: np.ndarray) -> tuple[int, bytes]:
    code = _AS_IS.get(a.dtype)
    if code is not None:
        return code, a.tobytes()
    code = _CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise TensorError(f"dtype {a.dtype} cannot travel; use one of {sorted(BY_NAME)}")
    return code, a.astype(WIRE[code], copy=False).tobytes()


def to_tensor(a: np.ndarray) -> pb.Tensor:
    code, data = _wire(a)
    return pb.Tensor(dtype=code, shape=a.shape, data=data)


def fill_tensor(t: pb.Tensor, a: np.ndarray) -> None:
    """Write ``a`` into the empty tensor ``t`` of a message being built, which saves
    copying a finished ``Tensor`` into its parent (a per-chunk cost of answers)."""
    t.dtype, t.data = _wire(a)
    t.shape.extend(a.shape)


def from_tensor(t: pb.Tensor) -> np.ndarray:
    """A native-endian array (a read-only view of the message's bytes where possible)."""
    dtype = WIRE.get(t.dtype)
    if dtype is None:
        name = pb.DataType.Name(t.dtype) if t.dtype in pb.DataType.values() else t.dtype
        raise TensorError(f"tensor dtype {name} is not supported; "
                          f"use one of {[pb.DataType.Name(k) for k in WIRE]}")
    shape = tuple(t.shape)
    if any(d < 0 for d in shape):
        raise TensorError(f"tensor shape {list(shape)} has a negative dimension")
    if len(shape) > MAX_DIMS:
        raise TensorError(f"tensor shape {list(shape)} has {len(shape)} dimensions; at most "
                          f"{MAX_DIMS}")
    n = nonzero = 1  # Python integers: a product that wraps in int64 would pass as 0
    for d in shape:
        n *= d
        nonzero *= d or 1
    if nonzero > MAX_ELEMENTS:  # [2**40, 0]: no data, yet no array takes that shape
        raise TensorError(f"tensor shape {list(shape)} has too many elements")
    if n * dtype.itemsize != len(t.data):
        raise TensorError(f"tensor of shape {list(shape)} and dtype {dtype.name} needs "
                          f"{n * dtype.itemsize} bytes, got {len(t.data)}")
    return np.frombuffer(t.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="),
                                                                   copy=False)
