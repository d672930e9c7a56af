"""The compute ceiling on a GPU: the server's own runtime (state pool on the device,
gather and scatter in the run) running full batches of one 40 ms chunk per session back
to back, with and without CUDA graphs, fp32 and fp16. One JSON line per measurement.

    python3 scripts/gpu/ceiling.py MODEL_REPO [SECONDS]

Run by scripts/gpu/check.sh on a lent GPU; DEVICE=cpu rehearses it here (no graphs).
CUDA_SYNC (auto, spin, yield, blocking) sets how the host waits for the card (the
server's --cuda-sync); CEILING_MODELS=speech-small:1,... keeps only those cases.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import numpy as np

from rnnserve.client.bench import runs_back_to_back
from rnnserve.server.runtime import ModelRuntime, RuntimeOptions

CASES = [  # (model, version, batches)
    ("speech-small", 1, (64, 256, 1024, 4096)),
    ("speech-small", 2, (256, 1024, 4096)),  # fp16
    ("speech-tiny", 1, (1024, 4096)),
]


def main() -> int:
    repo = Path(sys.argv[1])
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    device = os.environ.get("DEVICE", "cuda")  # cpu: a rehearsal, without graphs
    sync = os.environ.get("CUDA_SYNC", "auto") if device == "cuda" else "auto"
    only = [c for c in os.environ.get("CEILING_MODELS", "").split(",") if c]
    for name, version, batches in CASES:
        if only and f"{name}:{version}" not in only:
            continue
        path = repo / name / str(version) / "model.onnx"
        if not path.exists():
            continue
        for graphs in (False, True) if device == "cuda" else (False,):
            for batch in batches:
                line = {"model": name, "version": version, "batch": batch,
                        "cuda_graphs": graphs, "cuda_sync": sync}
                try:
                    opts = RuntimeOptions(device="cuda", batch_buckets=(batch,),
                                          cuda_graphs=graphs, pool_rows=2 * batch + 8,
                                          cuda_sync=sync) \
                        if graphs else RuntimeOptions(device=device, cuda_sync=sync)
                    rt = ModelRuntime(path, name, version, opts)
                    line["provider"] = rt.provider
                    line["precision"] = str(rt.meta.export.get("precision", "fp32"))
                    rng = np.random.default_rng(batch)
                    hop = int(rt.meta.input.hop_samples or 160)  # 4 frames: a 40 ms chunk
                    xs = [rng.integers(-3000, 3000, 4 * hop).astype(np.int16)
                          for _ in range(batch)]
                    line.update(runs_back_to_back(rt, xs, seconds, warm_up=3))
                except Exception as exc:  # e.g. onnxruntime refusing CUDA graphs
                    line["error"] = " ".join(traceback.format_exception_only(exc))[-600:]
                print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
