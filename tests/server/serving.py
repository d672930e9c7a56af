"""Start the real ``rnnserve serve`` process on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rnnserve.server.app import RnnServer
from rnnserve.server.settings import Settings


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    grpc_port: int
    metrics_port: int
    log: Path
    workers: list[int] = field(default_factory=list)  # worker pids (--workers N)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def launch_server(repo: Path, log: Path, *flags: str, env: dict[str, str] | None = None,
                  **popen: Any) -> subprocess.Popen[str]:
    """``rnnserve serve`` on 127.0.0.1 with ephemeral ports, its stderr into ``log``,
    without waiting for its ready line (on its stdout). ``flags`` come last (a later
    flag wins: ``--host``, ``--grpc-port`` ...); ``env`` is added to the environment,
    which has no ``RNNSERVE_*`` of the test's own; ``popen`` goes to subprocess.Popen."""
    cmd = [sys.executable, "-m", "rnnserve", "serve", "--repo", str(repo), "--host",
           "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--device", "cpu",
           "--intra-op-threads", "1", *flags]
    base = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    with open(log, "w") as err:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**base, **(env or {})}, **popen)


def start_server(repo: Path, log: Path, *flags: str,
                 env: dict[str, str] | None = None) -> ServerProcess:
    """launch_server, then its ready line read: the server serving."""
    proc = launch_server(repo, log, *flags, env=env)
    deadline = time.monotonic() + 60
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"server did not start: {log.read_text()[-2000:]}")
    ready = json.loads(line)
    return ServerProcess(proc, ready["grpc_port"], ready["metrics_port"], log,
                         ready.get("workers", []))


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``; a name the
    server does not export at all is an error (a misspelt name would read as 0)."""
    total = 0.0
    family = re.sub(r"_(count|sum|bucket|total|info)$", "", name)
    if f"# HELP {name} " not in text and f"# HELP {family} " not in text:
        raise AssertionError(f"the server exports no metric {name!r}")
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


class InProcessServer:
    """An RnnServer on its own event loop in a thread of the test process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.server: RnnServer | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the in-process server did not start in 60 s")
        if self.error is not None:
            raise self.error

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = RnnServer(self.settings)
        try:
            await server.start()
        except BaseException as exc:
            self.error = exc
            self._ready.set()
            raise
        gc.unfreeze()  # start() freezes what it loaded; this process is the test's
        self.server = server
        self._ready.set()
        await self._stop.wait()
        await server.stop()

    @property
    def target(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(30)
