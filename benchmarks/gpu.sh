#!/usr/bin/env bash
# The device run in one command: install attnlab, check every GPU path against the dense reference,
# then measure throughput, writing everything under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu.sh               # on the GPU machine (device tool: one `run` call)
#   OUT=/some/dir bash benchmarks/gpu.sh --rehearse    # on a CPU: the same steps, tiny sizes (tests run it)
#
# Steps, each under its own time limit so that one that overruns leaves the others' results (every
# run writes its JSON point by point, and a rerun resumes it):
#   0. install: `pip install --no-deps --no-build-isolation -e .` (the device image has jax, flax, optax, chex, einops,
#      orbax, matplotlib, rich, torch and triton, and reaches no registry) and every wheel carried
#      in .wheels/ (AdaSplash: `pip download adasplash==0.2.2 --no-deps -d .wheels` on a machine
#      that reaches PyPI, then carry .wheels)
#   1. environment.txt: versions, devices, nvidia-smi
#   2. experiments/backend_check_gpu.toml -> backend_check_gpu.json (values and gradients of every
#      fast path against dense, float32 and bfloat16)
#   3. experiments/throughput_gpu.toml -> throughput_gpu.json (tokens/s, compile time, peak memory,
#      against jax.nn cuDNN, torch SDPA and AdaSplash)
# JSON only (the device returns at most 8 files): rebuild the figures with
# `attnlab figures <folder>` after copying the JSON into results/.
#
# Limits (seconds): STEP2_S (default 150), STEP3_S (default 330); the whole script stays under about
# 8 minutes of a 15-minute device budget. Exit status: 0 when every step finished in time (a failing
# path is a result, recorded in the JSON, not an error of the script), else the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=false
case "${1:-}" in
  "") ;;
  --rehearse) rehearse=true ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu.sh [--rehearse]; got $1" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
# attnlab imports from this checkout even if the install step fails (the steps run from its root).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEP2_S=${STEP2_S:-150}
STEP3_S=${STEP3_S:-330}
# JAX would take 75% of the GPU at start; torch (the peers) runs in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt" >&2; }

# A step: its name, its time limit, then the command. Its output goes to $OUT/log.txt.
step() {
  local name=$1 limit=$2
  shift 2
  log "$name: $*"
  local started=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/log.txt" 2>&1
  local code=$?
  log "$name: exit $code after $((SECONDS - started)) s (limit $limit s)"
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

if $rehearse; then
  # CPU-sized versions of the same configs: every step and code path, in seconds.
  check_sets=(--set 'normalizers=["sparsemax", "softmax1"]' --set n=40 --set batch=2
    --set heads=2 --set kv_heads=1 --set head_dim=16)
  throughput_sets=(--set 'normalizers=["softmax", "sparsemax"]' --set 'lengths=[64]' --set batch=1
    --set heads=2 --set head_dim=16 --set reps=1 --set pallas_interpret=true --set 'memory_lengths=[64]'
    --set 'memory_cases=["softmax"]' --set 'modes=["forward"]')
else
  # No build isolation: the device reaches no registry to fetch setuptools into one.
  step install 120 bash -c "$PYTHON -m pip install --no-deps --no-build-isolation -q -e . && if ls .wheels/*.whl >/dev/null 2>&1; then $PYTHON -m pip install --no-deps -q .wheels/*.whl; fi"
  check_sets=()
  throughput_sets=()
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" - <<'EOF'
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "torch", "triton", "adasplash", "entmax"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__})")
print("backend:", jax.default_backend(), "devices:", [d.device_kind for d in jax.devices()])
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} >"$OUT/environment.txt" 2>&1

step backend_check "$STEP2_S" "$PYTHON" -m attnlab run experiments/backend_check_gpu.toml --out "$OUT" \
  --no-figures --no-progress "${check_sets[@]}"
step throughput "$STEP3_S" "$PYTHON" -m attnlab run experiments/throughput_gpu.toml --out "$OUT" \
  --no-figures --no-progress "${throughput_sets[@]}"
rm -f "$OUT/.lock"
log "done, exit $status; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
