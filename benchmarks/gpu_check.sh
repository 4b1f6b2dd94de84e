#!/usr/bin/env bash
# The GPU check: everything dsft's CUDA path must show, in one run on a bare GPU machine that
# fits one device lease (at most 9.5 minutes: every stage's limit is cut to the time left),
# every log and result in one folder.
#
#   bash benchmarks/gpu_check.sh [OUT]            # OUT: $OUT if set, else the argument,
#                                                 # else runs/gpu_check
#   bash benchmarks/gpu_check.sh --dry-run [OUT]  # the same stages on a CPU, tiny shapes
#
# Run from the repository root. On the GPU machine the wheels in .whl/ (deepspeed,
# datasets, pyarrow, trl, liger-kernel, ...) are installed into /tmp/site without their
# dependencies (torch, transformers and peft are the machine's own); dsft runs from the tree
# (PYTHONPATH). Stages, profile first (issue 24: optimise what the profile shows), each under
# `timeout`; one that fails or times out does not stop the others:
#   1. inputs_1b/_8b    the two bench shapes' data, tokenizer and random-weight model, built
#                       once (on the GPU, bf16): Llama-3.2-1B and Llama-3.1-8B
#   2. profile_before   torch.profiler, 5 steps, 1B full FT seq 4096 packed, the old path
#                       (sdpa with the 4-D mask, no Liger, no compile)  -> profile_before/
#   3. profile_1b       the same, the defaults (attn auto = varlen)     -> profile_1b/
#   4. profile_8b       8B LoRA r=16 all-linear, seq 4096, the defaults -> profile_8b/
#                       each: summary.md (step figures + kernel table: attention, GEMM, loss,
#                       optimizer, communication, idle/host gaps as shares of the step),
#                       kernels.json, run/profile/trace.json.gz (Chrome trace)
#   5. bench_1b         dsft bench --mode gpu: dsft, dsft-packed, trl-default, trl-best; 1B
#                       full FT, seq 4096, accumulation 1; tokens/s, MFU, peak memory, the
#                       planner's predicted vs measured step time   -> bench-1b/bench.md
#   6. bench_8b         the same, 8B LoRA r=16, one row per micro-batch, accumulation 2
#                       (MFU also as 4·N·T, NeMo AutoModel's count)   -> bench-8b/bench.md
#   7. pytest           pytest -m gpu: varlen/flex/compile/Liger/fused loss against the
#                       plain path, CUDA precisions, the planner's 1B peak-memory check
#   8. vlm              with time left, before the rest (60 s): image-text SFT on tiny Qwen2.5-VL,
#                       Qwen3-VL, Qwen3.5 (dense, MoE), whose processors need torchvision (here
#                       only): train, export, reload, answer about a picture -> vlm/vlm.md
#   9. profile_1b_fast, loss_memory, tiling   only with time left (profile_1b_fast: the 1B
#                       profile with DSFT_FAST_DEFAULTS=liger,compile, to set fastpath's verdicts)
# DSFT_FAST_DEFAULTS (dsft/fastpath.py) set for the whole check flips Liger / regional compile
# on for every "auto" run (e.g. DSFT_FAST_DEFAULTS=liger,compile bash benchmarks/gpu_check.sh).
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
BUDGET=${GPU_CHECK_BUDGET:-570}  # seconds for everything (the lease allows 10 minutes)

stage() {  # stage NAME SECONDS CMD...: run under a timeout, log to OUT/NAME.log, record status
  local name=$1 limit=$2 t rc
  shift 2
  if [[ $DRY == 0 ]]; then  # never past the budget: the limit is cut to the time left
    local left=$((T0 + BUDGET - $(date +%s)))
    if ((left < 15)); then
      printf '%s\tskipped (%ss of the budget left)\t0s\n' "$name" "$left" >>"$STATUS"
      echo "== $name skipped: ${left}s of the budget left"
      return
    fi
    ((limit > left)) && limit=$left
  fi
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
  $PY - <<'PYEOF'
import importlib.metadata as md, importlib.util, platform
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
    print(m, "importable" if importlib.util.find_spec(m) else "absent")
from dsft import attention, fastpath
print("varlen kernel:", attention.kernel_name("cuda" if torch.cuda.is_available() else "cpu"))
print("fast-path verdicts:", fastpath.verdicts())
PYEOF
} >"$OUT/environment.txt" 2>&1
tail -n 16 "$OUT/environment.txt"

# the two shapes: 1B full fine-tuning, 8B LoRA r=16 all-linear; seq 4096, bf16
if [[ $DRY == 1 ]]; then
  S1=(--dry-run --preset tiny)
  S8=(--dry-run --preset tiny --lora-r 16)
  P1=(--dry-run --steps 2)
  P8=(--dry-run --steps 2 --lora-r 16)
  B1=(--steps 2 --skip-steps 0)
  B8=(--steps 2 --skip-steps 0 --systems dsft-packed,trl-best)
  EX=(--train-examples 80)
else
  S1=(--preset 1b)
  S8=(--preset 8b --lora-r 16)
  P1=(--shape 1b --steps 5)
  P8=(--shape 8b --lora-r 16 --steps 3 --micro-batch 1)
  B1=(--steps 8 --skip-steps 2 --grad-accum 1)
  B8=(--steps 6 --skip-steps 2 --grad-accum 2 --micro-batch 1 --packed-micro-batch 1)
  EX=(--train-examples 2500)
fi
COMMON=(--mode gpu "${EX[@]}" --prep-examples 0 --no-val-loss)

# 1. inputs, built once for the profile and the bench
stage inputs_1b $((DRY ? 300 : 40)) "${DSFT[@]}" bench "${COMMON[@]}" "${S1[@]}" --inputs-only \
  --out "$OUT/bench-1b"
stage inputs_8b $((DRY ? 300 : 80)) "${DSFT[@]}" bench "${COMMON[@]}" "${S8[@]}" --inputs-only \
  --out "$OUT/bench-8b"

# 2-4. profile first: the old path, then the defaults on both shapes
PROF=("$PY" -m benchmarks.gpu_profile)
stage profile_before $((DRY ? 300 : 45)) "${PROF[@]}" "${P1[@]}" --attn sdpa --fast none \
  --label "1B full FT, before: sdpa + 4-D mask" --out "$OUT/profile_before" \
  --model "$OUT/bench-1b/model" --data "$OUT/bench-1b/train.jsonl"
stage profile_1b $((DRY ? 300 : 45)) "${PROF[@]}" "${P1[@]}" --label "1B full FT, defaults" \
  --out "$OUT/profile_1b" --model "$OUT/bench-1b/model" --data "$OUT/bench-1b/train.jsonl"
stage profile_8b $((DRY ? 300 : 70)) "${PROF[@]}" "${P8[@]}" --label "8B LoRA r=16, defaults" \
  --out "$OUT/profile_8b" --model "$OUT/bench-8b/model" --data "$OUT/bench-8b/train.jsonl"

# 5-6. dsft vs TRL (default and best) on both shapes, one round, no warm-up
stage bench_1b $((DRY ? 400 : 130)) "${DSFT[@]}" bench "${COMMON[@]}" "${S1[@]}" "${B1[@]}" \
  --repeats 1 --no-warmup --reuse-model --out "$OUT/bench-1b"
stage bench_8b $((DRY ? 400 : 150)) "${DSFT[@]}" bench "${COMMON[@]}" "${S8[@]}" "${B8[@]}" \
  --repeats 1 --no-warmup --reuse-model --out "$OUT/bench-8b"

# 7. every gpu-marked test (they skip without CUDA: the dry run only collects them). The most
#    telling first (planner, kernels), so that a timeout cuts the least; -v logs each as it ends.
G=tests/integration
FIRST=("$G/test_gpu.py::test_planner_predicts_peak_memory_of_a_1b_llama" "$G/test_gpu_kernels.py")
PYTEST=(-m pytest -m gpu -v -p no:cacheprovider -o addopts="" -rA --timeout=100)
# shellcheck disable=SC2016
stage pytest $((DRY ? 300 : 100)) bash -c '
  py=$1 out=$2; shift 2; first=("${@:1:2}"); opts=("${@:3}")
  "$py" "${opts[@]}" --junitxml="$out/pytest.xml" "${first[@]}"; a=$?
  "$py" "${opts[@]}" --junitxml="$out/pytest-rest.xml" tests/integration \
    --deselect "${first[0]}" --deselect "${first[1]}"; b=$?
  ((a == 5)) && a=0; ((b == 5)) && b=0  # 5: nothing collected
  exit $((a || b))' _ "$PY" "$OUT" "${FIRST[@]}" "${PYTEST[@]}"

# 8. with the time left: the Qwen vision-language families' image path (their processors need
#    torchvision: the dry run on a CPU without it skips each with the reason). The families
#    train at once; the script stops their trainings itself in time to write its table.
stage vlm $((DRY ? 120 : 60)) "$PY" -m benchmarks.vlm_gpu_check --out "$OUT/vlm" \
  --timeout $((DRY ? 100 : 40)) $([[ $DRY == 1 ]] && echo --dry-run)

# 9. with the time left: Liger + regional compile on the 1B shape (the verdicts of
#    dsft/fastpath.py: compare its step time and kernel table with profile_1b's); the loss's
#    memory (fused vs full logits); tiling (model.tiled_mlp)
if [[ $DRY == 1 ]]; then  # the same script as profile_1b; on a CPU both stay off anyway
  printf 'profile_1b_fast\tskipped (dry run: the profile_1b script with DSFT_FAST_DEFAULTS)\t0s\n' >>"$STATUS"
else
  stage profile_1b_fast 60 "${PROF[@]}" "${P1[@]}" --fast liger,compile \
    --label "1B full FT, defaults + Liger + regional compile" --out "$OUT/profile_1b_fast" \
    --model "$OUT/bench-1b/model" --data "$OUT/bench-1b/train.jsonl"
fi
if [[ $DRY == 1 ]]; then
  LM=(--device cpu --tiny --seq 256 --steps 1)
else
  LM=(--device cuda --seq 4096 --steps 3)
fi
stage loss_memory $((DRY ? 300 : 30)) "$PY" -m benchmarks.loss_memory "${LM[@]}" \
  --out "$OUT/loss_memory"
if ! grep -rqs "tiled_mlp" dsft/config.py dsft/config/; then
  printf 'tiling\tskipped (no model.tiled_mlp option in this tree)\t0s\n' >>"$STATUS"
else
  stage tiling $((DRY ? 300 : 50)) "$PY" -m benchmarks.tiled_mlp_longest_seq --out "$OUT/tiling" \
    $([[ $DRY == 1 ]] && echo --dry-run)
fi

# summary
section() {  # section TITLE FILE
  [[ -f "$2" ]] && { echo; echo "## $1"; echo; cat "$2"; }
}
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
  section "profile: 1B full FT, before (sdpa, 4-D mask)" "$OUT/profile_before/summary.md"
  section "profile: 1B full FT, defaults" "$OUT/profile_1b/summary.md"
  section "profile: 8B LoRA r=16, defaults" "$OUT/profile_8b/summary.md"
  section "profile: 1B full FT, defaults + Liger + regional compile" \
    "$OUT/profile_1b_fast/summary.md"
  section "dsft bench --mode gpu: 1B full FT" "$OUT/bench-1b/bench.md"
  section "dsft bench --mode gpu: 8B LoRA r=16" "$OUT/bench-8b/bench.md"
  echo
  echo "## pytest -m gpu"
  echo '```'
  grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/pytest.log" 2>/dev/null | tail -n 30
  echo '```'
  if [[ -f "$OUT/memory_check.json" ]]; then
    echo; echo "## planner check (memory_check.json)"; echo '```'; cat "$OUT/memory_check.json"; echo '```'
  fi
  section "image-text SFT: Qwen vision-language families" "$OUT/vlm/vlm.md"
  section "loss memory" "$OUT/loss_memory/loss_memory.md"
  section "tiling" "$OUT/tiling/tiling.md"
} >"$OUT/summary.md"
# weights and caches stay behind: the folder is for logs and results
rm -rf "$OUT/.cache" "$OUT"/bench-*/model "$OUT"/bench-*/dsft-cache "$OUT"/bench-*/pretokenized \
  "$OUT"/bench-*/tokenizer "$OUT"/profile*/model "$OUT"/profile*/cache "$OUT"/bench-*/runs/*/final \
  "$OUT"/vlm/*/model "$OUT"/vlm/*/run/final "$OUT"/vlm/*/run/checkpoints
find "$OUT" \( -name "*.safetensors" -o -name "*.pt" -o -name "*.bin" \) -delete 2>/dev/null
echo
cat "$OUT/summary.md"
echo "written: $OUT (summary.md)"
# exit 0 when every stage that ran passed
! grep -qE "FAILED|TIMEOUT" "$STATUS"
