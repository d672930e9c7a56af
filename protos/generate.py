"""Generate the Python modules for protos/**/*.proto (run: make protos).

protoc names generated imports after the .proto path (``from rnnserve.v1 import
...``, ``from inference import ...``); in this distribution the modules live under
``rnnserve.protos``, so the imports are rewritten. The output is committed; a test
regenerates it into a temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "rnnserve.protos"


def proto_files() -> list[Path]:
    return sorted(ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    protos = [str(p.relative_to(ROOT)) for p in proto_files()]
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed for {protos}")
    packages = sorted({".".join(Path(p).parent.parts) for p in protos})
    pattern = re.compile(rf"^from ({'|'.join(map(re.escape, packages))}) import", re.M)
    written = []
    for path in sorted(out_dir.rglob("*_pb2*.py*")):
        text = pattern.sub(rf"from {PACKAGE}.\1 import", path.read_text())
        path.write_text(text)
        written.append(path)
    for d in {p.parent for p in written}:
        while d != out_dir and d.is_relative_to(out_dir):
            (d / "__init__.py").touch()
            d = d.parent
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT
    for p in generate(out):
        print(p.relative_to(out))
