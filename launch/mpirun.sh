#!/usr/bin/env bash
# NP ranks of `dsft train` under OpenMPI's mpirun: ranks from OMPI_COMM_WORLD_*, rank 0's
# host broadcast over MPI (mpi4py). PYTHON picks the interpreter (default: python).
#   launch/mpirun.sh 4 my.yaml
set -euo pipefail
np=${1:?usage: launch/mpirun.sh NP CONFIG [key=value ...]}
shift
exec mpirun -np "$np" "${PYTHON:-python}" -m dsft train "$@"
