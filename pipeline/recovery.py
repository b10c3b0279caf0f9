"""Recovering a run after a kill: orphans stopped, Snakemake unlocked, incomplete jobs rerun.

``dpelt resume`` is the documented way back after the driver was killed (SIGKILL, power
loss, a cluster job limit): it stops job processes left running by the dead driver, removes
Snakemake's stale lock, and runs Snakemake again with ``--rerun-incomplete``. Only jobs that
were running when the driver died run again; their partial outputs never look finished
(every file is written to a temporary name and renamed), a killed training continues from
its last checkpoint and a killed labeling reuses every finished label.

Whether a driver is alive is known from a lock, never from a PID: every real (not dry-run)
Snakemake driver holds a shared ``flock`` on ``.dpelt/run/driver.lock`` from the moment the
workflow is parsed until it exits; the kernel drops it when the process dies, however it
dies. ``dpelt resume`` and ``dpelt restore`` take it exclusively without waiting: if they
cannot, a driver runs and they refuse.

Which processes are orphan jobs is known from what the run recorded, never from command
lines or working directories (an editor on ``snakemake.log``, or a clone named ``dpelt``,
must not look like a job):

    .dpelt/run/drivers/<pid>.json  each driver (written when the workflow is parsed); it
                                   exports DPELT_RUN_DRIVER=<pid>:<start> to its jobs
    .dpelt/run/jobs/<pid>.json     each ``dpelt`` job started under a recorded driver
                                   (removed when it ends)

A record holds the PID and the process start time (``/proc/<pid>/stat`` field 22, clock
ticks since boot); a PID is trusted only while a process with that PID *and* that start
time exists, so a PID reused by an unrelated process is never signalled. It also holds the
host name, the boot id (``/proc/sys/kernel/random/boot_id``) and the resolved run directory:
a PID means nothing on another node or after a reboot, and a record copied with a run
directory belongs to the original.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
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


def boot_id() -> str:
    """Identity of this boot of this machine (PIDs and start times are only valid within it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def where() -> dict:
    """Where a record is valid: host name and boot id."""
    return {"host": socket.gethostname(), "boot_id": boot_id()}


def _write(path: Path, proc: Proc, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"pid": proc.pid, "start": proc.start, "cmd": proc.cmd} | where() | extra))
    os.replace(tmp, path)


def _read(path: Path) -> tuple[Proc, dict] | None:
    try:
        data = json.loads(path.read_text())
        return Proc(int(data["pid"]), int(data["start"]), str(data.get("cmd", ""))), data
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a record cut by the kill: nothing to trust


#: the variable a driver exports to its jobs: "<pid>:<start>"
DRIVER_ENV = "DPELT_RUN_DRIVER"

_DRIVER_LOCK = None  # the open driver.lock of this process while it is a driver (kept for its lifetime)


def _lock_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / RECORDS / "driver.lock"


def start_driver(run_dir: str | os.PathLike = ".", executor: str = "local") -> Proc:
    """Make this process the recorded driver of ``run_dir``: hold the driver lock (shared:
    Snakemake itself arbitrates between two drivers), write drivers/<pid>.json and export
    DPELT_RUN_DRIVER to the jobs it will start. Called once, when the workflow is parsed for
    a real run. Raises BlockingIOError if ``dpelt resume``/``restore`` holds the lock."""
    global _DRIVER_LOCK
    path = _lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # close-on-exec: jobs do not inherit it, so orphans never look like a driver
    try:
        fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise
    _DRIVER_LOCK = fh
    proc = record_driver(run_dir, executor=executor)
    os.environ[DRIVER_ENV] = f"{proc.pid}:{proc.start}"
    return proc


def is_started_driver() -> bool:
    """Whether this process is a driver that :func:`start_driver` started (not a dry run)."""
    return os.environ.get(DRIVER_ENV, "").startswith(f"{os.getpid()}:")


def record_driver(run_dir: str | os.PathLike = ".", pid: int | None = None, **extra) -> Proc:
    """Write the record of driver ``pid`` (default: this process) of ``run_dir``."""
    proc = this_process(pid)
    _write(Path(run_dir) / RECORDS / "drivers" / f"{proc.pid}.json", proc, run_dir=str(Path(run_dir).resolve()), **extra)
    return proc


def recorded_drivers(run_dir: str | os.PathLike) -> list[tuple[Proc, dict]]:
    """Driver records of ``run_dir`` (those copied from another directory are ignored)."""
    here = str(Path(run_dir).resolve())
    recs = (_read(p) for p in sorted((Path(run_dir) / RECORDS / "drivers").glob("*.json")))
    return [r for r in recs if r is not None and r[1].get("run_dir") == here]


@contextlib.contextmanager
def no_live_driver(run_dir: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the driver lock exclusively while the block runs (no driver can start); raise
    DpeltError at once if a live driver holds it."""
    from .errors import DpeltError

    path = _lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            me = where()
            pids = [p.pid for p, d in recorded_drivers(run_dir) if d.get("boot_id") == me["boot_id"] and d.get("host") == me["host"] and p.alive()]
            who = f"snakemake pid {', '.join(map(str, pids))}" if pids else f"a process holds {path}"
            raise DpeltError(f"a run is still active here ({who}); wait for it or stop it before {what}", path=Path(run_dir).resolve()) from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _env_driver() -> tuple[int, int] | None:
    try:
        pid, start = os.environ[DRIVER_ENV].split(":")
        return int(pid), int(start)
    except (KeyError, ValueError):
        return None


@contextlib.contextmanager
def job_record(run_dir: str | os.PathLike = ".") -> Iterator[Proc | None]:
    """Record this process as a job of the run in ``run_dir`` while the block runs.

    A job is a process whose environment names (DPELT_RUN_DRIVER) a driver recorded for
    ``run_dir`` on this host and boot, whether that driver still runs or not (it may have been
    killed the instant after starting the job); any other dpelt command records nothing."""
    path, me = None, None
    drv = _env_driver()
    if drv is not None:
        here = where()
        for proc, data in recorded_drivers(run_dir):
            if (proc.pid, proc.start) == drv and data.get("host") == here["host"] and data.get("boot_id") == here["boot_id"]:
                me = this_process()
                path = Path(run_dir) / RECORDS / "jobs" / f"{me.pid}.json"
                _write(path, me, driver={"pid": proc.pid, "start": proc.start}, run_dir=str(Path(run_dir).resolve()))
                break
    try:
        yield me
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


def job_records(run_dir: str | os.PathLike) -> list[tuple[Path, Proc, dict]]:
    """(path, process, record) of the job records of ``run_dir``, those copied from another
    directory left out."""
    here = str(Path(run_dir).resolve())
    out = []
    for path in sorted((Path(run_dir) / RECORDS / "jobs").glob("*.json")):
        rec = _read(path)
        if rec is None:
            path.unlink(missing_ok=True)  # a record cut by the kill: nothing to trust
        elif rec[1].get("run_dir", here) == here:
            out.append((path, *rec))
    return out


def foreign_records(run_dir: str | os.PathLike) -> list[dict]:
    """Job and driver records of ``run_dir`` made on another host or before a reboot: their
    PIDs cannot be checked from here."""
    me = where()
    recs = [d for _, _, d in job_records(run_dir)] + [d for _, d in recorded_drivers(run_dir)]
    return [d for d in recs if (d.get("host", me["host"]), d.get("boot_id", me["boot_id"])) != (me["host"], me["boot_id"])]


def leftover_processes(run_dir: str | os.PathLike) -> list[Proc]:
    """Recorded jobs of ``run_dir`` (on this host and boot) still running although their
    driver is gone, and their descendants. Records of jobs that ended are removed."""
    me = where()
    out = []
    for path, job, data in job_records(run_dir):
        if (data.get("host", me["host"]), data.get("boot_id", me["boot_id"])) != (me["host"], me["boot_id"]):
            continue  # not checkable here: resume refuses on them (foreign_records)
        if not job.alive():
            path.unlink(missing_ok=True)
            continue
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


def live_jobs(run_dir: str | os.PathLike) -> list[Proc]:
    """Recorded jobs of ``run_dir`` running now on this host, whatever became of their driver."""
    me = where()
    return [job for _, job, d in job_records(run_dir) if (d.get("host", me["host"]), d.get("boot_id", me["boot_id"])) == (me["host"], me["boot_id"]) and job.alive()]


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


DRY_RUN_FLAGS = ("-n", "--dry-run", "--dryrun")
LOCAL_EXECUTORS = ("local", "dryrun", "touch")


def _executor(extra: list[str]) -> str | None:
    """The executor named in Snakemake arguments (--executor X, --executor=X, -e X), if any."""
    for i, a in enumerate(extra):
        if a in ("--executor", "-e") and i + 1 < len(extra):
            return extra[i + 1]
        if a.startswith("--executor="):
            return a.split("=", 1)[1]
    return None


def _check_where(run_dir: Path, extra: list[str], force: bool) -> None:
    """Refuse (unless ``force``) what resume cannot see from here: records of another host or
    boot, and runs whose jobs are queued on a cluster."""
    from .errors import DpeltError

    if force:
        return
    foreign = foreign_records(run_dir)
    if foreign:
        hosts = sorted({f"{d.get('host')} (boot {str(d.get('boot_id'))[:8]})" for d in foreign})
        raise DpeltError(
            f"this run has processes recorded on another host or before a reboot: {', '.join(hosts)}; their PIDs cannot be checked "
            "from here. Check that nothing of the run still runs there (on a cluster: squeue/scancel its jobs), then resume with --force",
            path=run_dir / RECORDS,
        )
    executors = {d.get("executor", "local") for _, d in recorded_drivers(run_dir)} | {_executor(extra) or "local"}
    remote = sorted(executors - set(LOCAL_EXECUTORS))
    if remote:
        raise DpeltError(
            f"the run uses the {', '.join(remote)} executor: jobs the killed driver submitted may still be queued or running on the cluster, "
            "where resume cannot stop them. Cancel the run's queued jobs first (SLURM: squeue --me; scancel <ids>), then resume with --force",
            path=run_dir,
        )


def resume(run_dir: str | os.PathLike = ".", cores: str = "all", extra: list[str] | None = None, log=print, force: bool = False) -> int:
    """Stop leftovers, unlock, rerun incomplete jobs; returns Snakemake's exit status.

    With a dry-run flag among ``extra`` (-n, --dry-run) nothing is stopped or unlocked: the
    leftovers are only listed and Snakemake shows what would run."""
    from .versioning import require_tool

    run_dir = Path(run_dir).resolve()
    extra = list(extra or [])
    snakemake = require_tool("snakemake")  # before anything is stopped
    dry = any(a in DRY_RUN_FLAGS for a in extra)
    with no_live_driver(run_dir, "resuming"):  # and no driver starts until the leftovers are gone
        _check_where(run_dir, extra, force)
        procs = leftover_processes(run_dir)
        listing = "; ".join(f"{p.pid} {p.cmd[:80]}" for p in procs)
        if dry:
            if procs:
                log(f"dry run: would stop {len(procs)} job processes left by the killed run: {listing}")
        else:
            if procs:
                log(f"stopping {len(procs)} job processes left by the killed run: {listing}")
                stop_processes(procs)
            for proc, _ in recorded_drivers(run_dir):
                if not proc.alive():
                    (run_dir / RECORDS / "drivers" / f"{proc.pid}.json").unlink(missing_ok=True)
            subprocess.run([snakemake, "--unlock"] + extra, cwd=run_dir, capture_output=True, text=True)
            log("unlocked; rerunning incomplete jobs")
    return subprocess.run([snakemake, "--cores", str(cores), "--rerun-incomplete"] + extra, cwd=run_dir).returncode
