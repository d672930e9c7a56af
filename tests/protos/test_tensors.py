"""numpy <-> wire tensors: every wire dtype round-trips; arrays of the other byte order
or not contiguous travel as little-endian, row-major bytes; other dtypes are refused."""

from __future__ import annotations

import numpy as np
import pytest

from rnnserve.protos.rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.protos.tensors import WIRE, TensorError, fill_tensor, from_tensor, to_tensor


@pytest.mark.parametrize("code", sorted(WIRE))
def test_each_wire_dtype_round_trips(code: int) -> None:
    a = (np.arange(24) * 3 - 20).reshape(2, 3, 4).astype(WIRE[code])
    t = to_tensor(a)
    assert t.dtype == code and list(t.shape) == [2, 3, 4]
    assert t.data == a.astype(WIRE[code].newbyteorder("<")).tobytes()  # little-endian
    back = from_tensor(t)
    assert back.dtype.isnative and np.array_equal(back, a)


def test_other_byte_order_and_strides_travel_as_little_endian_row_major() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    for odd in (a.astype(">f4"), a.T.copy().T, a[:, ::-1][:, ::-1], a.astype(">i8")):
        t = pb.Tensor()
        fill_tensor(t, odd)
        assert list(t.shape) == [3, 4]
        want = np.ascontiguousarray(odd).astype(odd.dtype.newbyteorder("<"))
        assert t.data == want.tobytes()
        assert np.array_equal(from_tensor(t), a)


def test_a_dtype_that_cannot_travel_is_refused() -> None:
    with pytest.raises(TensorError, match="float64 cannot travel"):
        to_tensor(np.zeros(3))
