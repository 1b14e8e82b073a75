#!/usr/bin/env bash
# The deepspeed launcher with Slurm's layout, without ssh/pdsh. Run it ONCE PER NODE:
#   srun --ntasks-per-node=1 launch/deepspeed.sh [--nproc-per-node N] [--] megafire train --config C ...
#   launch/deepspeed.sh --nproc-per-node 2 -- megafire train ...     # plain single node, no Slurm
# Writes a hostfile ("host slots=N" per node of SLURM_NODELIST) and calls
#   deepspeed --hostfile F --no_ssh --node_rank R --master_addr A --master_port P --no_local_rank
# on every node; the deepspeed launcher then sets RANK/LOCAL_RANK/WORLD_SIZE for its children.
# --no_local_rank: our entry points read LOCAL_RANK from the environment, not --local_rank.
# Signals as in launch/torchrun.sh: the launcher ignores SIGUSR1, the workers handle it.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NPROC=""
while [ $# -gt 0 ]; do
  case "$1" in
    --nproc-per-node|--nproc_per_node|--num_gpus) NPROC=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*|--num_gpus=*) NPROC=${1#*=}; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[ $# -gt 0 ] || { echo "usage: $0 [--nproc-per-node N] [--] CMD [ARGS...]" >&2; exit 2; }
eval "$("${MEGAFIRE_LAUNCH_PYTHON:-python3}" "$HERE/slurm_env.py" --mode node ${NPROC:+--nproc-per-node "$NPROC"})"
PY=${MEGAFIRE_PYTHON:-python}
HOSTFILE_DIR=${TMPDIR:-/tmp}/megafire-ds-${SLURM_JOB_ID:-local-$$}
mkdir -p "$HOSTFILE_DIR"
HOSTFILE=$HOSTFILE_DIR/hostfile.$NODE_RANK
if [ -n "$MEGAFIRE_HOSTS" ]; then
  for h in $MEGAFIRE_HOSTS; do echo "$h slots=$NPROC_PER_NODE"; done > "$HOSTFILE"
else
  echo "localhost slots=$NPROC_PER_NODE" > "$HOSTFILE"
fi
args=(--hostfile="$HOSTFILE" --no_ssh --node_rank="$NODE_RANK" --master_addr="$MASTER_ADDR"
      --master_port="$MASTER_PORT" --no_local_rank)
case "$1" in *.py) ;; *) args+=(--no_python) ;; esac
echo "[launch/deepspeed] node $NODE_RANK/$NNODES x $NPROC_PER_NODE procs, master $MASTER_ADDR:$MASTER_PORT" >&2
trap '' USR1
exec "$PY" -m deepspeed.launcher.runner "${args[@]}" "$@"
