#!/usr/bin/env bash
# Issue 7: the same model trained in four layouts on 8 GPUs (or 2 x 8 under Slurm), bf16, fused
# attention, recording tokens/s, MFU, peak memory per GPU and the loss trace of each, then
# comparing the traces (launch/compare_traces.py).
#
#   launch/eight_gpu.sh [--steps 300] [--out runs/eight-gpu] [--config configs/arms/350m-fire.yaml]
#                       [--layouts "z1 z3 tp2pp2 tp4"] [--dry-run] [-- EXTRA_TRAINER_OVERRIDES...]
#
# Layouts (data parallel = world / (tp * pp); on 8 GPUs):
#   z1      DP=8, ZeRO-1              z3      DP=8, ZeRO-3
#   tp2pp2  TP=2 x PP=2 x DP=2, ZeRO-1 (pipelines need ZeRO-1)
#   tp4     TP=4 x DP=2, ZeRO-1
# and for two GPUs (NPROC_PER_NODE=2): one (1 GPU), dp2 (DP=2), tp2 (TP=2), pp2 (PP=2), ZeRO-1.
# On one node the processes come from torchrun (--nproc-per-node = GPUs, default 8); inside a
# Slurm allocation (slurm/eight-gpu.sbatch: 2 nodes x 8) from `srun launch/task.sh`, so the
# same layouts run with DP doubled. Every run uses one sequence length (2048, the 350m arm's
# final curriculum stage) so that the throughput is the steady-state one, and no checkpoints.
#
# Micro-batches are fixed in tokens (the config's train.micro_batch_tokens), so every layout
# draws the same global batches per step (DP=8 ranks one micro-batch each, DP=2 ranks four
# each) and the loss traces are comparable step by step.
#
# --dry-run: the CPU rehearsal. 8 gloo processes (torchrun on this machine), for each layout
# (1) megafire.parallel.describe checks and prints the tp/dp/pp groups of every rank, (2) a tiny
# model of the same config family trains 2 steps in fp32 with the reference attention; then
# the traces are compared. Needs no GPU; slow on small machines (8 processes import torch).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
STEPS=300
OUT=runs/eight-gpu
CONFIG=configs/arms/350m-fire.yaml
LAYOUTS="z1 z3 tp2pp2 tp4"
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --config) CONFIG=$2; shift 2 ;;
    --layouts) LAYOUTS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
EXTRA=("$@")
PY=${MEGAFIRE_PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python

layout_args() {   # layout name -> trainer overrides
  case "$1" in
    z1)     echo "--parallel.tp=1 --parallel.pp=1 --parallel.zero_stage=1" ;;
    z3)     echo "--parallel.tp=1 --parallel.pp=1 --parallel.zero_stage=3" ;;
    tp2pp2) echo "--parallel.tp=2 --parallel.pp=2 --parallel.zero_stage=1" ;;
    tp4)    echo "--parallel.tp=4 --parallel.pp=1 --parallel.zero_stage=1" ;;
    # the two-GPU set (NPROC_PER_NODE=2): one GPU as the reference, then each kind of parallelism
    one)    echo "--parallel.tp=1 --parallel.pp=1 --parallel.zero_stage=1" ;;
    dp2)    echo "--parallel.tp=1 --parallel.pp=1 --parallel.zero_stage=1" ;;
    tp2)    echo "--parallel.tp=2 --parallel.pp=1 --parallel.zero_stage=1" ;;
    pp2)    echo "--parallel.tp=1 --parallel.pp=2 --parallel.zero_stage=1" ;;
    *) echo "unknown layout $1 (z1 z3 tp2pp2 tp4 one dp2 tp2 pp2)" >&2; return 2 ;;
  esac
}
layout_tp_pp() {
  case "$1" in z1|z3|one|dp2) echo "1 1" ;; tp2pp2) echo "2 2" ;; tp4) echo "4 1" ;; tp2) echo "2 1" ;; pp2) echo "1 2" ;; esac
}

if [ "$DRY" = 1 ]; then
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=""
  NPROC=8
  COMMON=(--config "$CONFIG" --train.max_steps="$STEPS" --train.precision=fp32 --attention.backend=reference
          --data.corpus=synthetic --model.vocab_size=256 --model.hidden_size=64 --model.num_layers=4
          --model.num_heads=4 --model.position.options.init_L=8.0
          "--curriculum.stages=[{seq_len: 32, tokens: 1}]" --train.tokens_per_step=512 --train.micro_batch_tokens=64
          --train.warmup_tokens=0 --train.checkpoint_every_steps=0 --train.log_every_steps=1
          --tracking.enabled=false --train.progress=false --data.num_workers=0)
  launch() { "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"; }
else
  NPROC=${NPROC_PER_NODE:-8}
  COMMON=(--config "$CONFIG" --train.max_steps="$STEPS" --train.precision=bf16 --attention.backend=fused
          "--curriculum.stages=[{seq_len: 2048, tokens: 1}]" --train.checkpoint_every_steps=0
          --train.log_every_steps=1 --train.progress=false)
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    launch() { srun --kill-on-bad-exit=1 "$ROOT/launch/task.sh" "$PY" "$@"; }
  else
    launch() { "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" "$@"; }
  fi
fi
ALL_NPROC=$NPROC

mkdir -p "$OUT"
RUNS=()
for layout in $LAYOUTS; do
  read -r -a largs <<< "$(layout_args "$layout")"
  run="$OUT/$layout"
  rm -rf "$run"
  NPROC=$([ "$layout" = one ] && echo 1 || echo "$ALL_NPROC")   # "one": the single-GPU reference
  echo "=== $layout ($NPROC processes): ${largs[*]} -> $run" >&2
  if [ "$DRY" = 1 ]; then
    read -r tp pp <<< "$(layout_tp_pp "$layout")"
    launch -m megafire.parallel.describe --tp "$tp" --pp "$pp"
  fi
  launch -m megafire.cli train "${COMMON[@]}" "${largs[@]}" "--run.dir=$run" "--run.name=eight-gpu-$layout" \
    "${EXTRA[@]}"
  RUNS+=("$run")
done
# bf16 layouts sum in different orders: traces agree to ~1e-2 relative, fp32 dry runs to ~1e-5
TOL=$([ "$DRY" = 1 ] && echo 1e-4 || echo 2e-2)
"$PY" "$ROOT/launch/compare_traces.py" --rtol "$TOL" --out "$OUT/comparison.md" "${RUNS[@]}"
