"""Where a batch's time goes on the device: onnxruntime's profile of the server's runtime
(speech-small, pool on the device), node time summed by provider and op type.

    python3 scripts/gpu/profile_ops.py MODEL_REPO [BATCH] [VERSION]   (no CUDA graphs)
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort

import rnnserve.server.runtime as runtime
from rnnserve.client.bench import runs_back_to_back


def main() -> int:
    repo, batch = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    version = int(sys.argv[3]) if len(sys.argv) > 3 else 1  # the kit's 2: fp16
    plain = ort.SessionOptions

    def profiled() -> ort.SessionOptions:
        so = plain()
        so.enable_profiling = True
        so.profile_file_prefix = "/tmp/rnnserve-prof"
        return so

    runtime.ort.SessionOptions = profiled  # type: ignore[misc]
    rt = runtime.ModelRuntime(repo / "speech-small" / str(version) / "model.onnx",
                              "speech-small", version, runtime.RuntimeOptions(device="cuda"))
    rng = np.random.default_rng(0)
    xs = [rng.integers(-3000, 3000, 640).astype(np.int16) for _ in range(batch)]
    print(json.dumps(runs_back_to_back(rt, xs, 1.0, warm_up=3)))
    events = json.loads(Path(rt.session.end_profiling()).read_text())
    by = collections.Counter()
    runs = sum(1 for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            a = e.get("args", {})
            by[(a.get("provider", "?"), a.get("op_name", "?"))] += e["dur"]
    total = sum(by.values())
    print(f"runs {runs}; node time per run {total / max(runs, 1):.0f} us")
    for (prov, op), us in by.most_common(25):
        print(f"{prov:28s} {op:24s} {us / max(runs, 1):9.1f} us/run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
