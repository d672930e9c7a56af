"""A model version read, checked and pooled in a process of its own, for a server that
loads it while serving (``serve --repo-poll-s``).

Parsing a model's protobuf and writing the pooled graph hold Python's interpreter lock
for long spells: in the server's process, answers would wait meanwhile (docs/
benchmarks.md, "Loading while serving"). onnxruntime then reads the pooled file with
the lock released (``runtime.Prepared``).

    python -m rnnserve.server.prepare MODEL.onnx OUT.onnx

writes the pooled graph to OUT.onnx and prints one JSON line (the metadata properties
and the opset); a model that cannot be served exits 1 with the reason on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rnnserve.errors import ModelRepositoryError
from rnnserve.server.runtime import Prepared


@contextlib.asynccontextmanager
async def prepared_apart(path: Path) -> AsyncIterator[Prepared]:
    """``path`` prepared by another process, its pooled graph in a temporary folder
    that goes at the end of the block (onnxruntime has read it by then). Raises
    ModelRepositoryError with the child's reason; a cancellation kills the child."""
    folder = Path(tempfile.mkdtemp(prefix="rnnserve-load-"))
    try:
        started = time.perf_counter()
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "rnnserve.server.prepare", str(path),
            str(folder / "pooled.onnx"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await child.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
            raise
        if child.returncode != 0:
            lines = err.decode(errors="replace").strip().splitlines()
            raise ModelRepositoryError(lines[-1] if lines else
                                       f"{path}: preparing it exited {child.returncode}")
        info = json.loads(out)
        yield Prepared(info["props"], info["opset"], folder / "pooled.onnx",
                       time.perf_counter() - started)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str]) -> int:
    from rnnserve.server.runtime import prepare

    src, dst = Path(argv[0]), Path(argv[1])
    try:
        props, opset, model = prepare(src)
        dst.write_bytes(model.SerializeToString())
    except ModelRepositoryError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Exception as exc:  # the metadata's own errors: the reason, not a traceback
        print(f"{src}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"props": props, "opset": opset}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
