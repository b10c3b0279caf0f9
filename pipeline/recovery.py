"""Recovering a run after a kill: orphans stopped, Snakemake unlocked, incomplete jobs rerun.

``dpelt resume`` is the documented way back after the driver was killed (SIGKILL, power
loss, a cluster job limit): it stops job processes left running in this directory by the
dead driver, removes Snakemake's stale lock, and runs Snakemake again with
``--rerun-incomplete``. Only jobs that were running when the driver died run again; their
partial outputs never look finished (every file is written to a temporary name and renamed),
a killed training continues from its last checkpoint and a killed labeling reuses every
finished label.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

JOB_MARKERS = ("dpelt", "snakemake")


def _proc_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")).resolve()
    except OSError:
        return None


def _proc_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _has_snakemake_ancestor(pid: int) -> bool:
    seen = set()
    pid = _ppid(pid)
    while pid > 1 and pid not in seen:
        seen.add(pid)
        cmd = _proc_cmdline(pid)
        if "snakemake" in cmd:
            return True
        pid = _ppid(pid)
    return False


def live_drivers(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Snakemake drivers (not jobs) running in ``run_dir``."""
    return [(pid, cmd) for pid, cmd in _processes_in(run_dir) if "snakemake" in cmd and not _has_snakemake_ancestor(pid) and "dpelt" not in cmd]


def _processes_in(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Processes (pid, command) of dpelt or Snakemake whose working directory is ``run_dir``."""
    run_dir = Path(run_dir).resolve()
    me = {os.getpid(), os.getppid()}
    out = []
    if not Path("/proc").exists():
        return out
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in me:
            continue
        cmd = _proc_cmdline(pid)
        if not any(m in cmd for m in JOB_MARKERS) or "dpelt resume" in cmd:
            continue
        if _proc_cwd(pid) == run_dir:
            out.append((pid, cmd.strip()))
    return sorted(out)


def leftover_processes(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """Job processes in ``run_dir`` whose Snakemake driver is gone (orphans of a killed run)."""
    drivers = set(live_drivers(run_dir))
    return [(pid, cmd) for pid, cmd in _processes_in(run_dir) if (pid, cmd) not in drivers and not _has_snakemake_ancestor(pid)]


def stop_processes(procs: list[tuple[int, str]], grace_s: float = 5.0) -> None:
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace_s and any(Path(f"/proc/{pid}").exists() for pid, _ in procs):
        time.sleep(0.1)
    for pid, _ in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def resume(run_dir: str | os.PathLike = ".", cores: str = "all", extra: list[str] | None = None, log=print) -> int:
    """Stop leftovers, unlock, rerun incomplete jobs; returns Snakemake's exit status."""
    from .errors import DpeltError

    run_dir = Path(run_dir).resolve()
    drivers = live_drivers(run_dir)
    if drivers:
        raise DpeltError(f"a run is still active here (snakemake pid {drivers[0][0]}); wait for it or stop it first", path=run_dir)
    procs = leftover_processes(run_dir)
    if procs:
        log(f"stopping {len(procs)} job processes left by the killed run: " + "; ".join(f"{pid} {cmd[:80]}" for pid, cmd in procs))
        stop_processes(procs)
    snakemake = str(Path(sys.executable).parent / "snakemake")
    if not Path(snakemake).exists():
        snakemake = "snakemake"
    subprocess.run([snakemake, "--unlock"] + list(extra or []), cwd=run_dir, capture_output=True, text=True)
    log("unlocked; rerunning incomplete jobs")
    return subprocess.run([snakemake, "--cores", str(cores), "--rerun-incomplete"] + list(extra or []), cwd=run_dir).returncode
