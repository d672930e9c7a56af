"""A real Prometheus (Debian's package, installed by scripts/system-deps) for the tests.

It runs the project's own configuration from deploy/monitoring with only the scrape
target, the intervals (1 s, so a test needs seconds, not minutes) and the storage
directory changed, and listens on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `make system-deps` (or apt-get install "
                    "prometheus) brings it; `make test` runs that for you")
    return path


def promtool(*args: str, stdin: str | None = None, cwd: Path = MONITORING
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], input=stdin, cwd=cwd, text=True,
                          capture_output=True, timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant vector result of ``expr`` at time ``at`` (now when None)."""
        data = self.api("query", query=expr, time=at)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def wait_for_scrapes(self, n: int = 2, timeout: float = 30) -> None:
        """Until every target has been scraped ``n`` times (so counters have a baseline)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = [float(s["value"][1]) for s in self.query("count_over_time(up[1m])")]
            if counts and min(counts) >= n:
                return
            time.sleep(0.2)
        raise TimeoutError(f"targets not scraped {n} times in {timeout}s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_prometheus(workdir: Path, targets: list[str]) -> Prometheus:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s",
                            evaluation_interval="1s")
    config["rule_files"] = [str(MONITORING / f) for f in config["rule_files"]]
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": targets}]
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    proc = subprocess.Popen(
        [tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    prom = Prometheus(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as r:
                if r.status == 200:
                    return prom
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            prom.stop()
            raise RuntimeError(f"prometheus did not start: {log.read_text()[-3000:]}")
        time.sleep(0.2)


def dashboard_queries(model: str = ".*", instance: str = ".*",
                      rate_interval: str = "10s") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, variables substituted."""
    board = json.loads((MONITORING / "grafana" / "rnnserve.json").read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            expr = (target["expr"].replace("$__rate_interval", rate_interval)
                    .replace("$model", model).replace("$instance", instance))
            out.append((panel["title"], expr))
    return out
