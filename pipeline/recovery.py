"""Recovering a run after a kill: orphans stopped, Snakemake unlocked, incomplete jobs rerun.

``dpelt resume`` is the documented way back after the driver was killed (SIGKILL, power
loss, a cluster job limit): it stops job processes left running by the dead driver, removes
Snakemake's stale lock, and runs Snakemake again with ``--rerun-incomplete``. Only jobs that
were running when the driver died run again; their partial outputs never look finished
(every file is written to a temporary name and renamed), a killed training continues from
its last checkpoint and a killed labeling reuses every finished label.

Which processes belong to the run is known from what the run recorded, never from command
lines or working directories (an editor on ``snakemake.log``, or a clone named ``dpelt``,
must not look like a job):

    .dpelt/run/driver.json      the Snakemake driver (written when the workflow starts)
    .dpelt/run/jobs/<pid>.json  each ``dpelt`` job the driver started (removed when it ends)

A record holds the PID and the process start time (``/proc/<pid>/stat`` field 22, clock
ticks since boot); a PID is trusted only while a process with that PID *and* that start
time exists, so a PID reused by an unrelated process is never signalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

#: where a run keeps its process records, relative to the run directory
RECORDS = Path(".dpelt") / "run"


@dataclass(frozen=True)
class Proc:
    """A recorded process: PID, start time (clock ticks since boot) and its command (for messages)."""

    pid: int
    start: int
    cmd: str = ""

    def alive(self) -> bool:
        """True while the process that was recorded runs (same PID and same start time)."""
        return start_time(self.pid) == self.start


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # the name may contain spaces and ')'


def start_time(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot, None if there is no such process."""
    f = _stat_fields(pid)
    if f is None or len(f) < 20 or f[0] == "Z":  # a zombie has ended
        return None
    return int(f[19])  # field 22 of stat


def parent(pid: int) -> int:
    f = _stat_fields(pid)
    return int(f[1]) if f else 0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def this_process(pid: int | None = None) -> Proc:
    pid = os.getpid() if pid is None else pid
    start = start_time(pid)
    if start is None:
        raise ProcessLookupError(pid)
    return Proc(pid, start, _cmdline(pid))


def _write(path: Path, proc: Proc, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "start": proc.start, "cmd": proc.cmd} | extra))
    os.replace(tmp, path)


def _read(path: Path) -> tuple[Proc, dict] | None:
    try:
        data = json.loads(path.read_text())
        return Proc(int(data["pid"]), int(data["start"]), str(data.get("cmd", ""))), data
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a record cut by the kill: nothing to trust


def record_driver(run_dir: str | os.PathLike = ".", pid: int | None = None) -> Proc:
    """Record the Snakemake driver of ``run_dir`` (called from the workflow's ``onstart``)."""
    proc = this_process(pid)
    _write(Path(run_dir) / RECORDS / "driver.json", proc)
    return proc


def recorded_driver(run_dir: str | os.PathLike) -> Proc | None:
    rec = _read(Path(run_dir) / RECORDS / "driver.json")
    return rec[0] if rec else None


def live_driver(run_dir: str | os.PathLike) -> Proc | None:
    """The recorded Snakemake driver of ``run_dir`` if it is still running."""
    d = recorded_driver(run_dir)
    return d if d is not None and d.alive() else None


def _is_ancestor(anc: int, pid: int) -> bool:
    seen = set()
    pid = parent(pid)
    while pid > 1 and pid not in seen:
        if pid == anc:
            return True
        seen.add(pid)
        pid = parent(pid)
    return False


@contextlib.contextmanager
def job_record(run_dir: str | os.PathLike = ".") -> Iterator[Proc | None]:
    """Record this process as a job of the run in ``run_dir`` while the block runs.

    Only a process started (through any number of shells) by the live recorded driver is a
    job; any other dpelt command run in the directory records nothing. Yields the record."""
    path = None
    driver = live_driver(run_dir)
    if driver is not None and _is_ancestor(driver.pid, os.getpid()):
        me = this_process()
        path = Path(run_dir) / RECORDS / "jobs" / f"{me.pid}.json"
        _write(path, me, driver={"pid": driver.pid, "start": driver.start})
    try:
        yield None if path is None else me
    finally:
        if path is not None:
            path.unlink(missing_ok=True)


def _descendants(pids: set[int]) -> set[int]:
    """Every running descendant of ``pids`` (an oracle's subprocess, a shell's child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            children.setdefault(parent(int(entry.name)), []).append(int(entry.name))
    out, todo = set(), list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def leftover_processes(run_dir: str | os.PathLike) -> list[Proc]:
    """Recorded jobs of ``run_dir`` still running although their driver is gone, and their
    descendants. Records of jobs that ended are removed."""
    out = []
    for path in sorted((Path(run_dir) / RECORDS / "jobs").glob("*.json")):
        rec = _read(path)
        if rec is None or not rec[0].alive():
            path.unlink(missing_ok=True)
            continue
        job, data = rec
        drv = data.get("driver") or {}
        if Proc(int(drv.get("pid", 0)), int(drv.get("start", -1))).alive():
            continue  # its driver runs: not a leftover
        out.append(job)
    found = {p.pid for p in out}
    for pid in sorted(_descendants(found) - found):
        start = start_time(pid)
        if start is not None:
            out.append(Proc(pid, start, _cmdline(pid)))
    return out


def _signal(proc: Proc, sig: int) -> None:
    if proc.alive():  # checked right before: never signal a reused PID
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)


def stop_processes(procs: list[Proc], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s`` seconds for those still running."""
    for p in procs:
        _signal(p, signal.SIGTERM)
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace_s and any(p.alive() for p in procs):
        time.sleep(0.1)
    for p in procs:
        _signal(p, signal.SIGKILL)


def resume(run_dir: str | os.PathLike = ".", cores: str = "all", extra: list[str] | None = None, log=print) -> int:
    """Stop leftovers, unlock, rerun incomplete jobs; returns Snakemake's exit status."""
    from .errors import DpeltError
    from .versioning import require_tool

    run_dir = Path(run_dir).resolve()
    snakemake = require_tool("snakemake")  # before anything is stopped
    driver = live_driver(run_dir)
    if driver is not None:
        raise DpeltError(f"a run is still active here (snakemake pid {driver.pid}); wait for it or stop it first", path=run_dir)
    procs = leftover_processes(run_dir)
    if procs:
        log(f"stopping {len(procs)} job processes left by the killed run: " + "; ".join(f"{p.pid} {p.cmd[:80]}" for p in procs))
        stop_processes(procs)
    subprocess.run([snakemake, "--unlock"] + list(extra or []), cwd=run_dir, capture_output=True, text=True)
    log("unlocked; rerunning incomplete jobs")
    return subprocess.run([snakemake, "--cores", str(cores), "--rerun-incomplete"] + list(extra or []), cwd=run_dir).returncode
