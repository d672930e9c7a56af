"""The metadata parser refuses what a server could not use, with a message (torch-free)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rnnserve.errors import ModelMetadataError
from rnnserve.export.metadata import InputSpec, ModelMetadata, OutputSpec, StatePair


def _meta(**state: object) -> ModelMetadata:
    return ModelMetadata(
        name="m", arch="gru", task="text",
        input=InputSpec("input", "uint8", ("batch", "time"), "utf8_bytes"),
        outputs=(OutputSpec("logits", "float32", ("batch", "time", 4)),),
        states=(StatePair("h_in", "h_out", ("batch", 1, 4), **state),),  # type: ignore[arg-type]
        num_layers=1, hidden_size=4)


def test_state_dtypes_round_trip() -> None:
    for dtype in ("float32", "float16"):
        meta = _meta(dtype=dtype)
        assert ModelMetadata.from_props(meta.to_props()) == replace(meta, rnnserve_version="")


@pytest.mark.parametrize("dtype", ["bfloat16", "float", ""])
def test_a_state_dtype_outside_the_format_is_refused(dtype) -> None:
    # the server makes its state pools with np.dtype(state.dtype): 'bfloat16' raised
    # TypeError at load, 'float' made float64 pools for a float32 graph
    with pytest.raises(ModelMetadataError, match=f"state h_in: dtype {dtype!r}"):
        ModelMetadata.from_props(_meta(dtype=dtype).to_props())
