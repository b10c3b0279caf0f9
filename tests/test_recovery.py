"""Reliability of a run: kill and resume, a full disk, concurrent runs and publishes."""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from test_workflow import BIN, ROOT, data_hashes, dpelt, workflow_dir

TESTS = Path(__file__).resolve().parent


def recovery_config() -> dict:
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["label"]["oracle"] = {"name": "slow_oracle.SlowEMT", "kwargs": {"delay": 0.6}}
    cfg["select"]["max_labels"] = 4
    return cfg


def env() -> dict:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(TESTS))


def start(run: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "snakemake"), "--configfile", "config/run.yaml", "--cores", "2", "--rerun-incomplete", *extra],
        cwd=run, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )


def in_flight(run: Path) -> set[str]:
    """Outputs Snakemake marks incomplete (jobs running now)."""
    d = run / ".snakemake" / "incomplete"
    out = set()
    for f in d.rglob("*") if d.exists() else []:
        if f.is_file():
            name = str(f.relative_to(d))
            try:
                out.add(base64.urlsafe_b64decode(name + "=" * (-len(name) % 4)).decode())
            except Exception:
                out.add(name)
    return out


def processes_in(run: Path) -> list[int]:
    """Every process whose working directory is ``run`` (the test's own view; dpelt never looks
    at working directories or command lines)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if Path(os.readlink(entry / "cwd")).resolve() == run.resolve():
                    out.append(int(entry.name))
            except OSError:
                pass
    return sorted(out)


def wait_for(cond, timeout: float = 300.0, step: float = 0.05) -> bool:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        time.sleep(step)
    return False


def job_runs(run: Path) -> Counter:
    """How many times each job (rule + wildcards) was started, from Snakemake's own logs."""
    runs = Counter()
    for log in sorted((run / ".snakemake" / "log").glob("*.snakemake.log")):
        rule = None
        for line in log.read_text().splitlines():
            m = re.match(r"^(?:local)?(?:rule|checkpoint) (\w+):", line.strip())
            if m:
                rule = m.group(1)
                runs[(rule, "")] += 0
            m = re.match(r"^wildcards: (.*)$", line.strip())
            if m and rule:
                runs[(rule, m.group(1))] += 1
                rule = None
    return +runs


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = workflow_dir(tmp_path_factory.mktemp("ref") / "ref", recovery_config())
    proc = subprocess.run([str(BIN / "snakemake"), "--configfile", "config/run.yaml", "--cores", "2"], cwd=run, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return data_hashes(run)


@pytest.mark.slow
def test_kill_mid_train_mid_md_mid_label_then_resume(tmp_path, reference):
    run = workflow_dir(tmp_path / "killed", recovery_config())
    moments = {
        "train": lambda: any("/train/" in p for p in in_flight(run)),
        "explore": lambda: any("/explore/" in p for p in in_flight(run)),
        "label": lambda: any("/label/" in p for p in in_flight(run)) and any((run / "iter").glob("*/label/tasks/*/result.json")),
    }
    killed_jobs = set()
    for moment, cond in moments.items():
        proc = start(run)
        assert wait_for(lambda: cond() or proc.poll() is not None), f"never reached {moment}"
        assert proc.poll() is None, f"run ended before {moment}"
        killed_jobs |= in_flight(run)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every job it started
        proc.wait()
        assert wait_for(lambda: not processes_in(run), timeout=10), "job processes survived the kill"
        # resume the documented way, but in the background so the next moment can be caught
        out = dpelt(run, "resume", "--help")
        assert out.returncode == 0
        subprocess.run([str(BIN / "snakemake"), "--unlock", "--configfile", "config/run.yaml"], cwd=run, env=env(), capture_output=True)
    res = subprocess.run([str(BIN / "dpelt"), "resume", "--configfile", "config/run.yaml"], cwd=run, env=env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not processes_in(run)
    assert data_hashes(run) == reference  # bit-identical to the uninterrupted run
    twice = {job for job, n in job_runs(run).items() if n > 1}
    assert twice, "no job was interrupted"
    assert len(twice) <= len(killed_jobs)  # only jobs that were in flight ran again
    assert all(n <= len(moments) + 1 for n in job_runs(run).values())
    assert ("init", "") not in twice


def test_resume_refuses_a_live_run_and_second_run_is_refused(tmp_path):
    """From a directory named dpelt (the default clone name) and a command line that says dpelt:
    the live driver is known from its record, not taken for an orphan."""
    run = workflow_dir(tmp_path / "dpelt", recovery_config())
    config = str(run / "config" / "run.yaml")  # the driver's command line contains "dpelt"
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "--configfile", config, "--cores", "2"],
        cwd=run, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        assert wait_for(lambda: bool(in_flight(run)) or proc.poll() is not None)
        # a second driver is refused: by Snakemake's incomplete-files check while the first has
        # jobs in flight, and, when told to rerun incomplete jobs, by the directory lock
        for extra in ([], ["--rerun-incomplete"]):
            second = subprocess.run([str(BIN / "snakemake"), "--configfile", "config/run.yaml", "--cores", "1", *extra], cwd=run, env=env(), capture_output=True, text=True, timeout=120)
            out = second.stdout + second.stderr
            assert second.returncode != 0
            assert "LockException" in out or "cannot be locked" in out or (not extra and "Incomplete files" in out), out[-2000:]
        r = dpelt(run, "resume", "--configfile", config)
        assert r.returncode == 2 and "a run is still active here" in r.stderr, r.stdout + r.stderr
        assert proc.poll() is None  # the live run was left alone
        # its jobs recorded themselves, with the driver that started them
        assert wait_for(lambda: any(json.loads(p.read_text())["driver"]["pid"] == proc.pid for p in (run / ".dpelt/run/jobs").glob("*.json")), timeout=60)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_resume_stops_the_jobs_of_a_killed_driver_only(tmp_path):
    """Only the driver is killed (SIGKILL): its running jobs are stopped by resume, from their
    records; a process that merely looks like a job (an editor on snakemake.log in the run
    directory, under a path containing dpelt) is never touched."""
    run = workflow_dir(tmp_path / "dpelt", recovery_config())
    config = str(run / "config" / "run.yaml")
    bystander = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", "snakemake.log", "dpelt"], cwd=run, start_new_session=True
    )
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), "--configfile", config, "--cores", "2", "iter/000/train/0/model.pt"],
        cwd=run, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    jobs = run / ".dpelt" / "run" / "jobs"
    try:
        assert wait_for(lambda: any(jobs.glob("*.json")) or proc.poll() is not None, timeout=120)
        assert proc.poll() is None, "the run ended before a job was seen"
        job_pids = [json.loads(p.read_text())["pid"] for p in jobs.glob("*.json")]
        os.kill(proc.pid, signal.SIGKILL)  # the driver alone: its jobs run on
        proc.wait()
        assert any(Path(f"/proc/{pid}").exists() for pid in job_pids)
        # --dry-run: nothing is rerun, the test is about the stopped jobs
        resume = [str(BIN / "dpelt"), "resume", "--configfile", config, "data/init/frames.nc", "--dry-run"]
        r = subprocess.run(resume, cwd=run, env=env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
        assert "job processes left by the killed run" in r.stdout
        assert not any(Path(f"/proc/{pid}").exists() and not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z" for pid in job_pids)
        assert bystander.poll() is None  # looked like a job, was not one
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        bystander.kill()
        bystander.wait()


def test_records_are_trusted_only_with_their_start_time(tmp_path):
    """A recorded PID whose process start time differs (the PID was reused) is neither a live
    driver nor an orphan to stop."""
    from pipeline import recovery

    run = tmp_path / "dpelt"
    run.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "snakemake", "dpelt"], cwd=run)
    try:
        assert wait_for(lambda: recovery.start_time(other.pid) is not None)
        real = recovery.record_driver(run, pid=other.pid)
        assert recovery.live_driver(run) == real
        # the same PID with another start time: a different process
        reused = recovery.Proc(other.pid, real.start + 1)
        (run / ".dpelt/run/driver.json").write_text(json.dumps({"pid": reused.pid, "start": reused.start}))
        assert recovery.live_driver(run) is None
        (run / ".dpelt/run/jobs").mkdir()
        (run / ".dpelt/run/jobs" / f"{other.pid}.json").write_text(json.dumps({"pid": reused.pid, "start": reused.start, "driver": {"pid": 1, "start": 0}}))
        assert recovery.leftover_processes(run) == []
        recovery.stop_processes([reused], grace_s=0.2)
        assert other.poll() is None  # never signalled
        assert not list((run / ".dpelt/run/jobs").glob("*.json"))  # the stale record is dropped
    finally:
        other.kill()
        other.wait()


LABEL0 = "iter/000/label/frames.nc"


@pytest.fixture(scope="module")
def iteration0(tmp_path_factory):
    """The recovery config run up to iteration 0's labels (init, train, explore, select, label)."""
    run = workflow_dir(tmp_path_factory.mktemp("it0") / "run", recovery_config())
    proc = subprocess.run([str(BIN / "snakemake"), "--configfile", "config/run.yaml", "--cores", "2", LABEL0], cwd=run, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_disk_full_fails_cleanly_and_resume_completes(tmp_path, iteration0):
    """ENOSPC while writing the labelled frames: the job fails, nothing half-written stays, the
    labels computed so far are kept; a resume completes with the same files as a run without
    the fault, recomputing no finished label."""
    run = tmp_path / "full"
    shutil.copytree(iteration0, run, symlinks=True)
    shutil.rmtree(run / "iter/000/label")
    full = subprocess.run(
        [str(BIN / "snakemake"), "--configfile", "config/run.yaml", "--cores", "2", LABEL0],
        cwd=run, env=env() | {"DPELT_FAULT_ENOSPC": "label/frames.nc"}, capture_output=True, text=True, timeout=900,
    )
    assert full.returncode != 0
    assert "Error in rule label" in full.stdout + full.stderr
    assert not (run / LABEL0).exists()  # nothing half-written is taken as finished
    assert not list((run / "iter/000/label").glob("*.tmp*")) and not list((run / "iter/000/label").glob(".*tmp*"))
    log = (run / "logs/label/000.log").read_text()
    assert "no space left on device" in log
    done_tasks = list((run / "iter/000/label/tasks").glob("*/result.json"))
    assert done_tasks  # the labels computed before the failure are kept
    mtimes = {p: p.stat().st_mtime_ns for p in done_tasks}
    res = subprocess.run([str(BIN / "dpelt"), "resume", "--configfile", "config/run.yaml", LABEL0], cwd=run, env=env(), capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    assert data_hashes(run) == data_hashes(iteration0)
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished labels were not recomputed


def test_two_publishes_never_run_dvc_at_once(tmp_path):
    run = workflow_dir(tmp_path / "pub", git=True)
    (run / ".dpelt").mkdir()
    with open(run / ".dpelt" / "dvc.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        r = subprocess.run([str(BIN / "dpelt"), "publish", "--all"], cwd=run, env=env() | {"DPELT_LOCK_TIMEOUT": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "another dpelt publish/restore holds the lock" in r.stderr
    assert not (run / ".dvc").exists()  # nothing ran while the lock was held


def test_exploded_task_does_not_stop_the_iteration(tmp_path):
    """A cut trajectory (and one that kept no frame at all) still feeds selection."""
    from pipeline.data import make_frames
    from pipeline.data.netcdf import write_frames
    from pipeline.select import SelectConfig, select

    import numpy as np

    good = make_frames(coord=np.random.default_rng(0).random((5, 2, 3)) * 3, cell=np.eye(3) * 3, atom_type=[0, 0], type_map=["Cu"], source_task="ok", max_devi_f=[0.01, 0.1, 0.1, 0.3, 0.02])
    cut = good.isel(frame=[0, 1]).assign_attrs(status="stopped", reason="temperature runaway")
    write_frames(tmp_path / "a.nc", good)
    write_frames(tmp_path / "b.nc", cut)
    write_frames(tmp_path / "c.nc", [])
    r = select([tmp_path / "a.nc", tmp_path / "b.nc", tmp_path / "c.nc"], SelectConfig(trust_lo=0.05, trust_hi=0.2), seed=1, out_dir=tmp_path / "s")
    assert r["frames"] == 7 and r["selected"] == 3
    # the cut trajectory keeps the iteration from counting as converged, however accurate its frames
    assert [t["task"] for t in r["stopped_tasks"]] == [str(tmp_path / "b.nc")] and not r["converged"]
    r = select([tmp_path / "a.nc"], SelectConfig(trust_lo=0.05, trust_hi=0.2, conv_accuracy=0.1), seed=1, out_dir=tmp_path / "s2")
    assert r["converged"] and r["stopped_tasks"] == []
    # a task stopped before it kept any frame is known from its md.json
    (tmp_path / "t").mkdir()
    write_frames(tmp_path / "t" / "frames.nc", [])
    (tmp_path / "t" / "md.json").write_text('{"status": "stopped", "reason": "atoms 0.3 A apart", "steps_done": 0}')
    r = select([tmp_path / "a.nc", tmp_path / "t" / "frames.nc"], SelectConfig(trust_lo=0.05, trust_hi=0.2, conv_accuracy=0.1), seed=1, out_dir=tmp_path / "s3")
    assert not r["converged"] and "apart" in r["stopped_tasks"][0]["reason"]


def test_restore_checks_its_tools_before_moving_anything(tmp_path, monkeypatch):
    """dvc missing (not beside the interpreter, not on PATH): one error, no iteration moved."""
    from pipeline.errors import DpeltError
    from pipeline.versioning import restore

    run = tmp_path / "run"
    for i in range(3):
        (run / "iter" / f"{i:03d}" / "eval").mkdir(parents=True)
    (run / ".dvc").mkdir()
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=ci@example.org", "-c", "user.name=ci", "commit", "-q", "--allow-empty", "-m", "x"], ["git", "tag", "iter-000"]):
        subprocess.run(cmd, cwd=run, check=True)
    only_git = tmp_path / "bin"
    only_git.mkdir()
    (only_git / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(only_git))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "elsewhere" / "python"))
    with pytest.raises(DpeltError, match="dvc is not installed"):
        restore(run, "iter-000")
    assert sorted(p.name for p in (run / "iter").iterdir()) == ["000", "001", "002"] and not (run / "attic").exists()


def test_restore_from_the_venv_without_activating_it(tmp_path, finished_run):
    """`.venv/bin/dpelt restore` with a PATH that has no dvc: dpelt finds the dvc beside itself."""
    run = tmp_path / "pub"
    shutil.copytree(finished_run, run, symlinks=True)
    assert subprocess.run([str(BIN / "dpelt"), "publish", "--all"], cwd=run, env=env(), capture_output=True).returncode == 0
    bare = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"} | {"PATH": "/usr/bin:/bin"}
    assert shutil.which("dvc", path=bare["PATH"]) is None
    r = subprocess.run([str(BIN / "dpelt"), "restore", "iter-000"], cwd=run, env=bare, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (run / "iter" / "001").exists() and list((run / "attic").glob("*/001"))
    assert (run / "iter" / "000" / "label" / "frames.nc").exists()
