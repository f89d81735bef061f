#!/usr/bin/env bash
# Start a throwaway one-node SLURM cluster on this machine for tests/test_slurm.py.
# CI only: needs root, writes /etc/slurm/slurm.conf (a symlink) and keeps everything else
# under $POSTDIFF_SLURM_DIR. Stop it with .ci/slurm-down.sh.
set -euo pipefail

dir=${POSTDIFF_SLURM_DIR:-/tmp/postdiff-slurm}
partition=${POSTDIFF_SLURM_PARTITION:-ci}
conf_link=/etc/slurm/slurm.conf

if [[ -f $dir/slurmd.pid ]] && kill -0 "$(cat "$dir/slurmd.pid")" 2>/dev/null; then
    echo "slurm-up: already running (pid files in $dir)"
    exit 0
fi
if [[ -e $conf_link && "$(readlink "$conf_link")" != "$dir/slurm.conf" ]]; then
    echo "slurm-up: $conf_link exists and is not ours; refusing to replace a real SLURM config" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
    || ! command -v munged >/dev/null || ! command -v sinfo >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurm-wlm slurmctld slurmd munge)
    apt-get -y -qq install --no-install-recommends "${pkgs[@]}" >/dev/null \
        || { apt-get -qq update && apt-get -y -qq install --no-install-recommends "${pkgs[@]}" >/dev/null; }
fi

rm -rf "$dir"
mkdir -p "$dir/state" "$dir/spool" "$dir/munge" /etc/slurm
host=$(hostname -s)
cpus=$(nproc)
# Half of what is available: the scheduler's view, other test processes share the machine.
mem_mb=$(awk '/MemAvailable/ {print int($2 / 1024 / 2)}' /proc/meminfo)

# A private munge key and socket, so a system munged (if any) is neither used nor disturbed.
dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
chmod 755 "$dir/munge"
chmod 400 "$dir/munge/munge.key"
chown -R munge:munge "$dir/munge"
runuser -u munge -- munged \
    --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/munge/munged.pid" --log-file="$dir/munge/munged.log" \
    --seed-file="$dir/munge/munged.seed"

cat >"$dir/slurm.conf" <<EOF
ClusterName=postdiff-ci
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmdParameters=config_overrides
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# Finished jobs stay visible to squeue this long; the snakemake plugin reads status from squeue.
MinJobAge=300
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb Gres=gpu:1 State=UNKNOWN
PartitionName=$partition Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
# Without File= the node drains ("gres/gpu count too low").
echo "NodeName=$host Name=gpu File=/dev/null" >"$dir/gres.conf"
ln -sfn "$dir/slurm.conf" "$conf_link"

export SLURM_CONF=$dir/slurm.conf
slurmctld -i
slurmd

for _ in $(seq 60); do
    [[ "$(sinfo -h -N -n "$host" -o %t 2>/dev/null)" == idle ]] && break
    sleep 0.5
done
if [[ "$(sinfo -h -N -n "$host" -o %t 2>/dev/null)" != idle ]]; then
    echo "slurm-up: node $host did not become idle; logs follow" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$dir"/slurmctld.log "$dir"/slurmd.log >&2 || true
    exit 1
fi
echo "slurm-up: node $host idle in partition $partition (CPUs=$cpus RealMemory=$mem_mb gpu:1)"
