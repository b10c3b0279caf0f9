"""The ELT workflow: snakemake in temporary directories on config/test.yaml."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def workflow_dir(tmp: Path, config: dict | None = None, git: bool = False) -> Path:
    """A run directory with the project's Snakefile, rules and configs (and optionally git)."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("Snakefile", "dvc.yaml"):
        shutil.copy(ROOT / name, tmp / name)
    for name in ("rules", "config"):
        shutil.copytree(ROOT / name, tmp / name, dirs_exist_ok=True)
    if config is not None:
        (tmp / "config" / "run.yaml").write_text(yaml.safe_dump(config))
    if git:
        for cmd in (["git", "init", "-q"], ["git", "config", "user.email", "ci@example.org"], ["git", "config", "user.name", "ci"], ["git", "add", "."], ["git", "commit", "-qm", "run"]):
            subprocess.run(cmd, cwd=tmp, check=True)
    return tmp


def snakemake(cwd: Path, *args: str, configfile: str = "config/test.yaml", check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run([str(BIN / "snakemake"), "--configfile", configfile, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dpelt(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run([str(BIN / "dpelt"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def data_hashes(run: Path) -> dict[str, str]:
    from pipeline.versioning import manifest

    return manifest(run, [run / "data", run / "iter"], data_only=True)


def test_dry_run_and_lint(tmp_path):
    run = workflow_dir(tmp_path)
    dry = snakemake(run, "-n")
    for rule in ("init", "train", "explore", "select", "report"):
        assert f"rule {rule}:" in dry.stdout or f"{rule} " in dry.stdout
    assert "checkpoint" in dry.stdout
    lint = snakemake(run, "--lint", check=False)
    findings = {line.strip() for line in lint.stdout.splitlines() + lint.stderr.splitlines() if line.strip().startswith("* ")}
    # the software comes from the project's environment; nothing else may be flagged
    assert findings <= {"* Specify a conda environment or container for each rule.:"}, findings


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"numb_models": 0}, "numb_models"),
        ({"select": {"trust_lo": 0.3, "trust_hi": 0.1}}, "select.trust_lo"),
        ({"bogus": 1}, "bogus"),
        ({"type_map": ["Cu", "Xx"]}, "type_map"),
        ({"explore": {"stages": [{"systems": ["nope"]}]}}, "explore.stages[0].systems"),
        ({"train": {"model": {"descriptor": {"rcutt": 5.0}}}}, "train.model.descriptor.rcutt"),
    ],
)
def test_bad_config_stops_before_any_job(tmp_path, patch, key):
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())

    def merge(a, b):
        for k, v in b.items():
            a[k] = merge(a.get(k, {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    run = workflow_dir(tmp_path, merge(cfg, patch))
    proc = snakemake(run, "-n", configfile="config/run.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert key.split(".")[-1].split("[")[0] in out, out[-2000:]
    assert "run.yaml" in out and len(out.splitlines()) < 20, out[-3000:]  # names the file, no schema dump
    assert not (run / "data").exists() and not (run / "iter").exists()
    # the same check by hand names the key exactly
    if key != "bogus":
        hand = dpelt(run, "check-config", "config/run.yaml")
        assert hand.returncode == 2 and key in hand.stderr, hand.stderr


def test_empty_config_file_is_not_the_default_run(tmp_path):
    """--configfile with an empty or partial file used to be merged into config/config.yaml."""
    run = workflow_dir(tmp_path)
    (run / "config" / "empty.yaml").write_text("{}\n")
    proc = snakemake(run, "-n", configfile="config/empty.yaml", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "empty.yaml" in out and "type_map" in out, out[-2000:]


def test_init_and_holdout_do_not_depend_on_label_failure_policy(tmp_path):
    """Raising label.max_failed_ratio (what a failed label step suggests) must not relabel init/holdout."""
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    plans = []
    for ratio in (0.1, 0.3):
        cfg["label"]["max_failed_ratio"] = ratio
        run = workflow_dir(tmp_path / str(ratio), cfg)
        plans.append(snakemake(run, "-n", "-p", configfile="config/run.yaml").stdout)
    commands = [[c for c in (line.split("Shell command:")[-1].strip() for line in p.splitlines()) if c.startswith(("dpelt init", "dpelt holdout"))] for p in plans]
    assert commands[0] and commands[0] == commands[1], commands  # (holdout is planned after the first checkpoint)


def test_two_iteration_run(finished_run, tmp_path):
    run = finished_run
    summary = json.loads((run / "reports" / "summary.json").read_text())
    assert summary["iterations"] == 2 and summary["finished"]
    for i in ("000", "001"):
        for k in ("0", "1"):
            assert (run / f"iter/{i}/train/{k}/model.pt").exists()
        report = json.loads((run / f"iter/{i}/select/report.json").read_text())
        assert report["frames"] > 0 and sum(report["counts"].values()) == report["frames"]
        assert (run / f"iter/{i}/label/frames.nc").exists()
        assert not (run / f"iter/{i}/label/frames.nc").stat().st_mode & 0o222  # labels are protected (read-only)
    # iteration 1 trained on the initial data and iteration 0's labels
    resolved = json.loads((run / "iter/001/train/0/input.json").read_text())
    systems = resolved["training"]["training_data"]["systems"]
    assert systems == ["data/init/frames.nc", "iter/000/label/frames.nc"]
    for png in ("ratios", "deviation", "lcurve", "parity", "calibration"):
        assert (run / "reports" / f"{png}.png").read_bytes()[:4] == b"\x89PNG"
    # every iteration's calibration: its labelled frames' deviation against their true error
    assert [c["labelled_frames"] for c in summary["calibration"]] == [summary["per_iteration"][k]["labelled"] for k in range(2)]
    rows = (run / "reports" / "iterations.csv").read_text().splitlines()
    assert rows[0].startswith("iteration,stage") and len(rows) == 3
    # nothing left to do
    assert "Nothing to be done" in snakemake(run, "-n").stdout
    # label.timeout reached `dpelt label`, `dpelt init` and `dpelt holdout` (600 s in config/test.yaml),
    # and changing it reruns nothing
    for summary in ("iter/000/label/summary.json", "iter/001/label/summary.json", "data/init/frames.json", "data/holdout/frames.json"):
        assert json.loads((run / summary).read_text())["timeout_s"] == 600.0, summary
    cfg = yaml.safe_load((run / "config" / "test.yaml").read_text())
    cfg["label"]["timeout"] = 30
    (tmp_path / "timeout30.yaml").write_text(yaml.safe_dump(cfg))
    assert "Nothing to be done" in snakemake(run, "-n", configfile=str(tmp_path / "timeout30.yaml")).stdout


def test_same_config_gives_identical_files_with_any_cores(tmp_path, finished_run):
    other = workflow_dir(tmp_path / "b")
    snakemake(other, "--cores", "1")
    a, b = data_hashes(finished_run), data_hashes(other)
    assert a.keys() == b.keys() and len(a) > 10
    assert a == b


def test_stage_advances_on_convergence(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["select"].update({"trust_lo": 5.0, "trust_hi": 10.0})  # every frame accurate: converged at once
    cfg["explore"]["stages"] = [dict(cfg["explore"]["stages"][0], max_iter=3), dict(cfg["explore"]["stages"][0], temps=[500.0], max_iter=3)]
    run = workflow_dir(tmp_path, cfg)
    snakemake(run, "--cores", "2", configfile="config/run.yaml")
    rows = (run / "reports" / "iterations.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:2] for r in rows] == [["0", "0"], ["1", "1"]]
    summary = json.loads((run / "reports" / "summary.json").read_text())
    assert summary["converged"] and summary["stages_finished"] == 2
    assert (run / "iter/001/explore/cu_T500/frames.nc").exists()


def test_publish_restore_continue(tmp_path, finished_run):
    run = tmp_path / "pub"
    shutil.copytree(finished_run, run, symlinks=True)
    remote = tmp_path / "remote"
    remote.mkdir()
    out = dpelt(run, "publish", "--all")
    assert out.returncode == 0, out.stderr
    subprocess.run(["dvc", "remote", "add", "-d", "local", str(remote)], cwd=run, check=True, env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"))
    assert dpelt(run, "publish", "--all", "--remote", "local").stdout.strip() == "nothing new to publish"
    tags = subprocess.run(["git", "tag"], cwd=run, capture_output=True, text=True).stdout.split()
    assert tags == ["iter-000", "iter-001"]
    assert "Nothing to be done" in snakemake(run, "-n").stdout  # publishing kept every file time
    assert dpelt(run, "verify").returncode == 0
    before = data_hashes(run)
    # roll back to iteration 0: only iteration 1 is planned, and rerunning it gives the same files
    r = dpelt(run, "restore", "iter-000")
    assert r.returncode == 0, r.stderr
    assert not (run / "iter" / "001").exists() and list((run / "attic").glob("*/001"))
    plan = snakemake(run, "-n").stdout
    assert "i=001" in plan and "i=000" not in plan and "rule init:" not in plan
    snakemake(run, "--cores", "2")
    assert data_hashes(run) == before
    # a corrupted published file is caught by verify
    victim = run / "iter/000/train/0/model.pt"
    os.chmod(victim, 0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    bad = dpelt(run, "verify", "iter-000")
    assert bad.returncode == 2 and "iter/000/train/0/model.pt: sha256 differs" in bad.stdout
