"""fp16 variants of exported models: the recurrent layers and the carried state in half
precision, everything else as exported.

``to_fp16`` rewrites an exported (fp32) graph:

- every ``LSTM``/``GRU`` node gets fp16 weights (W, R, B) and runs in fp16: its data
  and initial-state inputs are cast to fp16, its outputs cast back to fp32 for the
  rest of the graph (embedding, front end, output layer stay fp32, and so do the
  model's data input and outputs: clients see the same interface);
- every recurrent state pair (shaped layers x hidden) becomes fp16 at the interface
  (half the state memory and pool rows, half the bytes in a shared-store record);
  inside the graph the state is cast to fp32 where it enters and back to fp16 where
  it leaves, which is exact because the values come from fp16. Other state pairs (a
  speech model's audio overlap, PCM values up to 32767 where fp16 steps by 32) stay.

The metadata records the state dtype (``float16``) and ``export.precision``; the
verifier then applies the fp16 bounds (``FP16_BOUNDS``) instead of fp32's 1e-5.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rnnserve.errors import ExportError
from rnnserve.export.metadata import ModelMetadata

RECURRENT = ("LSTM", "GRU")
WEIGHTS = (1, 2, 3)  # W, R, B
STATE_INPUTS = {"LSTM": (0, 5, 6), "GRU": (0, 5)}  # X, initial_h [, initial_c]


def _cast(src: str, dst: str, to: int, name: str) -> onnx.NodeProto:
    return helper.make_node("Cast", [src], [dst], to=to, name=name)


def to_fp16(proto: onnx.ModelProto, meta: ModelMetadata) -> tuple[onnx.ModelProto,
                                                                   ModelMetadata]:
    """An fp16 copy of ``proto`` and its metadata (see the module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    converted: dict[str, str] = {}  # fp32 initializer -> its fp16 copy
    recurrent = 0
    for node in graph.node:
        if node.op_type not in RECURRENT:
            nodes.append(node)
            continue
        recurrent += 1
        tag = node.name or f"{node.op_type}_{recurrent}"
        for k in WEIGHTS:
            if k >= len(node.input) or not node.input[k]:
                continue
            name = node.input[k]
            if name not in inits:
                raise ExportError(f"fp16: {node.op_type} weight {name!r} is not an initializer")
            if name not in converted:
                weights = numpy_helper.to_array(inits[name]).astype(np.float16)
                converted[name] = f"{name}_fp16"
                graph.initializer.append(numpy_helper.from_array(weights, converted[name]))
            node.input[k] = converted[name]
        for k in STATE_INPUTS[node.op_type]:
            if k < len(node.input) and node.input[k]:
                half = f"{tag}_in{k}_fp16"
                nodes.append(_cast(node.input[k], half, TensorProto.FLOAT16, f"{tag}_cast_in{k}"))
                node.input[k] = half
        outputs = list(node.output)
        casts = []
        for k, name in enumerate(outputs):
            if name:
                node.output[k] = f"{name}_fp16"
                casts.append(_cast(node.output[k], name, TensorProto.FLOAT, f"{tag}_cast_out{k}"))
        nodes.append(node)
        nodes.extend(casts)
    if not recurrent:
        raise ExportError("fp16: the graph has no LSTM or GRU node")
    used = {n for node in nodes for n in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    # states: fp16 at the interface, fp32 inside (exact: the values are fp16 already)
    recurrent_shape = (meta.num_layers, meta.hidden_size)
    halves = [s for s in meta.states if s.row_shape() == recurrent_shape]
    pairs = {s.input: s for s in halves}
    outs = {s.output for s in halves}
    head: list[onnx.NodeProto] = []
    for vi in graph.input:
        if vi.name in pairs:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
            inside = f"{vi.name}_fp32"
            for node in nodes:
                for k, name in enumerate(node.input):
                    if name == vi.name:
                        node.input[k] = inside
            head.append(_cast(vi.name, inside, TensorProto.FLOAT, f"{vi.name}_to_fp32"))
    tail: list[onnx.NodeProto] = []
    for vo in graph.output:
        if vo.name in outs:
            inside = f"{vo.name}_fp32"
            for node in nodes:
                for k, name in enumerate(node.output):
                    if name == vo.name:
                        node.output[k] = inside
                for k, name in enumerate(node.input):
                    if name == vo.name:
                        node.input[k] = inside
            vo.type.tensor_type.elem_type = TensorProto.FLOAT16
            tail.append(_cast(inside, vo.name, TensorProto.FLOAT16, f"{vo.name}_to_fp16"))
    del graph.node[:]
    graph.node.extend([*head, *nodes, *tail])
    del graph.value_info[:]  # stale element types; onnxruntime infers them again

    states = tuple(replace(s, dtype="float16") if s in halves else s for s in meta.states)
    export = {**meta.export, "precision": "fp16",
              "fp16": f"{recurrent} recurrent layers and their states "
                      f"({', '.join(sorted(pairs))}) in float16; input, front end, output "
                      "layer and outputs float32"}
    return out, replace(meta, states=states, export=export)

