#!/usr/bin/env bash
# Stop the test cluster of slurm/up.sh: only the daemons whose PID files it wrote under $TELEPATHY_SLURM_DIR.
#   --keep-jobs  do not cancel queued/running jobs first (used by up.sh for a configuration restart)
#   --clean      also delete the cluster's state, logs, database and the /etc/hosts lines up.sh added
set -uo pipefail
LAB=${TELEPATHY_SLURM_DIR:-/tmp/telepathy-slurm}
export SLURM_CONF=$LAB/etc/slurm.conf
keep=0; clean=0
for a in "$@"; do
  case $a in
    --keep-jobs) keep=1 ;;
    --clean) clean=1 ;;
    *) echo "usage: slurm/down.sh [--keep-jobs] [--clean]" >&2; exit 2 ;;
  esac
done
log() { echo "[slurm/down $(date +%T)] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_pid() { # stop_pid PIDFILE NAME: TERM, then KILL after 30 s
  local p
  if alive "$1"; then
    p=$(cat "$1"); log "stopping $2 (pid $p)"; kill "$p"
    for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then log "$2 did not exit: SIGKILL"; kill -9 "$p"; fi
  fi
  rm -f "$1"
}
if [ "$keep" = 0 ] && alive "$LAB/run/slurmctld.pid"; then
  jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
  if [ -n "$jobs" ]; then
    log "cancelling $(echo "$jobs" | wc -l) jobs"
    # shellcheck disable=SC2086
    timeout 10 scancel --full --quiet $jobs 2>/dev/null
    for _ in $(seq 150); do [ -z "$(timeout 10 squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
  fi
fi
for f in "$LAB"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pid "$f" "$(basename "$f" .pid)"; done
stop_pid "$LAB/run/slurmctld.pid" slurmctld
stop_pid "$LAB/run/slurmdbd.pid" slurmdbd
stop_pid "$LAB/run/mysqld.pid" mariadbd
stop_pid "$LAB/run/munged.pid" munged
if [ "$clean" = 1 ]; then
  log "removing the cluster's state under $LAB"
  rm -rf "${LAB:?}"/{state,spool,log,mysql,run,munge,dev,etc,env.sh}
  sed -i '/# telepathy-slurm$/d' /etc/hosts 2>/dev/null || true
fi
log "done"
