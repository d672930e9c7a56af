"""Runs in the tritonclient virtualenv (its protobuf pin clashes with grpcio-tools),
never imported by the test suite: ``python triton_driver.py COMMAND ...``.

``descriptors``: tritonclient's own definitions of the Open Inference Protocol
messages and RPCs, as JSON on stdout.
``scenario TARGET IN.npz OUT.npz``: drives a server with tritonclient's gRPC client
and writes what it got (arrays in OUT.npz, the rest as JSON on stdout).
"""

from __future__ import annotations

import json
import queue
import sys

import numpy as np


def describe(fd) -> dict:  # type: ignore[no-untyped-def]
    """The Open Inference Protocol service and messages of a protobuf file descriptor:
    every RPC's types, every field's number, type, label, message type and oneof. The
    test suite applies it to rnnserve's own descriptor too."""

    def fields(md):  # type: ignore[no-untyped-def]
        out = {}
        for f in md.fields:
            out[f.name] = [f.number, f.type, f.is_repeated,
                           f.message_type.full_name if f.message_type else "",
                           f.containing_oneof.name if f.containing_oneof else ""]
        for n in md.nested_types:
            out.update({f"{n.name}.{k}": v for k, v in fields(n).items()})
        return out

    svc = fd.services_by_name["GRPCInferenceService"]
    return {
        "package": fd.package,
        "service": svc.full_name,
        "methods": {m.name: [m.input_type.full_name, m.output_type.full_name,
                             m.client_streaming, m.server_streaming] for m in svc.methods},
        "messages": {name: fields(md) for name, md in fd.message_types_by_name.items()},
    }


def descriptors() -> None:
    from tritonclient.grpc import service_pb2

    print(json.dumps(describe(service_pb2.DESCRIPTOR)))


def scenario(target: str, inp: str, out: str) -> None:
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    data = np.load(inp)
    a, b = data["a"], data["b"]  # two sequences, (1, T, 20) each
    cuts = [int(c) for c in data["cuts"]]  # chunk boundaries along time
    bounds = list(zip([0, *cuts], [*cuts, a.shape[1]], strict=True))
    client = tc.InferenceServerClient(target)
    report: dict[str, object] = {}
    arrays: dict[str, np.ndarray] = {}

    report["live"] = client.is_server_live()
    report["ready"] = client.is_server_ready()
    report["model_ready"] = client.is_model_ready("feat")
    report["unknown_model_ready"] = client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("feat", as_json=True)
    report["metadata"] = meta
    report["server_metadata"] = client.get_server_metadata(as_json=True)

    def inputs(x: np.ndarray) -> list[tc.InferInput]:
        i = tc.InferInput("input", list(x.shape), "FP32")
        i.set_data_from_numpy(x)
        return [i]

    # Two interleaved sequences streamed chunk by chunk: an integer and a string id.
    results: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    sent = 0
    for k, (lo, hi) in enumerate(bounds):
        last = k == len(bounds) - 1
        for name, x, sid in (("a", a, 11), ("b", b, "utterance-b")):
            client.async_stream_infer("feat", inputs(x[:, lo:hi]), request_id=f"{name}-{k}",
                                      sequence_id=sid, sequence_start=k == 0,
                                      sequence_end=last)
            sent += 1
        if k == 1:  # a bad request mid-stream: answered with an error, the stream goes on
            client.async_stream_infer("feat", inputs(a[:, lo:hi]), request_id="bad",
                                      sequence_id=12345)
            sent += 1
    stream_errors = []
    for _ in range(sent):
        result, error = results.get(timeout=60)
        if error is not None:
            stream_errors.append(str(error))
            continue
        rid = result.get_response().id
        arrays[f"stream-{rid}"] = result.as_numpy("logits")
    client.stop_stream()
    report["stream_errors"] = stream_errors

    # Each whole sequence in one request.
    for name, x in (("a", a), ("b", b)):
        r = client.infer("feat", inputs(x), sequence_id=21 if name == "a" else "whole-b",
                         sequence_start=True, sequence_end=True)
        arrays[f"whole-{name}"] = r.as_numpy("logits")
    # Without a sequence: a zero state, nothing kept.
    arrays["stateless-a"] = client.infer("feat", inputs(a)).as_numpy("logits")

    # Synchronous infer chunk by chunk with the sequence parameters.
    parts = []
    for k, (lo, hi) in enumerate(bounds):
        r = client.infer("feat", inputs(a[:, lo:hi]), sequence_id=31, sequence_start=k == 0,
                         sequence_end=k == len(bounds) - 1)
        parts.append(r.as_numpy("logits"))
    arrays["sync-a"] = np.concatenate(parts, axis=1)

    # After its end the sequence is gone: a continuation is refused as Triton does.
    try:
        client.infer("feat", inputs(a[:, :1]), sequence_id=31)
        report["after_end"] = None
    except InferenceServerException as exc:
        report["after_end"] = [exc.status(), exc.message()]

    # Classification extension: top-2 classes per frame.
    r = client.infer("feat", inputs(a[:, :2]),
                     outputs=[tc.InferRequestedOutput("logits", class_count=2)])
    report["classes"] = [v.decode() for v in r.as_numpy("logits").reshape(-1)]

    # The byte-level text model takes a BYTES string per row.
    t = tc.InferInput("input", [1], "BYTES")
    t.set_data_from_numpy(np.array([b"hello"], dtype=object))
    arrays["text-hello"] = client.infer("text", [t], sequence_id=41, sequence_start=True,
                                        sequence_end=True).as_numpy("logits")
    client.close()
    np.savez(out, **arrays)
    print(json.dumps(report))


if __name__ == "__main__":
    if sys.argv[1] == "descriptors":
        descriptors()
    else:
        scenario(*sys.argv[2:5])
