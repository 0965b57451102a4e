#!/usr/bin/env bash
# Start the single-machine SLURM test cluster: idempotent; run as root on Debian/Ubuntu.
#
# Installs the Debian packages if missing (slurmctld, slurmd, slurm-client, slurmdbd, mariadb-server,
# munge), writes the configuration from slurm/templates/, and starts MariaDB + slurmdbd (so sacct
# works) + slurmctld + one slurmd per node (n1..nN on 127.0.0.1, fake typed GPUs through GRES, tasks
# bound to their cores).
# Daemons already running are left alone; a changed configuration restarts them.
#
#   slurm/up.sh            start (or check) the cluster; prints `export SLURM_CONF=...` last
#   slurm/up.sh --status   exit 0 if every daemon is alive and every node is usable, else 1
#   then: source "$TELEPATHY_SLURM_DIR/env.sh"    (default /tmp/telepathy-slurm)
#
# Knobs (environment): NODES=2 GPUS=4 GPU_TYPE=h100 CPUS=8 MEM=8000 (MB per node) MAX_ARRAY_SIZE=1001 AUTH=auto|none|munge
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LAB=${TELEPATHY_SLURM_DIR:-/tmp/telepathy-slurm}
NODES=${NODES:-2}
GPUS=${GPUS:-4}
GPU_TYPE=${GPU_TYPE:-h100}     # typed GRES, as production sites declare them (gpu:h100:4)
CPUS=${CPUS:-8}               # declared per node; may exceed the real cores (config_overrides)
MEM=${MEM:-8000}
MAX_ARRAY_SIZE=${MAX_ARRAY_SIZE:-1001}
AUTH=${AUTH:-auto}
CLUSTER=${CLUSTER:-telepathy}
CTLD_PORT=${CTLD_PORT:-6817}; DBD_PORT=${DBD_PORT:-6819}; DB_PORT=${DB_PORT:-3307}; SLURMD_PORT0=${SLURMD_PORT0:-17000}
export SLURM_CONF=$LAB/etc/slurm.conf

log() { echo "[slurm/up $(date +%T)] $*" >&2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nodes_ready() { # every declared node idle/mixed/allocated
  local out
  out=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [ "$(echo "$out" | awk '$2 ~ /^(idle|mix|alloc|comp)$/' | wc -l)" -ge "$NODES" ]
}
daemons_alive() {
  alive "$LAB/run/mysqld.pid" && alive "$LAB/run/slurmdbd.pid" && alive "$LAB/run/slurmctld.pid" || return 1
  for i in $(seq 1 "$NODES"); do alive "$LAB/run/slurmd-n$i.pid" || return 1; done
}

if [ "${1:-}" = --status ]; then
  daemons_alive && nodes_ready && exit 0
  exit 1
fi
[ "$(id -u)" = 0 ] || { echo "slurm/up.sh must run as root (it starts daemons and installs packages)" >&2; exit 1; }

mkdir -p "$LAB"/{etc,state,log,run,dev,munge,spool}
exec 9>"$LAB/.lock"
flock 9     # two test sessions starting the cluster at once must not race
# Daemons must not inherit the lock's descriptor, or they would hold the lock for ever.
daemon() { "$@" 9>&-; }

# ---------- 1. packages (only what is missing) ----------
pkgs=()
command -v slurmctld >/dev/null || pkgs+=(slurmctld)
command -v slurmd >/dev/null || pkgs+=(slurmd)
command -v sbatch >/dev/null || pkgs+=(slurm-client)
command -v slurmdbd >/dev/null || pkgs+=(slurmdbd)
command -v mariadbd >/dev/null || pkgs+=(mariadb-server)
command -v munged >/dev/null || pkgs+=(munge)
if [ ${#pkgs[@]} -gt 0 ]; then
  log "apt-get install ${pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
PLUGINDIR=$(dirname "$(dpkg -L slurm-wlm-basic-plugins | grep '/select_cons_tres.so$' | head -1)")
if [ "$AUTH" = auto ]; then   # Slurm 22.05 ships auth_none; newer releases need munge
  if [ -e "$PLUGINDIR/auth_none.so" ] && [ -e "$PLUGINDIR/cred_none.so" ]; then AUTH=none; else AUTH=munge; fi
fi

# ---------- 2. configuration (files rewritten only when their content changes) ----------
changed=0
put() { # put FILE MODE <content on stdin>
  local tmp; tmp=$(mktemp "$LAB/etc/.put.XXXXXX"); cat >"$tmp"; chmod "$2" "$tmp"
  if cmp -s "$tmp" "$1"; then rm -f "$tmp"; else mv "$tmp" "$1"; changed=1; fi
}
render() { # render TEMPLATE: replace every @NAME@ with the value of shell variable NAME
  local text name
  text=$(<"$1")
  for name in $(grep -o '@[A-Z_]*@' "$1" | sort -u | tr -d @); do
    text=${text//@$name@/${!name}}
  done
  printf '%s\n' "$text"
}
if [ "$AUTH" = munge ]; then
  AUTH_LINES="AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$LAB/run/munge.sock,cred_expire=10
AccountingStoragePass=$LAB/run/munge.sock"
  DBD_AUTH_LINES="AuthType=auth/munge
AuthInfo=socket=$LAB/run/munge.sock,cred_expire=10"
else
  # cred_expire=10: a requeued job becomes eligible after ~10 s instead of the default 120 s
  AUTH_LINES="AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10"
  DBD_AUTH_LINES="AuthType=auth/none
AuthInfo=cred_expire=10"
fi
ACCT_LINES="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux"
NODE_LINES=""; NODELIST=""
for i in $(seq 1 "$NODES"); do
  NODE_LINES+="NodeName=n$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT0 + i)) CPUs=$CPUS RealMemory=$MEM Gres=gpu:$GPU_TYPE:$GPUS Features=$GPU_TYPE,ib State=UNKNOWN"$'\n'
  NODELIST+="${NODELIST:+,}n$i"
done
NODE_LINES=${NODE_LINES%$'\n'}
# (put runs in this shell, never at the end of a pipe: it must be able to set `changed`)
put "$LAB/etc/slurm.conf" 644 < <(render "$HERE/templates/slurm.conf.in")
put "$LAB/etc/slurmdbd.conf" 600 < <(render "$HERE/templates/slurmdbd.conf.in")
gres_conf() {
  echo "AutoDetect=off"
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$LAB/dev/n$i"
    for g in $(seq 0 $((GPUS - 1))); do  # slurmd accepts only real character devices as GPU files
      [ -c "$LAB/dev/n$i/nvidia$g" ] || mknod "$LAB/dev/n$i/nvidia$g" c 195 "$g"
    done
    echo "NodeName=n$i Name=gpu Type=$GPU_TYPE File=$LAB/dev/n$i/nvidia[0-$((GPUS - 1))]"
  done
}
put "$LAB/etc/gres.conf" 644 < <(gres_conf)
put "$LAB/env.sh" 644 <<<"export SLURM_CONF=$SLURM_CONF"

# Jobs rendezvous on the first node's *name*, so n1..nN must resolve (here: to this machine).
for i in $(seq 1 "$NODES"); do
  getent hosts "n$i" >/dev/null || echo "127.0.0.1 n$i  # telepathy-slurm" >>/etc/hosts
done

if [ "$changed" = 1 ] && alive "$LAB/run/slurmctld.pid"; then
  log "configuration changed: restarting the daemons"
  "$HERE/down.sh" --keep-jobs
fi

# ---------- 3. daemons (each started only if its PID file is not alive) ----------
waitfor() { # waitfor SECONDS CMD...
  local end=$((SECONDS + $1)); shift
  while [ $SECONDS -lt "$end" ]; do timeout 10 "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timed out waiting for: $*" >&2; return 1
}
if [ "$AUTH" = munge ] && ! alive "$LAB/run/munged.pid"; then
  [ -s "$LAB/munge/munge.key" ] || { head -c 1024 /dev/urandom >"$LAB/munge/munge.key"; chmod 400 "$LAB/munge/munge.key"; }
  log "starting munged"
  daemon munged --force --key-file="$LAB/munge/munge.key" --socket="$LAB/run/munge.sock" \
    --pid-file="$LAB/run/munged.pid" --log-file="$LAB/log/munged.log" --seed-file="$LAB/munge/munged.seed"
  waitfor 10 test -S "$LAB/run/munge.sock"
fi
if ! alive "$LAB/run/mysqld.pid"; then
  if [ ! -d "$LAB/mysql/mysql" ]; then
    log "initialising the MariaDB data directory"
    mariadb-install-db --no-defaults --datadir="$LAB/mysql" --user=root \
      --auth-root-authentication-method=normal --skip-test-db >"$LAB/log/mariadb-install.log" 2>&1
  fi
  log "starting mariadbd on 127.0.0.1:$DB_PORT"
  nohup mariadbd --no-defaults --datadir="$LAB/mysql" --user=root --port="$DB_PORT" \
    --bind-address=127.0.0.1 --socket="$LAB/run/mysqld.sock" --pid-file="$LAB/run/mysqld.pid" \
    --log-error="$LAB/log/mariadb.log" --innodb-buffer-pool-size=64M \
    --innodb-lock-wait-timeout=900 >/dev/null 2>&1 9>&- &
  waitfor 60 mariadb --no-defaults -uroot --socket="$LAB/run/mysqld.sock" -e 'select 1'
  waitfor 10 test -s "$LAB/run/mysqld.pid"
  mariadb --no-defaults -uroot --socket="$LAB/run/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurmpw';
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
fi
if ! alive "$LAB/run/slurmdbd.pid"; then
  log "starting slurmdbd"
  daemon slurmdbd   # finds slurmdbd.conf next to $SLURM_CONF
  waitfor 60 sacctmgr -n list cluster || { tail -n 20 "$LAB/log/slurmdbd.log" >&2; exit 1; }
fi
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
if ! alive "$LAB/run/slurmctld.pid"; then
  log "starting slurmctld"
  daemon slurmctld -f "$SLURM_CONF"
  waitfor 30 sinfo -h || { tail -n 20 "$LAB/log/slurmctld.log" >&2; exit 1; }
fi
for i in $(seq 1 "$NODES"); do
  if ! alive "$LAB/run/slurmd-n$i.pid"; then
    mkdir -p "$LAB/spool/n$i"
    log "starting slurmd -N n$i"
    daemon slurmd -f "$SLURM_CONF" -N "n$i"
  fi
done
for _ in $(seq 150); do nodes_ready && break; sleep 0.2; done
nodes_ready || { sinfo -N >&2; log "nodes not ready; see $LAB/log"; exit 1; }
log "ready: $NODES nodes x $GPUS GPUs, auth=$AUTH, slurm $(slurmctld -V | awk '{print $2}')"
echo "export SLURM_CONF=$SLURM_CONF"
