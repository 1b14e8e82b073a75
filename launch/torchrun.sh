#!/usr/bin/env bash
# torchrun with Slurm's layout. Run it ONCE PER NODE:
#   srun --ntasks-per-node=1 launch/torchrun.sh [--nproc-per-node N] [--] megafire train --config C ...
#   launch/torchrun.sh --nproc-per-node 2 -- megafire train ...      # plain single node, no Slurm
# nnodes / node rank come from SLURM_NNODES / SLURM_NODEID, the master address from the first
# host of SLURM_NODELIST (scontrol show hostnames), the port from SLURM_JOB_ID, processes per
# node from --nproc-per-node, else NPROC_PER_NODE, else the GPUs Slurm gave the node, else 1.
# A command ending in .py is run by torchrun's Python; anything else with --no-python.
#
# Signals: Slurm signals every process of the step. The torchrun agent ignores SIGUSR1 (set
# here), so only the workers react to it (checkpoint + exit 124, slurm/README.md). torchrun
# reports a worker's exit 124 as a failure (exit 1); the sbatch scripts account for that.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NPROC=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node) NPROC=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) NPROC=${1#*=}; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--nproc-per-node N] [--] CMD [ARGS...]" >&2; exit 2; }
eval "$("${MEGAFIRE_LAUNCH_PYTHON:-python3}" "$HERE/slurm_env.py" --mode node ${NPROC:+--nproc-per-node "$NPROC"})"
PY=${MEGAFIRE_PYTHON:-python}
args=(--nnodes="$NNODES" --node-rank="$NODE_RANK" --nproc-per-node="$NPROC_PER_NODE"
      --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" --max-restarts=0)
[ "$NNODES" = 1 ] && [ -z "${SLURM_JOB_ID:-}" ] && args=(--standalone --nproc-per-node="$NPROC_PER_NODE")
case "$1" in *.py) ;; *) args+=(--no-python) ;; esac
echo "[launch/torchrun] node $NODE_RANK/$NNODES x $NPROC_PER_NODE procs, master $MASTER_ADDR:$MASTER_PORT" >&2
trap '' USR1
exec "$PY" -m torch.distributed.run "${args[@]}" "$@"
