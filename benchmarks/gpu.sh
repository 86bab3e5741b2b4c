#!/usr/bin/env bash
# The device run in one command: install attnlab, check every GPU path against the dense reference,
# measure throughput, then, in the time left, run GPU science configs; everything is written under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu.sh               # on the GPU machine (device tool: one `run` call)
#   OUT=/some/dir bash benchmarks/gpu.sh --rehearse    # on a CPU: the same steps, tiny sizes (tests run it)
#   STEPS=science SCIENCE=needle_gpu TOTAL_S=570 OUT=/some/dir bash benchmarks/gpu.sh   # one science config
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
#   4. the GPU science configs, in order of value: needle_gpu, mqar_gpu, extrapolation_gpu,
#      length_generalization_gpu, calibration_gpu, distillation_gpu, critical_scaling_gpu
#      (experiments/<name>.toml). Each runs
#      only if what is left of TOTAL_S covers its estimate (SCIENCE_ESTIMATES below, from the
#      configs' headers, unmeasured until a device run), under a limit of all that is left; one
#      that does not fit is skipped and the next one tried. They train in a scratch folder
#      (checkpoints stay there) with a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, so
#      a seed can load the programs the seed before compiled). After each, its JSON (partial if it
#      was stopped: the finished points) goes into science.tar.gz, and science.json records every
#      config: finished, timed_out, failed or skipped, with its seconds, limit, estimate and reason.
#      The rehearsal runs needle_gpu and critical_scaling_gpu at tiny sizes and skips the others.
# JSON only (the device returns at most 8 files; here at most 6): rebuild the figures with
# `attnlab figures <folder>` after copying the JSON (science.tar.gz unpacked) into results/.
#
# Settings (environment):
#   TOTAL_S (default 480): the whole script's budget in seconds; every step's limit is cut to what is
#     left of it (less 20 s for stopping and packing), so the script ends within it. The default
#     keeps the device run under 8 minutes of a 15-minute device budget; after steps 2-3 (about
#     6 minutes) little is left, so a science config usually needs a call of its own (above:
#     STEPS=science and TOTAL_S up to 570, with the device call's timeout_s at 600, its limit).
#   STEP2_S (default 150), STEP3_S (default 330): the limits of steps 2 and 3.
#   STEPS (default "backend_check throughput science"): which of steps 2-4 run (0 and 1 always do).
#   SCIENCE (default: all seven, in the order above): the science configs to try, in order.
# Exit status: 0 when every step that ran finished in time (a failing path is a result, recorded in
# the JSON, not an error of the script; a science config skipped for lack of time is not an
# error), else the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."

rehearse=false
case "${1:-}" in
  "") ;;
  --rehearse) rehearse=true ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu.sh [--rehearse]; got $1" >&2; exit 2 ;;
esac
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PYTHON=${PYTHON:-python3}
# attnlab imports from this checkout even if the install step fails (the steps run from its root).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TOTAL_S=${TOTAL_S:-480}
STEP2_S=${STEP2_S:-150}
STEP3_S=${STEP3_S:-330}
STEPS=${STEPS:-backend_check throughput science}
SCIENCE_ALL="needle_gpu mqar_gpu extrapolation_gpu length_generalization_gpu calibration_gpu distillation_gpu critical_scaling_gpu"
SCIENCE=${SCIENCE:-$SCIENCE_ALL}
RESERVE_S=20  # kept back from every limit: timeout's 10 s grace after its signal, then packing
for name in $STEPS; do
  case $name in
    backend_check | throughput | science) ;;
    *) echo "STEPS: $name is not a step; accepted: backend_check throughput science" >&2; exit 2 ;;
  esac
done
case $TOTAL_S in
  '' | *[!0-9]*) echo "TOTAL_S=$TOTAL_S: a whole number of seconds" >&2; exit 2 ;;
esac
# Seconds each science config needs on one H100/H200: the estimates in its header (unmeasured).
declare -A SCIENCE_ESTIMATES=(
  [needle_gpu]=360 [mqar_gpu]=450 [extrapolation_gpu]=450 [length_generalization_gpu]=400
  [calibration_gpu]=360 [distillation_gpu]=330 [critical_scaling_gpu]=150
)
# JAX would take 75% of the GPU at start; torch (the peers) runs in the same process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
status=0
code=0
limit=0
log() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/log.txt" >&2; }
wants() { [[ " $STEPS " == *" $1 "* ]]; }
# Seconds left of TOTAL_S for a step's limit (SECONDS: seconds since the script started).
left() { echo $((TOTAL_S - SECONDS - RESERVE_S)); }

# A step: its name, its time limit (cut to what is left), then the command. Its output goes to
# $OUT/log.txt; its exit status is left in $code (124: stopped at its limit), the limit in $limit.
step() {
  local name=$1 remaining
  limit=$2
  shift 2
  remaining=$(left)
  if [ "$remaining" -lt "$limit" ]; then limit=$remaining; fi
  if [ "$limit" -lt 1 ]; then
    log "$name: not run, no time left of TOTAL_S = $TOTAL_S s"
    code=124
  else
    log "$name: $*"
    local started=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >>"$OUT/log.txt" 2>&1
    code=$?
    log "$name: exit $code after $((SECONDS - started)) s (limit $limit s)"
  fi
  if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
}

declare -A science_sets=()
if $rehearse; then
  # CPU-sized versions of the same configs: every step and code path, in seconds.
  check_sets=(--set 'normalizers=["sparsemax", "softmax1"]' --set n=40 --set batch=2
    --set heads=2 --set kv_heads=1 --set head_dim=16)
  throughput_sets=(--set 'normalizers=["softmax", "sparsemax"]' --set 'lengths=[64]' --set batch=1
    --set heads=2 --set head_dim=16 --set reps=1 --set pallas_interpret=true --set 'memory_lengths=[64]'
    --set 'memory_cases=["softmax"]' --set 'modes=["forward"]')
  # Two science configs run, at tiny sizes (a trained kind, with its checkpoints, and a sweep); the
  # other four are skipped as "rehearsal" (tests/experiments/test_experiments.py checks that every
  # committed config loads). A config's extra --set words are split on newlines.
  science_sets[needle_gpu]="seeds=[0]
normalizers=[\"sparsemax\"]
model.layers=1
model.width=16
training.seq_len=72
training.batch_size=2
training.steps=1
training.warmup=0
training.log_every=1
training.checkpoint_every=1
eval_lengths=[72, 144]
depths=[0.5]
eval_examples=2
rope_theta_factors=[1.0]"
  science_sets[critical_scaling_gpu]="seeds=[0]
normalizers=[\"critical_softmax\", \"logn_sparsemax\"]
lengths=[64, 256]
dim=32
queries=4"
  SCIENCE_ESTIMATES[needle_gpu]=60
  SCIENCE_ESTIMATES[critical_scaling_gpu]=30
else
  # No build isolation: the device reaches no registry to fetch setuptools into one.
  step install 120 bash -c "$PYTHON -m pip install --no-deps --no-build-isolation -q -e . && if ls .wheels/*.whl >/dev/null 2>&1; then $PYTHON -m pip install --no-deps -q .wheels/*.whl; fi"
  check_sets=()
  throughput_sets=()
fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  "$PYTHON" - <<'PY'
import importlib, jax
for name in ("jax", "jaxlib", "flax", "optax", "torch", "triton", "adasplash", "entmax"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', '?')}")
    except Exception as err:
        print(f"{name}: not importable ({type(err).__name__})")
print("backend:", jax.default_backend(), "devices:", [d.device_kind for d in jax.devices()])
PY
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} >"$OUT/environment.txt" 2>&1

if wants backend_check; then
  step backend_check "$STEP2_S" "$PYTHON" -m attnlab run experiments/backend_check_gpu.toml --out "$OUT" \
    --no-figures --no-progress "${check_sets[@]}"
fi
if wants throughput; then
  step throughput "$STEP3_S" "$PYTHON" -m attnlab run experiments/throughput_gpu.toml --out "$OUT" \
    --no-figures --no-progress "${throughput_sets[@]}"
fi

# Step 4. science.json is rewritten after every config from the tab-separated lines in $work/science.tsv.
record() {  # config status exit seconds limit_s estimate_s reason ("" for none)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$work/science.tsv"
  "$PYTHON" - "$work/science.tsv" "$OUT/science.json" <<'PY'
import json, os, sys
keys = ("config", "status", "exit", "seconds", "limit_s", "estimate_s", "reason")
with open(sys.argv[1]) as lines:
    rows = [dict(zip(keys, line.rstrip("\n").split("\t"))) for line in lines]
for row in rows:
    for key in ("exit", "seconds", "limit_s", "estimate_s"):
        row[key] = int(row[key]) if row[key] else None
    row["reason"] = row["reason"] or None
with open(sys.argv[2] + ".tmp", "w") as out:
    json.dump(rows, out, indent=1)
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PY
}

pack() {  # every JSON in $work/json into $OUT/science.tar.gz (Python's tarfile: no tar binary needed)
  "$PYTHON" - "$work/json" "$OUT/science.tar.gz" <<'PY'
import os, sys, tarfile
folder, target = sys.argv[1:]
with tarfile.open(target + ".tmp", "w:gz") as packed:
    for name in sorted(os.listdir(folder)):
        packed.add(os.path.join(folder, name), arcname=name)
os.replace(target + ".tmp", target)
PY
}

if wants science; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/attnlab-science.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  mkdir -p "$work/out" "$work/json"
  cache=${JAX_COMPILATION_CACHE_DIR:-$work/jax-cache}
  log "science: ${SCIENCE} (work folder $work, compilation cache $cache)"
  for name in $SCIENCE; do
    estimate=${SCIENCE_ESTIMATES[$name]:-}
    if [ -z "$estimate" ] || [ ! -f "experiments/$name.toml" ]; then
      log "science $name: skipped, not one of this script's science configs"
      record "$name" skipped "" 0 "" "" "not one of this script's science configs ($SCIENCE_ALL)"
      continue
    fi
    if $rehearse && [ -z "${science_sets[$name]:-}" ]; then
      log "science $name: skipped (rehearsal)"
      reason="rehearsal: only needle_gpu and critical_scaling_gpu run, at tiny sizes"
      record "$name" skipped "" 0 "" "$estimate" "$reason"
      continue
    fi
    remaining=$(left)
    if [ "$remaining" -lt "$estimate" ]; then
      shown=$((remaining > 0 ? remaining : 0))
      log "science $name: skipped, needs about $estimate s, $shown s left"
      reason="needs about $estimate s (its estimate), $shown s left of TOTAL_S = $TOTAL_S s"
      record "$name" skipped "" 0 "" "$estimate" "$reason"
      continue
    fi
    sets=()
    if [ -n "${science_sets[$name]:-}" ]; then
      while IFS= read -r word; do sets+=(--set "$word"); done <<<"${science_sets[$name]}"
    fi
    started=$SECONDS
    step "science $name" "$remaining" env JAX_COMPILATION_CACHE_DIR="$cache" "$PYTHON" -m attnlab run \
      "experiments/$name.toml" --out "$work/out" --no-figures --no-progress "${sets[@]}"
    case $code in
      0) outcome=finished reason="" ;;
      124 | 137) outcome=timed_out reason="stopped at its limit; the JSON holds the points finished before" ;;
      *) outcome=failed reason="exit $code; see log.txt" ;;
    esac
    if [ -f "$work/out/$name.json" ]; then
      cp "$work/out/$name.json" "$work/json/" && pack
    fi
    record "$name" "$outcome" "$code" "$((SECONDS - started))" "$limit" "$estimate" "$reason"
  done
fi
rm -f "$OUT/.lock"
log "done, exit $status; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$status"
