#!/usr/bin/env bash
# Stop exactly what scripts/start-local-slurm.sh started (PIDs recorded in $DPELT_SLURM_STATE):
# cancel leftover jobs, stop slurmd, slurmctld, munged in that order, remove stale pid files.
set -uo pipefail
STATE=${DPELT_SLURM_STATE:-/tmp/dpelt-slurm}
[ -d "$STATE" ] || exit 0
command -v scancel >/dev/null 2>&1 && [ -s "$STATE/slurmctld.pid" ] && scancel --user="$(id -un)" >/dev/null 2>&1
for d in slurmd slurmctld munged; do
    f="$STATE/$d.pid"
    [ -s "$f" ] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
    [ "$d" = munged ] || rm -f "/run/$d.pid"
done
rmdir "$STATE" 2>/dev/null || true
echo "stop-local-slurm: stopped"
