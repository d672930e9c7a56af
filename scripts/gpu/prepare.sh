#!/usr/bin/env bash
# Builds the payload for a lent GPU machine (issue J): it has Python 3.12, torch, CUDA 13
# and cuDNN 9 libraries, but no network, and onnxruntime without CUDA. Run here (with
# network), from the repository root, after `make .venv/.installed`:
#
#   bash scripts/gpu/prepare.sh        # -> .gpu/kit.tar.xz (git-ignored), a few minutes
#
# The kit holds the wheels the device lacks (onnxruntime-gpu and the serving
# dependencies at this venv's versions), the reference models (random weights) for the
# benchmarks, and a redis-server for the durable ones. scripts/gpu/RUN.md says how to use it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
PYVER=${PYVER:-3.12}  # the device's Python; PYVER=3.11 XZ=-0 builds a kit to rehearse here
XZ=${XZ:--9}
[ -x $PY ] || { echo "run make .venv/.installed first" >&2; exit 1; }
# Checked first: a kit without it fails every durable bench on the card, found only
# there (2026-11-29); NO_REDIS=1 builds one without, on purpose
if [ "${NO_REDIS:-0}" != 1 ] && ! command -v redis-server >/dev/null; then
  echo "no redis-server here: run make system-deps first (the kit carries it for" \
    "bench --redis-store), or NO_REDIS=1 to build a kit without it" >&2
  exit 1
fi
rm -rf .gpu/stage && mkdir -p .gpu/stage/whl .gpu/stage/models .gpu/stage/site

version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
WHEELS=""
for p in onnxruntime-gpu grpcio grpcio-health-checking grpcio-reflection protobuf \
         prometheus_client pydantic pydantic_core pydantic-settings python-dotenv redis \
         hiredis annotated-types typing-inspection typing_extensions; do
  WHEELS="$WHEELS $p==$(version $p)"
done
echo "wheels:$WHEELS"
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .gpu/stage/whl $WHEELS 2>&1 | grep -v "is ignored" || true

# reference models, random weights, exported and verified here (torch 2.13)
$PY - <<'EOF'
from pathlib import Path
from rnnserve.client.bench import build_workload
from rnnserve.export.fp16 import to_fp16  # noqa: F401  (fails early without the train extra)
for name in ("speech-small", "speech-tiny"):
    repo, _ = build_workload(name, Path(".gpu/stage/build"))
    print("built", repo)
EOF
cp -r .gpu/stage/build/speech-small/speech-small .gpu/stage/models/
cp -r .gpu/stage/build/speech-tiny/speech-tiny .gpu/stage/models/
# the same speech-small weights in fp16 as version 2 (rnnserve export --fp16)
$PY - <<'EOF'
from pathlib import Path
from rnnserve.export.onnx_export import export_checkpoint
ckpt = next(Path(".gpu/stage/build").glob("speech-small*.pt"), None)
if ckpt is None:
    raise SystemExit("no speech-small checkpoint under .gpu/stage/build")
export_checkpoint(ckpt, ".gpu/stage/models", "speech-small", 2, fp16=True, log=lambda _: None)
print("fp16 speech-small v2 exported")
EOF

# a redis-server for the durable runs (bench --redis-store): this machine's Debian build
# and the libraries it links beyond glibc, started through a wrapper that points the
# loader at them (Python's own ssl is left alone); check.sh puts it on PATH
if command -v redis-server >/dev/null; then
  mkdir -p .gpu/stage/redis/real .gpu/stage/redis/lib
  cp "$(readlink -f "$(command -v redis-server)")" .gpu/stage/redis/real/redis-server
  ldd "$(command -v redis-server)" | awk '/=> \//{print $3}' \
    | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' \
    | xargs -r -I{} cp -L {} .gpu/stage/redis/lib/
  cat > .gpu/stage/redis/redis-server <<'SH'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH=$here/lib exec "$here/real/redis-server" "$@"
SH
  chmod +x .gpu/stage/redis/redis-server
  echo "redis-server $(.gpu/stage/redis/redis-server --version | cut -d' ' -f3) and" \
    "$(ls .gpu/stage/redis/lib | wc -l) libraries"
else
  echo "no redis-server here (make system-deps): the kit has none, --redis-store runs fail"
fi

# installed here, then xz over the files: 219 MB for their 404 MB (the tar), where the onnxruntime
# wheel alone is 255 MB zipped
$PY -m pip install -q --no-index --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --target .gpu/stage/site \
  .gpu/stage/whl/*.whl 2>&1 | grep -v "is ignored" || true
tar -C .gpu/stage -cf - site models $(test -d .gpu/stage/redis && echo redis) | xz "$XZ" -T0 > .gpu/kit.tar.xz
rm -rf .gpu/parts && mkdir -p .gpu/parts
split -b 56m -d .gpu/kit.tar.xz .gpu/parts/kit.
ls -la .gpu/kit.tar.xz .gpu/parts
echo "parts: $(ls .gpu/parts | wc -l) (each travels in its own call; see scripts/gpu/RUN.md)"
