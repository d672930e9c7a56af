#!/usr/bin/env bash
# Issue J's checks on a lent GPU machine, from the repository root, once the kit's parts
# are in /tmp/rnnserve-kit/parts (scripts/gpu/RUN.md). Everything it prints also goes to
# $OUT/check.log; measurements to $OUT/ceiling.jsonl and $OUT/bench-many.json.
#   STEPS="tests ceiling bench" (default: all) picks what runs; BENCH_S: seconds per level
#   (6); BENCH_LEVELS (1024,2048,4096), BENCH_VERSION (1: fp32; 2: fp16), WORKERS (4),
#   LOAD_PROCS (8) and SERVE_EXTRA (more serve flags, space-separated, e.g.
#   "--cuda-graphs --cuda-sync=blocking") and BENCH_EXTRA (bench flags, e.g.
#   --spread=kernel; "--redis-store --redis-shards=4": also on the kit's redis-servers)
#   shape the bench (BENCH_TIMEOUT: its limit, 180 s), whose server logs come back as
#   $OUT/server*.log; MPS=1 runs the bench under CUDA's MPS daemon (started and stopped
#   here). Step ceiling-sync: the fp32 ceiling again with CUDA_SYNC (default blocking).
#   DEVICE=cpu rehearses the whole script on a machine without a GPU.
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/rnnserve-out}
mkdir -p "$OUT"
K=${KIT:-/tmp/rnnserve-kit}
exec > >(tee "$OUT/check.log") 2>&1
STEPS=${STEPS:-tests ceiling bench}
BENCH_S=${BENCH_S:-6}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 DEVICE
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "cpus $(nproc)"

if [ ! -f "$K/site/.done" ]; then
  ls -la "$K/parts" || { echo "no kit parts in $K/parts (RUN.md)"; exit 2; }
  cat "$K"/parts/kit.* | xz -d | tar -C "$K" -xf - || { echo "kit does not unpack"; exit 2; }
  touch "$K/site/.done"  # site/: the wheels, installed by prepare.sh for this Python
fi
# rnnserve itself from the working tree that travelled, laid out as its distribution
# maps it (pyproject.toml: the top-level folders under rnnserve.*); no build step, whose
# setuptools there may be too old for pyproject.toml
rm -rf "$K/pkg" && mkdir -p "$K/pkg" && cp -r rnnserve "$K/pkg/rnnserve" \
  && for d in training export server client protos; do cp -r "$d" "$K/pkg/rnnserve/$d"; done \
  || { echo "rnnserve does not copy"; exit 2; }
export PYTHONPATH=$K/pkg:$K/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}
# CUDA 13 and cuDNN 9 come with the image's nvidia wheels (torch's): let onnxruntime find them
NV=$($PY -c "
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    dirs.update(glob.glob(os.path.join(sp, 'nvidia', '*', 'lib')))
    dirs.update(glob.glob(os.path.join(sp, 'nvidia', '*', '*', 'lib')))
print(':'.join(sorted(dirs)))")
export LD_LIBRARY_PATH=$NV${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# the kit's redis-server (prepare.sh), for BENCH_EXTRA="--redis-store --redis-shards=N"
if [ -x "$K/redis/redis-server" ]; then
  export PATH=$K/redis:$PATH
  echo "redis-server: $(redis-server --version 2>&1 | head -1)"
fi
# Outside the repository root: there the bare rnnserve/ folder would shadow the install.
cd "$K"
$PY -c "
import onnxruntime as ort, rnnserve, sys
print('python', sys.version.split()[0], 'onnxruntime', ort.__version__, ort.get_device(),
      ort.get_available_providers(), 'rnnserve', rnnserve.__version__, rnnserve.__file__)"

case " $STEPS " in *" tests "*)
  echo "== requires_cuda tests (tests/server/test_cuda.py)"
  rm -rf "$K/t" && mkdir -p "$K/t" && cp -r "$REPO/tests" "$K/t/"
  (cd "$K/t" && timeout 180 $PY -m pytest -p no:cacheprovider -q -rs \
     -W ignore::pytest.PytestUnknownMarkWarning tests/server/test_cuda.py 2>&1 | tail -25)
esac

case " $STEPS " in *" ceiling "*)
  echo "== compute ceiling (the runtime alone, state pool on the device)"
  timeout 150 $PY "$REPO/scripts/gpu/ceiling.py" "$K/models" 2 | tee "$OUT/ceiling.jsonl"
esac

case " $STEPS " in *" ceiling-sync "*)
  echo "== compute ceiling, host waiting by ${CUDA_SYNC:-blocking}"
  CUDA_SYNC=${CUDA_SYNC:-blocking} CEILING_MODELS=speech-small:1 timeout 100 \
    $PY "$REPO/scripts/gpu/ceiling.py" "$K/models" 2 | tee -a "$OUT/ceiling.jsonl"
esac

case " $STEPS " in *" bench "*)
  EXTRA=()
  for f in ${SERVE_EXTRA:-}; do EXTRA+=("--serve-arg=$f"); done
  for f in ${BENCH_EXTRA:-}; do EXTRA+=("$f"); done
  if [ "${MPS:-0}" = 1 ]; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    nvidia-cuda-mps-control -d && echo "MPS daemon started" || echo "MPS daemon did not start"
  fi
  # connections: one per worker per load process (bench's default; the runs before
  # 2026-11-28 passed --connections 8, the same with 8 workers). The extra flags come
  # last, so that they override the defaults before them (until 2026-11-29 they came
  # first: BENCH_EXTRA=--many=256 ran with 64 streams per message)
  echo "== bench: speech-small v${BENCH_VERSION:-1} on $DEVICE, ${WORKERS:-4} workers" \
    "${SERVE_EXTRA:-}, ${LOAD_PROCS:-8} load processes, bench flags: --many 64 ${BENCH_EXTRA:-}"
  timeout ${BENCH_TIMEOUT:-180} $PY -m rnnserve bench --repo "$K/models" --model speech-small \
    --version "${BENCH_VERSION:-1}" \
    --serve-arg=--device=$DEVICE --serve-arg=--workers=${WORKERS:-4} --serve-arg=--batch-runners=2 \
    --max-batch-size 1024 --many 64 --load-procs ${LOAD_PROCS:-8} \
    --streams ${BENCH_LEVELS:-1024,2048,4096} --duration-s "$BENCH_S" --no-plot \
    --out "$OUT/bench-many" "${EXTRA[@]}" 2>&1 | tail -25
  cp "$OUT/bench-many/bench.json" "$OUT/bench-many.json" 2>/dev/null
  for f in "$OUT"/bench-many/*.log; do [ -f "$f" ] && grep -v "W:onnxruntime" "$f" | tail -c 4000000 > "$OUT/$(basename "$f")"; done
  rm -rf "$OUT/bench-many"
  if [ "${MPS:-0}" = 1 ]; then
    echo quit | nvidia-cuda-mps-control; sleep 1
    tail -5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
  fi
esac
date -u
