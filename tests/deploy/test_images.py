"""The container images' recipes: their install steps run here in a fresh virtual
environment (no container engine on this machine), and what they declare agrees
with the server's code and the package's dependencies."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rnnserve.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = ("Dockerfile", "Dockerfile.cuda")
VENV = "/opt/rnnserve"


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (DOCKER / dockerfile).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stage(dockerfile: str, name: str) -> list[tuple[str, str]]:
    """The instructions of the stage ``FROM ... AS name``."""
    steps, current = [], None
    for word, rest in instructions(dockerfile):
        if word == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else None
            continue
        if current == name:
            steps.append((word, rest))
    return steps


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md", "deploy/docker/Dockerfile"])
def test_documented_default_builds_make_the_models_first(doc) -> None:
    """The default target bakes ./models in, which git ignores: a fresh clone has none,
    and a `docker build` of it as documented fails unless `make models` came first."""
    assert re.search(r"^models/$", (ROOT / ".gitignore").read_text(), re.M)
    assert re.search(r"^models:", (ROOT / "Makefile").read_text(), re.M)
    lines = [re.sub(r"^#\s*", "", line.strip())
             for line in (ROOT / doc).read_text().splitlines()]
    builds = [i for i, line in enumerate(lines)
              if line.startswith("docker build") and "--target server " not in line]
    assert builds, doc
    for i in builds:
        # in the same block of commands: no blank line between
        block = lines[:i][::-1]
        block = block[:block.index("")] if "" in block else block
        assert any(line.startswith("make models") for line in block), (doc, lines[i])


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_image_declares_what_the_server_uses(dockerfile) -> None:
    server = stage(dockerfile, "server")
    words = dict(server)
    defaults = Settings.load()
    assert words["EXPOSE"].split() == [str(defaults.grpc_port), str(defaults.metrics_port)]
    assert json.loads(words["ENTRYPOINT"]) == ["rnnserve", "serve"]  # exec form: PID 1
    assert re.fullmatch(r"\d+:\d+", words["USER"]) and not words["USER"].startswith("0:")
    env = dict(re.findall(r"(\w+)=(\S+)", words["ENV"]))
    for key in env:
        if key.startswith("RNNSERVE_"):
            assert key[9:].lower() in Settings.model_fields, key
    assert env["RNNSERVE_REPO"] == "/models"
    assert env["RNNSERVE_DEVICE"] == ("cuda" if dockerfile.endswith("cuda") else "cpu")
    # no torch, no training extra, in a serving image
    build = " ".join(rest for _, rest in stage(dockerfile, "build"))
    assert "torch" not in build and "[train" not in build
    models = stage(dockerfile, "server-with-models")
    assert ("COPY", "--chown=10001:10001 models /models") in models
    # everything the build copies gets past the .dockerignore
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().split()
    for word, rest in stage(dockerfile, "build"):
        if word == "COPY":
            for src in rest.split()[:-1]:
                assert f"!{src}/" in ignore or f"!{src}" in ignore, src


def test_cuda_image_pins_the_onnxruntime_gpu_its_base_was_checked_against() -> None:
    """The CUDA provider needs the CUDA and cuDNN majors of one onnxruntime-gpu release:
    the image installs exactly that release, not whatever is newest at build time."""
    args = dict(rest.split("=", 1) for word, rest in instructions("Dockerfile.cuda")
                if word == "ARG" and "=" in rest)
    version = args["ONNXRUNTIME_GPU"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), version
    build = stage("Dockerfile.cuda", "build")
    assert ("ARG", "ONNXRUNTIME_GPU") in build  # a global ARG is not seen inside a stage
    installs = [rest for word, rest in build if word == "RUN" and "pip install" in rest]
    assert installs and all('"onnxruntime-gpu==${ONNXRUNTIME_GPU}"' in r for r in installs)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (bound,) = [d.split(";")[0].strip() for d in deps if d.startswith("onnxruntime-gpu")]
    low = bound.removeprefix("onnxruntime-gpu>=")
    assert tuple(map(int, version.split("."))) >= tuple(map(int, low.split("."))), bound
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert f"onnxruntime-gpu {version}" in readme  # the docs name the pinned release


def test_cpu_requirements_are_the_packages_with_the_cpu_onnxruntime() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    linux = [d.split(";")[0].strip() for d in deps
             if "platform_system != 'Linux'" not in d]
    want = [d.replace("onnxruntime-gpu", "onnxruntime") for d in linux]
    lines = [line.strip() for line in (DOCKER / "requirements-cpu.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == want


@pytest.mark.slow
def test_cpu_image_install_steps_build_a_server_that_serves(tmp_path, repo) -> None:
    """The build stage's COPY and RUN steps, replayed into a fresh virtualenv."""
    src, venv = tmp_path / "src", tmp_path / "venv"
    src.mkdir()
    for word, rest in stage("Dockerfile", "build"):
        if word == "COPY":  # Docker's rules: a directory's contents go into the target
            *sources, target = rest.split()
            for a in sources:
                dest = src / target
                if (ROOT / a).is_dir():
                    shutil.copytree(ROOT / a, dest, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                    continue
                if target.endswith("/"):
                    dest = dest / Path(a).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ROOT / a, dest)
        elif word == "RUN":
            cmd = rest.replace(VENV, str(venv))
            cmd = re.sub(r"^python3? ", shlex.quote(sys.executable) + " ", cmd)
            run = subprocess.run(cmd, shell=True, cwd=src, capture_output=True, text=True,
                                 timeout=900)
            assert run.returncode == 0, (cmd, run.stdout[-2000:], run.stderr[-3000:])
    py = venv / "bin" / "python"
    helped = subprocess.run([venv / "bin" / "rnnserve", "serve", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "--grpc-port" in helped.stdout
    probe = ("import importlib.util as u, json, onnxruntime as ort; "
             "print(json.dumps([u.find_spec('torch') is None, ort.get_available_providers()]))")
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, timeout=60)
    no_torch, providers = json.loads(out.stdout)
    assert no_torch and "CPUExecutionProvider" in providers
    assert "CUDAExecutionProvider" not in providers  # the CPU build, not onnxruntime-gpu
    freeze = subprocess.run([py, "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    assert "onnxruntime-gpu" not in freeze and "torch" not in freeze
    server = subprocess.Popen(
        [venv / "bin" / "rnnserve", "serve", "--repo", str(repo), "--host", "127.0.0.1",
         "--grpc-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ready = json.loads(server.stdout.readline())
        assert ready["event"] == "ready" and ready["grpc_port"] > 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.stderr.read() if server.stderr else ""
