#!/usr/bin/env bash
# One training process per srun task:
#   srun --ntasks-per-node=G launch/task.sh megafire train --config C ...
# srun does not set RANK / WORLD_SIZE: derive them (and LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK,
# MASTER_ADDR, MASTER_PORT) from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST /
# SLURM_JOB_ID, then exec the command (exec: no shell stays in between, so Slurm's signals --
# SIGUSR1 before the time limit, SIGTERM on cancel/requeue -- reach the trainer itself).
# Without Slurm it runs the command as rank 0 of 1 (or keeps RANK/WORLD_SIZE already set).
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
eval "$("${MEGAFIRE_LAUNCH_PYTHON:-python3}" "$HERE/slurm_env.py" --mode task)"
# One GPU per task: when Slurm bound no GPU to the task itself, the trainer selects
# cuda:LOCAL_RANK (CUDA_VISIBLE_DEVICES lists the node's GPUs).
if [ "${MEGAFIRE_LAUNCH_VERBOSE:-0}" = 1 ]; then
  echo "[launch/task] rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE node $NODE_RANK/$NNODES master $MASTER_ADDR:$MASTER_PORT" >&2
fi
exec "$@"
