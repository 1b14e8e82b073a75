# shellcheck shell=bash
# Shared body of the sbatch templates in this folder (sourced, not run). See slurm/README.md.
#
# megafire_slurm_train [TRAINER_OVERRIDES...]
#   Environment (all optional; pass with `sbatch --export=ALL,NAME=value`):
#     MEGAFIRE_ROOT  repository root (default: the submit directory)
#     CONFIG         --config file for the trainer
#     RUN_DIR        run directory (default runs/<job name>-<job id>; stable across requeues)
#     TRAIN_CMD      trainer command (default: .venv/bin/megafire train, else megafire train)
#     LAUNCHER       task      one srun task per process, RANK etc. from launch/task.sh (default)
#                    torchrun  one srun task per node running launch/torchrun.sh
#                    deepspeed one srun task per node running launch/deepspeed.sh
#     NPROC_PER_NODE processes per node for torchrun/deepspeed (default: GPUs on the node)
#     MAX_REQUEUES   stop requeueing after this many restarts (default 20)
#     SRUN_ARGS      extra srun options (word-split)
#     SRUN_WAIT      seconds the other tasks may run on after the first one ended (default 60)
#
# Life cycle of one run of the job:
#   1. resume: if $RUN_DIR/checkpoints/latest exists, add --train.resume=true
#   2. start the training step with srun in the background and wait for it
#   3. SIGUSR1 to this script (sbatch --signal=B:USR1@SECONDS, before the time limit): write
#      $RUN_DIR/STOP and forward SIGUSR1 to srun, which passes it to every process of the
#      training step; the trainer checkpoints at the next step boundary (whichever of the two
#      reaches it first), removes STOP and exits 124
#   4. step exit 0 (no SIGUSR1 seen): done. Exit 124, or any exit after our SIGUSR1: `scontrol requeue` the job
#      (it restarts under the same job id and resumes from latest). SIGTERM from Slurm
#      (scancel, an external requeue, preemption): wait for the trainer's checkpoint, no requeue
#      of our own. Any other failure: exit with the step's code, no requeue (no crash loops).

EXIT_PREEMPTED=124

_mf_log() { echo "[megafire-slurm $(date +%H:%M:%S)] $*"; }

# SIGUSR1 to the training step: srun passes it to its step on every node by talking to the
# nodes' slurmd directly, and slurmstepd signals the whole process tree of each task (torchrun's
# workers included). `scancel --signal=USR1 JOBID` goes through slurmctld instead; once in CI
# (Slurm 22.05) that request reached slurmctld (REQUEST_KILL_JOB in its log) but the trainer
# never stopped and trained to the end; later the srun path lost one too (CI, Slurm 22.05). So
# the stop file comes first: the trainer's rank 0 checks for it at every step boundary and all
# ranks agree on the stop, so it needs no signal to arrive anywhere. The signal stays as the
# fast path, scancel as the fallback for when srun is gone.
_mf_forward_usr1() {
  if [ -n "${_MF_RUN_DIR:-}" ]; then
    mkdir -p "$_MF_RUN_DIR" && : > "$_MF_RUN_DIR/STOP" \
      || _mf_log "warning: could not write the stop request $_MF_RUN_DIR/STOP"
  fi
  if [ -n "${_MF_STEP_PID:-}" ] && kill -USR1 "$_MF_STEP_PID" 2>/dev/null; then
    return 0
  fi
  scancel --signal=USR1 "$SLURM_JOB_ID" || _mf_log "warning: could not forward SIGUSR1 to the training step"
}

megafire_slurm_train() {
  set -uo pipefail
  local root=${MEGAFIRE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  cd "$root" || { _mf_log "cannot cd to $root"; return 2; }
  if [ -z "${SLURM_JOB_ID:-}" ]; then
    _mf_log "not inside a Slurm job: submit with sbatch (or use launch/*.sh directly)"; return 2
  fi
  local run_dir=${RUN_DIR:-runs/${SLURM_JOB_NAME:-megafire}-${SLURM_JOB_ID}}
  local launcher=${LAUNCHER:-task}
  local restarts=${SLURM_RESTART_COUNT:-0}
  local max_requeues=${MAX_REQUEUES:-20}
  local -a cmd args srun_opts launch
  if [ -n "${TRAIN_CMD:-}" ]; then
    read -r -a cmd <<< "$TRAIN_CMD"
  elif [ -x "$root/.venv/bin/megafire" ]; then
    cmd=("$root/.venv/bin/megafire" train)
  else
    cmd=(megafire train)
  fi
  [ -n "${CONFIG:-}" ] && args+=(--config "$CONFIG")
  args+=("--run.dir=$run_dir")
  if [ -e "$run_dir/checkpoints/latest" ]; then
    args+=(--train.resume=true)
    _mf_log "resuming: $run_dir/checkpoints/latest -> $(cat "$run_dir/checkpoints/latest")"
  elif [ "$restarts" -gt 0 ] && [ -d "$run_dir" ]; then
    args+=(--train.resume=true)   # requeued before its first checkpoint: same run, from step 0
    _mf_log "requeued run without a checkpoint yet: --train.resume=true starts it from step 0"
  fi
  args+=("$@")

  case "$launcher" in
    task)      launch=("$root/launch/task.sh") ;;
    torchrun)  launch=("$root/launch/torchrun.sh" ${NPROC_PER_NODE:+--nproc-per-node "$NPROC_PER_NODE"} --)
               srun_opts=(--ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}") ;;
    deepspeed) launch=("$root/launch/deepspeed.sh" ${NPROC_PER_NODE:+--nproc-per-node "$NPROC_PER_NODE"} --)
               srun_opts=(--ntasks="${SLURM_NNODES:-1}" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}") ;;
    *) _mf_log "unknown LAUNCHER=$launcher (task|torchrun|deepspeed)"; return 2 ;;
  esac
  # shellcheck disable=SC2206
  [ -n "${SRUN_ARGS:-}" ] && srun_opts+=($SRUN_ARGS)

  _mf_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart $restarts on ${SLURM_JOB_NODELIST:-?}:" \
          "$SLURM_NNODES node(s), ${SLURM_NTASKS:-?} task(s), launcher $launcher, run dir $run_dir"
  if [ "$restarts" -gt "$max_requeues" ]; then
    _mf_log "restart count $restarts > MAX_REQUEUES=$max_requeues: giving up"; return 3
  fi

  # A STOP left over from a run that died before honouring it would stop this one at once
  rm -f "$run_dir/STOP"
  _MF_SIGNAL="" _MF_STEP_PID="" _MF_RUN_DIR=$run_dir
  trap '_MF_SIGNAL=USR1; _mf_log "SIGUSR1 (time limit near): asking the trainer to checkpoint and exit";
        _mf_forward_usr1' USR1
  trap '_MF_SIGNAL=TERM; _mf_log "SIGTERM from Slurm: waiting for the trainer to checkpoint"' TERM

  _mf_log "srun ${srun_opts[*]} ${launch[*]} ${cmd[*]} ${args[*]}"
  # No --kill-on-bad-exit: after a preemption checkpoint every rank exits 124, and killing the
  # slowest (rank 0 still committing `latest`) would be wrong. --wait instead: once the first
  # task has ended, the others get SRUN_WAIT seconds before Slurm terminates them (a crashed
  # rank does not leave the rest hanging in a collective until the NCCL timeout).
  srun --kill-on-bad-exit=0 --wait="${SRUN_WAIT:-60}" "${srun_opts[@]}" "${launch[@]}" "${cmd[@]}" "${args[@]}" &
  local pid=$! rc
  _MF_STEP_PID=$pid
  while :; do
    wait "$pid"; rc=$?
    kill -0 "$pid" 2>/dev/null || break       # wait returned because a trap ran: keep waiting
  done
  local rc2; wait "$pid" 2>/dev/null; rc2=$?    # a trap may have raced the step's exit:
  [ "$rc2" != 127 ] && rc=$rc2                    # bash >= 5.1 keeps the step's own status
  trap - USR1 TERM

  if [ "$rc" = 0 ] && [ "$_MF_SIGNAL" != USR1 ]; then
    _mf_log "training step finished (exit 0)"; return 0
  fi
  if [ "$_MF_SIGNAL" = TERM ]; then
    _mf_log "step exit $rc after SIGTERM: Slurm is ending this run; no requeue of our own"; return "$rc"
  fi
  if [ "$rc" = "$EXIT_PREEMPTED" ] || [ "$_MF_SIGNAL" = USR1 ]; then
    # After our SIGUSR1 any exit status means "stopped" (torchrun turns a worker's 124 into 1; a
    # trainer may exit 0). Requeueing a run that had in fact just finished is harmless: it
    # resumes from its final checkpoint and exits at once.
    [ "$rc" = "$EXIT_PREEMPTED" ] || _mf_log "warning: step exit $rc (expected $EXIT_PREEMPTED) after SIGUSR1"
    _mf_log "trainer checkpointed and stopped (exit $rc): scontrol requeue $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      sleep 30 & wait $!    # Slurm ends this run of the job now
      return 0
    fi
    _mf_log "scontrol requeue failed"; return "$rc"
  fi
  _mf_log "training step failed (exit $rc)"; return "$rc"
}
