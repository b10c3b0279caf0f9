"""The loop through Snakemake's SLURM executor on a real single-node SLURM (started by the test).

Needs root and apt (Debian/Ubuntu): scripts/start-local-slurm.sh installs munge and SLURM,
configures and starts them; scripts/stop-local-slurm.sh stops exactly that at the end,
whatever happens. Every Snakemake call runs under a hard kill timeout (the executor's default
status command, sacct, would wait for ever without an accounting database: the tests use
`--slurm-status-command squeue`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from test_workflow import BIN, ROOT, data_hashes, workflow_dir

TESTS = Path(__file__).resolve().parent
SLURM_ARGS = ["--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1"]
HARD_LIMIT_S = 1200


def _env() -> dict:
    return dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}", PYTHONPATH=str(TESTS))


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("bash") is None:
        pytest.skip("bash not available")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        pytest.skip("snakemake-executor-plugin-slurm is not installed (pip install -e '.[slurm]')")
    start = subprocess.run(["bash", str(ROOT / "scripts" / "start-local-slurm.sh")], capture_output=True, text=True, timeout=900)
    if start.returncode == 3:
        pytest.skip(f"cannot start a local SLURM here: {start.stdout.strip()} {start.stderr.strip()}")
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield
    finally:
        subprocess.run(["bash", str(ROOT / "scripts" / "stop-local-slurm.sh")], capture_output=True, text=True, timeout=120)


def test_profile_requests_no_gpu():
    """No code path uses CUDA: the profile must not make a cluster user pay for idle GPUs, nor
    suggest it in a comment to uncomment."""
    path = ROOT / "config" / "profiles" / "slurm" / "config.yaml"
    prof = yaml.safe_load(path.read_text())
    sections = [prof.get("default-resources", {})] + list(prof.get("set-resources", {}).values())
    for res in sections:
        for key, value in res.items():
            assert "gpu" not in key.lower() and key not in ("gres", "slurm_extra"), (key, value)
            assert "gpu" not in str(value).lower(), (key, value)
    requests = [line for line in path.read_text().splitlines() if re.search(r"^\s*#?\s*(gres|gpus?\w*|slurm_partition)\s*:.*gpu", line, re.I)]
    assert not requests, requests


def slurm_profile(run: Path) -> Path:
    """The project's SLURM profile, pointed at the local partition with memory that fits the node."""
    prof = yaml.safe_load((ROOT / "config" / "profiles" / "slurm" / "config.yaml").read_text())
    prof["default-resources"] = {"slurm_partition": "debug", "runtime": 30, "mem_mb": 1000, "cpus_per_task": 1}
    prof["set-resources"] = {rule: {"mem_mb": 1000, "cpus_per_task": 1} for rule in prof["set-resources"]}
    d = run / "profile"
    d.mkdir()
    (d / "config.yaml").write_text(yaml.safe_dump(prof))
    return d


def run_slurm(run: Path, *extra: str, configfile: str = "config/test.yaml") -> tuple[subprocess.CompletedProcess, float]:
    cmd = ["timeout", "-s", "KILL", str(HARD_LIMIT_S), str(BIN / "snakemake"), "--profile", str(slurm_profile(run)), "--configfile", configfile, *SLURM_ARGS, *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=run, env=_env(), capture_output=True, text=True)
    return proc, time.perf_counter() - t


def wall_time(run: Path) -> float:
    """Seconds from the first to the last job of a run (from Snakemake's benchmark files' mtimes
    and durations), the same measure for a local and a SLURM run."""
    starts, ends = [], []
    for tsv in (run / "benchmarks").rglob("*.tsv"):
        seconds = float(tsv.read_text().splitlines()[1].split("\t")[0])
        ends.append(tsv.stat().st_mtime)
        starts.append(tsv.stat().st_mtime - seconds)
    return max(ends) - min(starts)


def test_loop_through_slurm_is_bit_identical_to_local(tmp_path, slurm, finished_run):
    """config/test.yaml through sbatch (each job a real SLURM job) gives the files of the local run."""
    remote = workflow_dir(tmp_path / "slurm")
    proc, t_slurm = run_slurm(remote)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert re.search(r"Job \d+ has been submitted with SLURM jobid \d+", out), out[-3000:]
    a, b = data_hashes(finished_run), data_hashes(remote)
    assert a.keys() == b.keys() and a == b
    iters = json.loads((remote / "reports" / "summary.json").read_text())["iterations"]
    t_local = wall_time(finished_run)
    print(f"\nlocal {t_local:.0f} s, SLURM {wall_time(remote):.0f} s (driver {t_slurm:.0f} s) for {iters} iterations: {(wall_time(remote) - t_local) / iters:.0f} s more per iteration")


def test_failing_job_is_reported_and_retried(tmp_path, slurm, finished_run):
    """The first label attempt crashes (max_failed_ratio 0): SLURM reports the failed job,
    Snakemake resubmits it (--retries 1) and the retry labels the frame that crashed."""
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["label"] = {"oracle": {"name": "flaky_oracle.FlakyEMT", "kwargs": {"marker": str(tmp_path / "crashed")}}, "max_failed_ratio": 0.0}
    # iteration 0 up to its selection comes from the local run; only its labeling runs here
    run = tmp_path / "flaky"
    shutil.copytree(finished_run, run, symlinks=True)
    shutil.rmtree(run / "iter/000/label")
    shutil.rmtree(run / ".git")  # not a published run: nothing to version at the end
    (run / "config" / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc, _ = run_slurm(run, "--retries", "1", "--rerun-triggers=mtime", "iter/000/label/frames.nc", configfile="config/run.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert (tmp_path / "crashed").exists()  # the first label attempt did crash
    assert "Error in rule label" in out and "SLURM" in out  # reported, with the SLURM job's status
    assert "Trying to restart job" in out
    failures = json.loads((run / "iter/000/label/failures.json").read_text())
    assert failures == []  # the retry labelled the frame that crashed
