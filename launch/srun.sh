#!/usr/bin/env bash
# Inside a Slurm allocation: one task per GPU, TASKS_PER_NODE on each node, ranks from
# SLURM_PROCID / SLURM_LOCALID, rank 0's host from the node list, port from the job id.
#   salloc -N 2 --gpus-per-node 8 launch/srun.sh 8 my.yaml
set -euo pipefail
tasks=${1:?usage: launch/srun.sh TASKS_PER_NODE CONFIG [key=value ...]}
shift
exec srun --ntasks-per-node "$tasks" --kill-on-bad-exit=1 "${PYTHON:-python}" -m dsft train "$@"
