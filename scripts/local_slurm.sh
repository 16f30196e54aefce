#!/usr/bin/env bash
# A real 2-node Slurm cluster on this one machine, for trying `moectl ... --slurm` and for the tests.
#
#   eval "$(bash scripts/local_slurm.sh start)"   install if missing, start, wait for both nodes idle,
#                                                 print `export SLURM_CONF=...` (only that on stdout)
#   bash scripts/local_slurm.sh status            our daemons (pid, alive), sinfo, squeue
#   bash scripts/local_slurm.sh stop [--purge]    cancel our jobs, end only the daemons started here;
#                                                 --purge also removes the state directory
#
# What runs: a private munged, slurmctld, and two slurmd started as `slurmd -N n1` / `-N n2` on their
# own ports, all on 127.0.0.1, all as root (SlurmUser=root). Debian bookworm's slurm-wlm 22.05 and
# munge are installed with apt-get when `sbatch`, `slurmctld`, `slurmd` or `munged` is missing.
# ProctrackType=proctrack/linuxproc and TaskPlugin=task/none need neither systemd nor cgroups.
#
# State: everything (slurm.conf, munge key and socket, controller state, spool, logs, pid files)
# lives in ONE directory, ${MOECTL_SLURM_DIR:-<this checkout>/.slurm} (git-ignored). Nothing is read
# from or written to /etc/slurm or /etc/munge: the private munged has its own key and socket
# (slurm.conf's AuthInfo points Slurm at it), so a system munged with another key, or none, does not
# matter, and `stop` never touches a munged it did not start. Per-checkout state means two clones
# (or a CI clone) never share pid files or job state; they can still clash on ports, which `start`
# detects and names. Controller state is kept across stop/start so job ids keep increasing and an old
# run record's job id never names a newer job.
#
# Ports (override when another cluster or checkout holds them):
#   MOECTL_SLURM_CTLD_PORT (6817), MOECTL_SLURM_N1_PORT (6818), MOECTL_SLURM_N2_PORT (6819)
#
# Nodes: n1 and n2 each claim all of this machine's CPUs (CPUs=$(nproc)), so the two nodes
# oversubscribe the same cores 2x: $(nproc) single-CPU jobs run at once on each node (4 on a 2-core
# machine; the 5th waits for Resources), and a node can take `--ntasks-per-node=$(nproc)`. Memory is not a consumable resource (CR_Core), so jobs need no
# --mem.
#
# Accounting: none (AccountingStorageType=accounting_storage/none, JobAcctGatherType=
# jobacct_gather/none): `sacct` has no database to ask and answers with an error, so a finished job
# is visible only in `scontrol show job` for MinJobAge (300 s) and in the completion log
# <state dir>/log/jobcomp.txt (JobCompType=jobcomp/filetxt), one line per finished job with its
# JobState and ExitCode. `scontrol requeue` works without accounting.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
DIR=${MOECTL_SLURM_DIR:-$REPO/.slurm}
CONF=$DIR/slurm.conf
CTLD_PORT=${MOECTL_SLURM_CTLD_PORT:-6817}
N1_PORT=${MOECTL_SLURM_N1_PORT:-6818}
N2_PORT=${MOECTL_SLURM_N2_PORT:-6819}
MUNGE_SOCKET=$DIR/munge/munge.socket
START_TIMEOUT_S=${MOECTL_SLURM_START_TIMEOUT_S:-60}
STOP_TIMEOUT_S=30

say() { echo "[local_slurm] $*" >&2; }
die() { echo "local_slurm: $*" >&2; exit 1; }

# ---- our processes: a pid file in $DIR whose process still runs the expected program on our files
pidfile_of() {
  case $1 in
    munged) echo "$DIR/run/munged.pid" ;;
    slurmctld) echo "$DIR/run/slurmctld.pid" ;;
    n1 | n2) echo "$DIR/run/slurmd-$1.pid" ;;
  esac
}

# Prints the pid when that daemon is alive and is ours (pid reuse by an unrelated process, or a
# daemon of another cluster, does not count: its command line must name our conf or socket).
our_pid() {
  local file pid cmd
  file=$(pidfile_of "$1")
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  case $1 in
    munged) [[ $cmd == *munged*"$MUNGE_SOCKET"* ]] ;;
    slurmctld) [[ $cmd == *slurmctld*"$CONF"* ]] ;;
    n1 | n2) [[ $cmd == *slurmd*"$CONF"*"-N $1"* ]] ;;
  esac || return 1
  # A zombie still has a /proc entry and its cmdline reads empty; State Z is not "alive".
  [[ $(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null) != Z ]] || return 1
  echo "$pid"
}

port_listening() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

exports() {
  echo "export SLURM_CONF=$CONF"
  echo "export MOECTL_SLURM_DIR=$DIR"
}

# ---- start -----------------------------------------------------------------------------------
ensure_packages() {
  local missing=0 prog
  for prog in sbatch srun sinfo slurmctld slurmd munged munge; do
    command -v "$prog" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$prog" >/dev/null 2>&1 || missing=1
  done
  [ $missing = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are missing and installing them needs root (apt-get install slurm-wlm munge)"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and there is no apt-get here to install them"
  say "installing slurm-wlm and munge with apt-get (one time)"
  local started=$SECONDS
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >&2 \
    || die "apt-get install slurm-wlm munge failed (output above)"
  say "installed in $((SECONDS - started)) s"
}

write_config() {
  local host cpus mem_mb
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 / 2)}' /proc/meminfo)
  mkdir -p "$DIR"/{run,log,ctld,spool/n1,spool/n2}
  cat >"$CONF.tmp" <<EOF
# Written by scripts/local_slurm.sh; rewritten by each \`start\` while no daemon of ours runs.
ClusterName=moectl-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
MailProg=/bin/true
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
PlugStackConfig=$DIR/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# Scheduling passes every second or two (defaults: 60 s / 30 s), so a pending or requeued job on
# this idle toy cluster starts within seconds rather than up to a minute.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# The nodes' CPUs/RealMemory below are declared, not probed: both slurmd share this host.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
JobRequeue=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
  # An empty plugin stack, so /etc/slurm/plugstack.conf (another install's SPANK plugins) is not read.
  : >"$DIR/plugstack.conf"
  mv "$CONF.tmp" "$CONF"
}

check_port_free() { # name port
  port_listening "$2" && die "port $2 (for $1) is already in use by something that is not this cluster; set MOECTL_SLURM_${3}_PORT to a free port (ss -ltnp 'sport = :$2' shows who holds it)"
  return 0
}

start_munged() {
  our_pid munged >/dev/null && return 0
  mkdir -p "$DIR/munge" "$DIR/munge-key"
  # munged refuses a socket directory others cannot search, and a key others can read.
  chmod 755 "$DIR" "$DIR/munge"
  chmod 700 "$DIR/munge-key"
  local key=$DIR/munge-key/munge.key
  if [ ! -s "$key" ]; then
    mungekey --create --keyfile="$key" 2>/dev/null || dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
  fi
  chmod 600 "$key"
  [ ${#MUNGE_SOCKET} -lt 100 ] || die "munge socket path $MUNGE_SOCKET is too long for a unix socket; set MOECTL_SLURM_DIR to a shorter path"
  rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
  munged --socket="$MUNGE_SOCKET" --key-file="$key" --pid-file="$(pidfile_of munged)" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge-key/munged.seed" \
    || die "munged did not start: $(tail -n 3 "$DIR/log/munged.log" 2>/dev/null)"
}

wait_for() { # description seconds command...
  local what=$1 limit=$2 deadline=$((SECONDS + $2))
  shift 2
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.5
  done
}

both_nodes_ready() {
  # `sinfo -N -h -o '%N %t'` lists one line per node; idle, mix and alloc all mean it answers.
  local states
  states=$(SLURM_CONF=$CONF sinfo -N -h -o '%N %t' 2>/dev/null) || return 1
  echo "$states" | grep -Eq '^n1 (idle|mix|alloc)' && echo "$states" | grep -Eq '^n2 (idle|mix|alloc)'
}

start() {
  [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root (SlurmUser=root); run as root"
  ensure_packages
  export PATH=$PATH:/usr/sbin:/sbin
  local any_ours=0 name
  for name in munged slurmctld n1 n2; do our_pid "$name" >/dev/null && any_ours=1; done
  if [ $any_ours = 0 ]; then
    check_port_free slurmctld "$CTLD_PORT" CTLD
    check_port_free "slurmd n1" "$N1_PORT" N1
    check_port_free "slurmd n2" "$N2_PORT" N2
    write_config
  fi
  local began=$SECONDS
  start_munged
  if ! our_pid slurmctld >/dev/null; then
    say "starting slurmctld on port $CTLD_PORT"
    slurmctld -f "$CONF" || die "slurmctld did not start: $(tail -n 5 "$DIR/log/slurmctld.log" 2>/dev/null)"
  fi
  for name in n1 n2; do
    if ! our_pid "$name" >/dev/null; then
      say "starting slurmd -N $name"
      slurmd -f "$CONF" -N "$name" || die "slurmd -N $name did not start: $(tail -n 5 "$DIR/log/slurmd-$name.log" 2>/dev/null)"
    fi
  done
  if ! wait_for "both nodes idle" "$START_TIMEOUT_S" both_nodes_ready; then
    SLURM_CONF=$CONF sinfo -N >&2 || true
    die "n1 and n2 were not both up within ${START_TIMEOUT_S} s; logs in $DIR/log"
  fi
  say "cluster up (nodes ready after $((SECONDS - began)) s); state in $DIR"
  exports
}

# ---- stop / status ---------------------------------------------------------------------------
stop() {
  local purge=0
  [ "${1:-}" = --purge ] && purge=1
  export PATH=$PATH:/usr/sbin:/sbin
  if our_pid slurmctld >/dev/null; then
    # Cancel our jobs first: slurmd exits without ending its jobs' slurmstepd, which would outlive it.
    local jobs
    jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      say "cancelling jobs: $(echo $jobs)"
      # shellcheck disable=SC2086
      SLURM_CONF=$CONF scancel $jobs || true
      wait_for "jobs gone" "$STOP_TIMEOUT_S" no_job_steps_left || say "job steps still running after ${STOP_TIMEOUT_S} s"
    fi
  fi
  local name pid
  for name in n1 n2 slurmctld munged; do
    if pid=$(our_pid "$name"); then
      kill -TERM "$pid" 2>/dev/null || true
      if ! wait_for "$name exits" "$STOP_TIMEOUT_S" pid_gone "$pid"; then
        say "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT_S} s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
      fi
      say "stopped $name (pid $pid)"
    fi
    rm -f "$(pidfile_of "$name")"
  done
  if [ $purge = 1 ]; then
    rm -rf "$DIR"
    say "removed $DIR"
  fi
}

pid_gone() { ! kill -0 "$1" 2>/dev/null || [[ $(awk '/^State:/ {print $2}' "/proc/$1/status" 2>/dev/null) == Z ]]; }

# slurmstepd keeps a socket named <node>_<job>.<step> in its node's spool dir while the step runs.
no_job_steps_left() { ! compgen -G "$DIR/spool/n*/n*_*" >/dev/null; }

status() {
  export PATH=$PATH:/usr/sbin:/sbin
  local name pid down=0
  echo "state: $DIR"
  for name in munged slurmctld n1 n2; do
    if pid=$(our_pid "$name"); then
      echo "$name: pid $pid alive"
    else
      echo "$name: not running"
      down=1
    fi
  done
  if our_pid slurmctld >/dev/null; then
    SLURM_CONF=$CONF sinfo -N
    SLURM_CONF=$CONF squeue
  fi
  return $down
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  *)
    echo "usage: bash scripts/local_slurm.sh start|stop [--purge]|status" >&2
    exit 2
    ;;
esac
