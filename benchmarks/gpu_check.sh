#!/usr/bin/env bash
# The GPU check: everything dsft's CUDA path must show, in one run on a bare GPU machine that
# fits one device lease (~5-6 minutes), every log and result in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT]            # OUT: $OUT if set, else the argument,
#                                                 # else runs/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run [OUT]  # the same stages on a CPU, tiny shapes
#
# Run from the repository root. On the GPU machine the wheels in .whl/ (deepspeed,
# datasets, pyarrow, trl, liger-kernel, pytest, ...) are installed into /tmp/site without
# their dependencies (torch, transformers and peft are the machine's own); dsft runs from
# the tree (PYTHONPATH). Stages, each under `timeout` so that one hang cannot eat the lease:
#   1. pytest -m gpu           CUDA precisions, the planner's 1B peak-memory check, fused
#                              loss / FlexAttention on packed rows / torch.compile / Liger
#                              against the plain path            -> pytest.log, memory_check.json
#   2. dsft bench --mode gpu   dsft, dsft-packed, trl-default, trl-best: Llama-3.2-1B shape,
#                              seq 4096, bf16, one round, no warm-up  -> bench/bench.md
#   3. profile                 torch.profiler over 5 dsft steps (logging.profile_steps)
#                                                                -> profile/top_kernels.md
#   4. loss memory             train.fused_loss true vs false, 1B shape, seq 4096
#                                                                -> loss_memory/loss_memory.md
#   5. tiling                  the longest row a 1B model trains at, model.tiled_mlp off
#                              vs on (extrapolated from two lengths), with the time left
#                                                                -> tiling/tiling.md
# Then summary.md: each stage's status and time, and the result tables.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${OUT:-${1:-runs/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
T0=$(date +%s)
STATUS="$OUT/stages.tsv"
: >"$STATUS"

if [[ $DRY == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="" DS_ACCELERATOR=cpu
  [[ -x .venv/bin/python ]] && PY=.venv/bin/python
else
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "installing .whl/*.whl into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
      >"$OUT/pip.log" 2>&1 || echo "pip install failed: see pip.log"
  fi
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export DSFT_CHECK_OUT="$OUT" DSFT_CACHE="$OUT/.cache"
DSFT=("$PY" -m dsft)

stage() {  # stage NAME SECONDS CMD...: run under a timeout, log to OUT/NAME.log, record status
  local name=$1 limit=$2 t rc
  shift 2
  t=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  local took=$(($(date +%s) - t))
  local what=ok
  ((rc == 124 || rc == 137)) && what="TIMEOUT"
  ((rc != 0 && rc != 124 && rc != 137)) && what="FAILED (exit $rc)"
  printf '%s\t%s\t%ss\n' "$name" "$what" "$took" >>"$STATUS"
  echo "   $what in ${took}s -> $OUT/$name.log"
  tail -n 3 "$OUT/$name.log"
}

{
  date -u
  nvidia-smi 2>/dev/null || echo "no nvidia-smi"
  $PY - <<'EOF'
import importlib.metadata as md, platform, sys
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")
for p in ("transformers", "peft", "deepspeed", "datasets", "pyarrow", "trl", "liger-kernel",
          "pytest", "pytest-timeout"):
    try:
        print(p, md.version(p))
    except md.PackageNotFoundError:
        print(p, "NOT INSTALLED")
for m in ("flash_attn", "liger_kernel"):
    import importlib.util
    print(m, "importable" if importlib.util.find_spec(m) else "absent")
EOF
} >"$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt" | tail -n 14

# 1. every gpu-marked test (they skip without CUDA: the dry run only collects them). The most
#    telling first (planner, kernels), so that a timeout cuts the least; -v logs each as it ends.
G=tests/integration
FIRST=("$G/test_gpu.py::test_planner_predicts_peak_memory_of_a_1b_llama" "$G/test_gpu_kernels.py")
PYTEST=(-m pytest -m gpu -v -p no:cacheprovider -o addopts="" -rA --timeout=100)
# shellcheck disable=SC2016
stage pytest $((DRY ? 300 : 135)) bash -c '
  py=$1 out=$2; shift 2; first=("${@:1:2}"); opts=("${@:3}")
  "$py" "${opts[@]}" --junitxml="$out/pytest.xml" "${first[@]}"; a=$?
  "$py" "${opts[@]}" --junitxml="$out/pytest-rest.xml" tests/integration \
    --deselect "${first[0]}" --deselect "${first[1]}"; b=$?
  ((a == 5)) && a=0; ((b == 5)) && b=0  # 5: nothing collected
  exit $((a || b))' _ "$PY" "$OUT" "${FIRST[@]}" "${PYTEST[@]}"

# 2. dsft vs TRL, one round, no warm-up
if [[ $DRY == 1 ]]; then
  BENCH=(--dry-run --steps 2 --skip-steps 0 --train-examples 80)
else
  BENCH=(--steps 10 --skip-steps 2 --grad-accum 1 --train-examples 2500)
fi
stage bench $((DRY ? 400 : 130)) "${DSFT[@]}" bench --mode gpu "${BENCH[@]}" --repeats 1 \
  --no-warmup --prep-examples 0 --no-val-loss --out "$OUT/bench"

# 3. a profiled dsft run: 1B shape at seq 4096, bf16, steps 3-7 profiled
# (the benchmark's model and data when stage 2 built them, else its own)
stage profile $((DRY ? 300 : 40)) "$PY" -m benchmarks.gpu_profile --out "$OUT/profile" \
  --model "$OUT/bench/model" --data "$OUT/bench/train.jsonl" $([[ $DRY == 1 ]] && echo --dry-run)

# 4. the loss's memory: fused vs full logits
if [[ $DRY == 1 ]]; then
  LM=(--device cpu --tiny --seq 256 --steps 1)
else
  LM=(--device cuda --seq 4096 --steps 3)
fi
stage loss_memory $((DRY ? 300 : 30)) "$PY" -m benchmarks.loss_memory "${LM[@]}" \
  --out "$OUT/loss_memory"

# 5. optional: tiling (model.tiled_mlp): the longest row a 1B model trains at, off vs on;
#    only with the time left before the 6-minute mark (at least 20 s, at most 50 s)
LEFT=$((T0 + 355 - $(date +%s)))
((LEFT > 50)) && LEFT=50
if [[ $DRY == 1 ]]; then LEFT=300; fi
if ! grep -q "tiled_mlp" dsft/config.py 2>/dev/null; then
  printf 'tiling\tskipped (no model.tiled_mlp option in this tree)\t0s\n' >>"$STATUS"
elif ((LEFT < 20)); then
  printf 'tiling\tskipped (%ss left of the 6 minutes)\t0s\n' "$LEFT" >>"$STATUS"
else
  stage tiling "$LEFT" "$PY" -m benchmarks.tiled_mlp_longest_seq --out "$OUT/tiling" \
    $([[ $DRY == 1 ]] && echo --dry-run)
fi

# summary
{
  echo "# GPU check $([[ $DRY == 1 ]] && echo '(dry run, CPU)') — $(date -u)"
  echo
  echo '```'
  cat "$OUT/environment.txt"
  echo '```'
  echo
  echo "| stage | status | time |"
  echo "|---|---|---|"
  awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$STATUS"
  echo
  echo "Total: $(($(date +%s) - T0)) s"
  echo
  echo "## pytest -m gpu"
  echo '```'
  grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest.log" | tail -n 30
  echo '```'
  for f in memory_check.json; do
    [[ -f "$OUT/$f" ]] && { echo; echo "## planner check ($f)"; echo '```'; cat "$OUT/$f"; echo '```'; }
  done
  [[ -f "$OUT/bench/bench.md" ]] && { echo; echo "## dsft bench --mode gpu"; cat "$OUT/bench/bench.md"; }
  [[ -f "$OUT/profile/summary.md" ]] && { echo; echo "## profile"; cat "$OUT/profile/summary.md"; }
  [[ -f "$OUT/loss_memory/loss_memory.md" ]] && { echo; echo "## loss memory"; cat "$OUT/loss_memory/loss_memory.md"; }
  [[ -f "$OUT/tiling/tiling.md" ]] && { echo; echo "## tiling"; cat "$OUT/tiling/tiling.md"; }
} >"$OUT/summary.md"
# weights and caches stay behind: the folder is for logs and results
rm -rf "$OUT/.cache" "$OUT/bench/model" "$OUT/bench/dsft-cache" "$OUT/bench/pretokenized" \
  "$OUT/profile/model" "$OUT/profile/cache"
find "$OUT" \( -name "*.safetensors" -o -name "*.pt" -o -name "*.bin" \) -delete 2>/dev/null
echo
cat "$OUT/summary.md"
echo "written: $OUT (summary.md)"
# exit 0 when every stage that ran passed
! grep -qE "FAILED|TIMEOUT" "$STATUS"
