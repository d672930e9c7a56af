"""A model version read, checked and pooled in a process of its own, for a server that
loads it while serving (``serve --repo-poll-s``).

Parsing a model's protobuf and writing the pooled graph hold Python's interpreter lock
for long spells: in the server's process, answers would wait meanwhile (docs/
benchmarks.md, "Loading while serving"). onnxruntime then reads the pooled file with
the lock released (``runtime.Prepared``).

    python -m rnnserve.server.prepare MODEL.onnx OUT.onnx

writes the pooled graph to OUT.onnx and prints one JSON line (the metadata properties
and the opset); a model that cannot be served exits 1 with the reason on stderr. When
OUT's folder is a server's (rnnserve-load-PID-*) and that server is no longer this
process's parent (killed mid-load), it removes the folder and exits 3.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from rnnserve.errors import ModelRepositoryError
from rnnserve.server.runtime import Prepared

PREPARE_TIMEOUT_S = 600.0  # a child past this (a hung volume) is killed: the load failed
PREFIX = "rnnserve-load-"  # rnnserve-load-PID-*: the folder of a load by server PID


def sweep_stale(tmp: Path | None = None) -> None:
    """Remove the folders of loads whose server process is gone (killed mid-load: its
    ``finally`` never ran), so that they do not pile up in a pod's /tmp."""
    for folder in Path(tmp or tempfile.gettempdir()).glob(PREFIX + "*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # alive, another user's
            pass


@contextlib.asynccontextmanager
async def prepared_apart(path: Path) -> AsyncIterator[Prepared]:
    """``path`` prepared by another process, its pooled graph in a temporary folder
    that goes at the end of the block (onnxruntime has read it by then). Raises
    ModelRepositoryError with the child's reason, or when it takes longer than
    ``PREPARE_TIMEOUT_S``; a cancellation kills the child."""
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    try:
        started = time.perf_counter()
        # -P: not the working directory first on sys.path (a checkout's rnnserve/
        # would shadow the installed package)
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "rnnserve.server.prepare", str(path),
            str(folder / "pooled.onnx"), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            out, err = await asyncio.wait_for(child.communicate(), PREPARE_TIMEOUT_S)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
            if isinstance(exc, TimeoutError):
                raise ModelRepositoryError(
                    f"{path}: not read and checked within {PREPARE_TIMEOUT_S:.0f}s (the "
                    "process doing it was killed)") from None
            raise
        lines = err.decode(errors="replace").strip().splitlines()
        if child.returncode != 0:
            raise ModelRepositoryError(lines[-1] if lines else
                                       f"{path}: preparing it exited {child.returncode}")
        info = json.loads(out.decode().strip().splitlines()[-1])
        yield Prepared(info["props"], info["opset"], folder / "pooled.onnx",
                       time.perf_counter() - started)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _orphaned(dst: Path) -> bool:
    """Whether the server this load is for (the folder rnnserve-load-PID-*) is gone: a
    worker killed mid-load, whose ``finally`` never runs."""
    name = dst.parent.name
    pid = name[len(PREFIX):].split("-", 1)[0] if name.startswith(PREFIX) else ""
    return pid.isdigit() and os.getppid() != int(pid)


def main(argv: list[str]) -> int:
    from rnnserve.server.runtime import prepare

    src, dst = Path(argv[0]), Path(argv[1])
    gone = f"{src}: the server that asked for it is gone; its folder removed"
    try:
        props, opset, model = prepare(src)
        if _orphaned(dst):  # after the parse (the long part): nothing left behind
            shutil.rmtree(dst.parent, ignore_errors=True)
            print(gone, file=sys.stderr)
            return 3
    except ModelRepositoryError as exc:
        print(exc, file=sys.stderr)
        return 1
    except Exception as exc:  # the metadata's own errors: the reason, not a traceback
        print(f"{src}: {exc}", file=sys.stderr)
        return 1
    try:
        dst.write_bytes(model.SerializeToString())
    except OSError as exc:  # TMPDIR full or not writable: not the model's fault
        print(f"{src}: its prepared graph could not be written to {dst} (TMPDIR): "
              f"{exc.strerror or exc}", file=sys.stderr)
        return 1
    if _orphaned(dst):  # gone while it was written
        shutil.rmtree(dst.parent, ignore_errors=True)
        print(gone, file=sys.stderr)
        return 3
    print(json.dumps({"props": props, "opset": opset}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
