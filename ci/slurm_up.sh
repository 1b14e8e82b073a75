#!/usr/bin/env bash
# Bring up a real single-node Slurm cluster on this machine (CI and local testing).
#
#   sudo ci/slurm_up.sh            # installs (if missing) and starts munge, MariaDB, slurmdbd,
#                                  # slurmctld, slurmd; waits until the node is idle
#   MEGAFIRE_SLURM_NO_DB=1 ci/slurm_up.sh   # no accounting (no sacct): skips MariaDB/slurmdbd
#   FAKE_GPUS=2 ci/slurm_up.sh     # advertise 2 fake GPU GRES (tests --gpus logic without GPUs)
#
# Runs as root, without systemd (daemons are started by hand and tracked by pid file).
# Idempotent: when everything is already up and the configuration is unchanged it returns in
# well under a second. Every daemon it starts is recorded in $STATE/started so that
# ci/slurm_down.sh stops exactly those and nothing else.
#
# Layout: configuration in /etc/slurm (where Debian's client commands look), everything else
# under $MEGAFIRE_SLURM_STATE (default /var/lib/megafire-slurm): spool/, log/, run/ (pid files).
set -euo pipefail

STATE=${MEGAFIRE_SLURM_STATE:-/var/lib/megafire-slurm}
NODE=${MEGAFIRE_SLURM_NODE:-localhost}
CLUSTER=${MEGAFIRE_SLURM_CLUSTER:-megafire-ci}
WITH_DB=1; [ "${MEGAFIRE_SLURM_NO_DB:-0}" = 1 ] && WITH_DB=0
FAKE_GPUS=${FAKE_GPUS:-0}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
RUN=$STATE/run
LOG=$STATE/log
T0=$(date +%s%N)
say() { printf '[slurm_up %5.1fs] %s\n' "$(( ($(date +%s%N) - T0) / 1000000 ))e-3" "$*"; }
die() { echo "[slurm_up] ERROR: $*" >&2; exit 1; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
record() { grep -qx "$1" "$STATE/started" 2>/dev/null || echo "$1" >> "$STATE/started"; }
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local n=$(( $1 * 4 )) what=$2; shift 2
  for _ in $(seq 1 "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out waiting for $what"
}

# --------------------------------------------------------------------------------------------
# 1. packages
need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm slurm-client)
command -v munged >/dev/null || need+=(munge)
if [ "$WITH_DB" = 1 ]; then
  command -v slurmdbd >/dev/null || need+=(slurmdbd)
  command -v mariadbd >/dev/null || need+=(mariadb-server)
fi
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and this is not root: cannot install ${need[*]}"
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${need[@]}" >"/tmp/megafire-slurm-apt.log" 2>&1; then
    apt-get update -q >>"/tmp/megafire-slurm-apt.log" 2>&1
    apt-get install -y -q --no-install-recommends "${need[@]}" >>"/tmp/megafire-slurm-apt.log" 2>&1 \
      || { tail -20 /tmp/megafire-slurm-apt.log >&2; die "apt-get install failed"; }
  fi
  say "installed"
fi
[ "$(id -u)" = 0 ] || die "must run as root (starts munged/slurmctld/slurmd)"

# --------------------------------------------------------------------------------------------
# 2. configuration (written to a temporary file; daemons restart only when it changed)
mkdir -p "$STATE" "$RUN" "$LOG" "$STATE/spool/slurmd"
install -d -o slurm -g slurm "$STATE/spool/slurmctld"
chown slurm:slurm "$RUN" "$LOG"
touch "$STATE/started"

CPUS=$(nproc)
MEM=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 - 1024 ))
GRES_NODE=""; GRES_TYPES=""
mkdir -p /etc/slurm
if [ "$FAKE_GPUS" -gt 0 ]; then
  for i in $(seq 0 $((FAKE_GPUS - 1))); do [ -e /dev/fakegpu$i ] || mknod /dev/fakegpu$i c 1 3; done
  printf 'AutoDetect=off\nNodeName=%s Name=gpu File=/dev/fakegpu[0-%d]\n' "$NODE" $((FAKE_GPUS - 1)) > /etc/slurm/gres.conf
  GRES_NODE="Gres=gpu:$FAKE_GPUS"; GRES_TYPES="GresTypes=gpu"
fi
if [ "$WITH_DB" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=10"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
NEW_CONF=$(mktemp)
cat > "$NEW_CONF" <<CONF
# Written by megafire ci/slurm_up.sh -- single-node test cluster. Do not edit by hand.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire seconds before they may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobCompType=jobcomp/none
$ACCT
$GRES_TYPES
JobRequeue=1
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM $GRES_NODE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
CONF_CHANGED=0
if ! cmp -s "$NEW_CONF" "$CONF"; then
  install -m 644 "$NEW_CONF" "$CONF"; CONF_CHANGED=1
fi
rm -f "$NEW_CONF"

# Quick path: everything up, configuration unchanged.
if [ "$CONF_CHANGED" = 0 ] && alive "$RUN/slurmctld.pid" && alive "$RUN/slurmd.pid" \
   && { [ "$WITH_DB" = 0 ] || { alive "$RUN/slurmdbd.pid" && mariadb-admin ping >/dev/null 2>&1; }; } \
   && sinfo -h -N -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  say "already up"; sinfo; exit 0
fi

# --------------------------------------------------------------------------------------------
# 3. munge (the key is made by the package's postinst; /run/munge is not, without systemd)
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --force; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged --force   # daemonizes; pid file /run/munge/munged.pid
  record munged
  wait_for 10 munged sh -c 'munge -n | unmunge'
  say "munged started"
fi

# --------------------------------------------------------------------------------------------
# 4. accounting: MariaDB + slurmdbd (so that sacct works)
stop_pid() {  # stop_pid PIDFILE: SIGTERM, wait until gone
  local f=$1 p; [ -s "$f" ] || return 0; p=$(cat "$f")
  kill "$p" 2>/dev/null || return 0
  for _ in $(seq 1 80); do kill -0 "$p" 2>/dev/null || return 0; sleep 0.25; done
  die "process $p ($f) did not stop"
}
if [ "$WITH_DB" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  [ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
  if ! mariadb-admin ping >/dev/null 2>&1; then
    nohup mariadbd --user=mysql --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
      --pid-file=/run/mysqld/mysqld.pid --skip-networking --innodb-buffer-pool-size=64M \
      >"$LOG/mariadb.log" 2>&1 </dev/null &
    record mariadb
    wait_for 60 mariadb mariadb-admin ping
    say "mariadb started"
  fi
  DB_PASS_FILE=$STATE/dbpass
  [ -s "$DB_PASS_FILE" ] || { head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$DB_PASS_FILE"; chmod 600 "$DB_PASS_FILE"; }
  DB_PASS=$(cat "$DB_PASS_FILE")
  mariadb -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
  NEW_DBD=$(mktemp)
  cat > "$NEW_DBD" <<CONF
# Written by megafire ci/slurm_up.sh
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
CONF
  if ! cmp -s "$NEW_DBD" "$DBD_CONF"; then
    install -m 600 -o slurm -g slurm "$NEW_DBD" "$DBD_CONF"
    alive "$RUN/slurmdbd.pid" && stop_pid "$RUN/slurmdbd.pid"
  fi
  rm -f "$NEW_DBD"
  if ! alive "$RUN/slurmdbd.pid"; then
    /usr/sbin/slurmdbd   # daemonizes
    record slurmdbd
    wait_for 60 slurmdbd sacctmgr -n list cluster
    say "slurmdbd started"
  fi
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    say "cluster $CLUSTER added to the accounting database"
  fi
fi

# --------------------------------------------------------------------------------------------
# 5. slurmctld + slurmd (restarted when the configuration changed)
if [ "$CONF_CHANGED" = 1 ]; then
  alive "$RUN/slurmd.pid" && { stop_pid "$RUN/slurmd.pid"; say "slurmd stopped (new config)"; }
  alive "$RUN/slurmctld.pid" && { stop_pid "$RUN/slurmctld.pid"; say "slurmctld stopped (new config)"; }
fi
if ! alive "$RUN/slurmctld.pid"; then
  /usr/sbin/slurmctld   # daemonizes
  record slurmctld
  wait_for 30 slurmctld scontrol ping
  say "slurmctld started"
fi
if ! alive "$RUN/slurmd.pid"; then
  /usr/sbin/slurmd -N "$NODE"
  record slurmd
  say "slurmd started"
fi
state=""
for i in $(seq 1 240); do
  state=$(sinfo -h -N -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    down*|drain*|fail*) [ $((i % 8)) = 1 ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.25
done
case "$state" in idle|mixed|allocated) ;; *) sinfo -N -l >&2 || true; die "node did not become idle (state: ${state:-?}); logs in $LOG" ;; esac
say "node $NODE $state (CPUs=$CPUS, accounting=$([ "$WITH_DB" = 1 ] && echo slurmdbd || echo none))"
sinfo
