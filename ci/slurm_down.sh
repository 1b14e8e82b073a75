#!/usr/bin/env bash
# Stop what ci/slurm_up.sh started, by pid file, newest first; never by process name.
# Daemons that were already running before slurm_up.sh (not listed in $STATE/started) are left
# alone. Jobs still queued on the test cluster are cancelled first (only with --cancel-jobs).
#   ci/slurm_down.sh [--cancel-jobs] [--purge]   # --purge also removes $STATE (spool, logs)
set -uo pipefail
STATE=${MEGAFIRE_SLURM_STATE:-/var/lib/megafire-slurm}
RUN=$STATE/run
CANCEL=0; PURGE=0
for a in "$@"; do
  case "$a" in --cancel-jobs) CANCEL=1 ;; --purge) PURGE=1 ;; *) echo "unknown option $a" >&2; exit 2 ;; esac
done
[ -f "$STATE/started" ] || { echo "[slurm_down] nothing recorded in $STATE/started"; exit 0; }

stop_pid() {  # stop_pid NAME PIDFILE
  local name=$1 f=$2 p
  [ -s "$f" ] || { echo "[slurm_down] $name: no pid file $f"; return 0; }
  p=$(cat "$f")
  kill "$p" 2>/dev/null || { echo "[slurm_down] $name ($p) not running"; return 0; }
  for _ in $(seq 1 80); do kill -0 "$p" 2>/dev/null || { echo "[slurm_down] stopped $name ($p)"; return 0; }; sleep 0.25; done
  echo "[slurm_down] $name ($p) ignored SIGTERM for 20 s; sending SIGKILL"; kill -9 "$p" 2>/dev/null
}

if [ "$CANCEL" = 1 ] && command -v scancel >/dev/null; then
  scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
  for _ in $(seq 1 40); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.25; done
fi

for name in $(tac "$STATE/started"); do
  case "$name" in
    slurmd)    stop_pid slurmd "$RUN/slurmd.pid" ;;
    slurmctld) stop_pid slurmctld "$RUN/slurmctld.pid" ;;
    slurmdbd)  stop_pid slurmdbd "$RUN/slurmdbd.pid" ;;
    mariadb)   stop_pid mariadb /run/mysqld/mysqld.pid ;;
    munged)    stop_pid munged /run/munge/munged.pid ;;
  esac
done
: > "$STATE/started"
if [ "$PURGE" = 1 ]; then rm -rf "$STATE"; echo "[slurm_down] removed $STATE"; fi
exit 0
