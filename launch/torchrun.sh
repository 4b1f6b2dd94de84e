#!/usr/bin/env bash
# NPROC local ranks of `dsft train` under torchrun (one node; what `dsft launch` does).
#   launch/torchrun.sh 8 my.yaml train.lr=2e-5
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC CONFIG [key=value ...]}
shift
exec torchrun --standalone --nproc_per_node "$nproc" -m dsft train "$@"
