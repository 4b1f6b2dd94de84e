#!/usr/bin/env bash
# NPROC local ranks of `dsft train` under DeepSpeed's launcher (it appends --local_rank,
# which dsft ignores: ranks come from the environment). MASTER_PORT overrides 29500.
#   launch/deepspeed.sh 8 my.yaml deepspeed.zero_stage=3
set -euo pipefail
nproc=${1:?usage: launch/deepspeed.sh NPROC CONFIG [key=value ...]}
shift
exec deepspeed --num_gpus "$nproc" --master_port "${MASTER_PORT:-29500}" --module dsft train "$@"
