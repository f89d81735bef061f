#!/usr/bin/env bash
# Stop the daemons .ci/slurm-up.sh started (found through its pid files) and remove its files.
set -euo pipefail

dir=${POSTDIFF_SLURM_DIR:-/tmp/postdiff-slurm}
conf_link=/etc/slurm/slurm.conf
export SLURM_CONF=$dir/slurm.conf

# Jobs still on the node would outlive slurmd as orphaned slurmstepd processes.
[[ -f $dir/slurmctld.pid ]] && scancel --partition="${POSTDIFF_SLURM_PARTITION:-ci}" 2>/dev/null || true

stop() {  # name of the daemon, its pid file
    local name=$1 pidfile=$2 pid
    [[ -f $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    # A stale pid file may name a reused pid: only signal the daemon we started.
    if [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]]; then
        return 0
    fi
    kill -TERM "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    echo "slurm-down: $name ($pid) ignored SIGTERM, sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

stop slurmd "$dir/slurmd.pid"
stop slurmctld "$dir/slurmctld.pid"
stop munged "$dir/munge/munged.pid"

if [[ "$(readlink "$conf_link" 2>/dev/null)" == "$dir/slurm.conf" ]]; then
    rm -f "$conf_link"
fi
rm -rf "$dir"
echo "slurm-down: stopped"
