#!/usr/bin/env bash
# Create ./.venv and install dsft (editable) with its dev tools.
#
# Without an NVIDIA GPU, torch is pinned to the CPU build through
# scripts/constraints-cpu.txt (pip on CPU machines finds the local CPU wheel); with a GPU
# (nvidia-smi works), pip resolves the regular CUDA build of torch.
# Force either with DSFT_TORCH=cpu or DSFT_TORCH=cuda.
# DeepSpeed is an sdist: DS_BUILD_OPS=0 builds it without compiling CUDA ops
# (they are JIT-compiled on first use where needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=${VENV:-.venv}
torch_kind=${DSFT_TORCH:-auto}
if [ "$torch_kind" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_kind=cuda
  else
    torch_kind=cpu
  fi
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
if [ "$torch_kind" = cpu ]; then
  export PIP_CONSTRAINT="$PWD/scripts/constraints-cpu.txt"
fi
echo "dsft setup: torch=$torch_kind venv=$venv"
start=$(date +%s)
DS_BUILD_OPS=0 "$venv/bin/pip" install --quiet --progress-bar off -e '.[dev]' 2> >(grep -v "is ignored: it is neither" >&2)
"$venv/bin/python" -c "import torch, deepspeed, transformers; print(f'dsft setup: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep "dsft setup"
echo "dsft setup: done in $(( $(date +%s) - start ))s"
