"""The compute ceiling on a GPU: the server's own runtime (state pool on the device,
gather and scatter in the run) running full batches of one 40 ms chunk per session back
to back, with and without CUDA graphs, fp32 and fp16. One JSON line per measurement.

    python3 scripts/gpu/ceiling.py MODEL_REPO [SECONDS]

Run by scripts/gpu/check.sh on a lent GPU; DEVICE=cpu rehearses it here (no graphs).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from rnnserve.server.runtime import ModelRuntime, RuntimeOptions

CASES = [  # (model, version, batches)
    ("speech-small", 1, (64, 256, 1024, 4096)),
    ("speech-small", 2, (256, 1024, 4096)),  # fp16
    ("speech-tiny", 1, (1024, 4096)),
]


def measure(rt: ModelRuntime, batch: int, seconds: float) -> dict[str, float]:
    rng = np.random.default_rng(batch)
    hop = int(rt.meta.input.hop_samples or 160)
    xs = [rng.integers(-3000, 3000, 4 * hop).astype(np.int16) for _ in range(batch)]
    rows = [[rt.pool.alloc() for _ in range(batch)] for _ in range(2)]
    for k in range(3):  # warm up (and capture, with CUDA graphs)
        rt.run_rows(xs, rows[k % 2], rows[(k + 1) % 2])
    runs, times, started = 0, [], time.perf_counter()
    while time.perf_counter() - started < seconds:
        t = time.perf_counter()
        rt.run_rows(xs, rows[runs % 2], rows[(runs + 1) % 2])
        times.append(time.perf_counter() - t)
        runs += 1
    elapsed = time.perf_counter() - started
    for r in rows[0] + rows[1]:
        rt.pool.free(r)
    return {"runs": runs, "run_ms_median": 1000 * float(np.median(times)),
            "steps_per_s": runs * batch / elapsed,
            "streams_40ms": runs * batch / elapsed * 0.04}


def main() -> int:
    repo = Path(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    device = os.environ.get("DEVICE", "cuda")  # cpu: a rehearsal, without graphs
    for name, version, batches in CASES:
        path = repo / name / str(version) / "model.onnx"
        if not path.exists():
            continue
        for graphs in (False, True) if device == "cuda" else (False,):
            for batch in batches:
                line = {"model": name, "version": version, "batch": batch,
                        "cuda_graphs": graphs}
                try:
                    opts = RuntimeOptions(device="cuda", batch_buckets=(batch,),
                                          cuda_graphs=graphs, pool_rows=2 * batch + 8) \
                        if graphs else RuntimeOptions(device=device)
                    rt = ModelRuntime(path, name, version, opts)
                    line["provider"] = rt.provider
                    line["precision"] = str(rt.meta.export.get("precision", "fp32"))
                    line.update(measure(rt, batch, seconds))
                except Exception as exc:  # e.g. onnxruntime refusing CUDA graphs
                    line["error"] = " ".join(traceback.format_exception_only(exc))[-600:]
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
