"""`dpelt reproduce`: re-executing a published run and comparing it with its manifests.

Fast tests: the label cache seeded from published results (the oracle is never called for a
bit-identical frame), the descriptions of differences, the environment record. Workflow
tests share one published run (conftest's ``finished_run``: config/test.yaml, 2 iterations,
auto-published), a local DVC remote and a clone of it; the re-execution of iteration 0 is
done once (``reproduction``) and reused by the corruption test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
from ase.build import bulk

from pipeline.data.frames import frame_ids, make_frames
from pipeline.data.netcdf import read_frames, write_frames
from pipeline.label import label
from pipeline.label.oracles import Oracle, make_oracle
from pipeline.reproduce import compare_file, environment
from pipeline.reproduce.compare import dataset_difference, model_difference, summary_line, text_difference
from pipeline.reproduce.labels import Geometry, PublishedLabels

BIN = Path(sys.executable).parent
ENV = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")


# ---------------------------------------------------------------- the seeded label cache


def cu_frames(n: int) -> xr.Dataset:
    """``n`` periodic 4-atom Cu frames (frame k: atom 0 moved by 0.01·k Å), no labels."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    coord = np.stack([atoms.positions + np.r_[[[0.01 * k, 0.0, 0.0]], np.zeros((3, 3))] for k in range(n)])
    return make_frames(coord, atoms.cell.array, [0] * 4, ["Cu"], source_task=["t"] * n, md_step=10 * np.arange(n), temperature_K=300.0)


class ForbiddenOracle(Oracle):
    """EMT's spec, but every calculation is recorded and refused."""

    def __init__(self):
        emt = make_oracle({"name": "emt"})
        super().__init__(emt.name, emt.kwargs, emt.factory, emt.accepts_directory, spec=emt.spec)
        object.__setattr__(self, "calls", [])

    def _fresh_compute(self, atoms, directory=None):  # where every session's calculation goes
        self.calls.append(atoms.positions.copy())
        raise RuntimeError("the oracle was called")


def published_iteration(root: Path, ds: xr.Dataset) -> Path:
    """A published iteration 000 in ``root``: candidates and their EMT labels (with task results)."""
    cand = root / "iter/000/select/candidates.nc"
    cand.parent.mkdir(parents=True)
    write_frames(cand, ds)
    label(cand, {"name": "emt"}, root / "iter/000/label")
    return cand


def test_seeded_cache_reuses_bit_identical_frames_only(tmp_path):
    ds = cu_frames(4)
    published_iteration(tmp_path / "pub", ds)
    # the re-execution selects the same frames, except frame 0 whose x moved by one ulp
    coord = ds["coord"].values.copy()
    coord[0, 0, 0] = np.nextafter(coord[0, 0, 0], np.inf)
    new = write_frames(tmp_path / "new/candidates.nc", ds.assign(coord=(ds["coord"].dims, coord)))
    seeded = PublishedLabels.from_run(tmp_path / "pub", ["000"]).seed(new, tmp_path / "new/label")
    ids = [str(i) for i in frame_ids(read_frames(new)[0])]
    assert sorted(seeded["reused"]) == sorted(ids[1:]) and list(seeded["recomputed"]) == [ids[0]]

    oracle = ForbiddenOracle()
    s = label(new, oracle, tmp_path / "new/label", max_failed_ratio=1.0)
    assert len(oracle.calls) == 1 and np.array_equal(oracle.calls[0], coord[0])  # only the moved frame
    assert (s["cached"], s["computed"], s["failed"]) == (3, 1, 1)
    (pub,) = read_frames(tmp_path / "pub/iter/000/label/frames.nc")
    (out,) = read_frames(tmp_path / "new/label/frames.nc")
    for var in ("coord", "energy", "force", "virial", "oracle"):  # the published numbers, bit for bit
        np.testing.assert_array_equal(out[var].values, pub[var].values[1:])


def test_seed_refuses_a_frame_id_whose_geometry_differs(tmp_path):
    """The id is a 16-hex hash: a published result is reused only when the bytes are equal."""
    ds = cu_frames(2)
    published_iteration(tmp_path / "pub", ds)
    published = PublishedLabels.from_run(tmp_path / "pub", ["000"])
    ids = [str(i) for i in frame_ids(ds)]
    geom, path = published.records[ids[0]]
    other = published.records[ids[1]][0]
    published.records[ids[0]] = (Geometry(geom.types, geom.pbc, geom.cell, other.coord), path)  # a forged collision
    seeded = published.seed(tmp_path / "pub/iter/000/select/candidates.nc", tmp_path / "new")
    assert seeded["reused"] == [ids[1]] and "collides" in seeded["recomputed"][ids[0]]
    assert not (tmp_path / "new/tasks" / ids[0]).exists()


def test_failed_published_labels_are_not_seeded(tmp_path):
    ds = cu_frames(2)
    published_iteration(tmp_path / "pub", ds)
    ids = [str(i) for i in frame_ids(ds)]
    result = tmp_path / "pub/iter/000/label/tasks" / ids[1] / "result.json"
    record = json.loads(result.read_text())
    result.write_text(json.dumps(record | {"status": "failed", "reason": "SCF did not converge"}))
    assert list(PublishedLabels.from_run(tmp_path / "pub", ["000"]).records) == [ids[0]]


# ---------------------------------------------------------------- what differs


def test_dataset_difference_names_the_variable_and_its_size(tmp_path):
    ds = cu_frames(3).assign(energy=("frame", [-1.0, -2.0, -3.0]))
    a = write_frames(tmp_path / "a.nc", ds)
    assert dataset_difference(a, write_frames(tmp_path / "same.nc", ds)) == {"variables": {}, "equal_variables": dataset_difference(a, a)["equal_variables"]}
    coord = ds["coord"].values.copy()
    coord[2, 1, 2] += 3e-9
    b = write_frames(tmp_path / "b.nc", ds.assign(coord=(ds["coord"].dims, coord), energy=("frame", [-1.0, -2.5, -3.0])).assign_attrs(system="other"))
    d = dataset_difference(a, b)["variables"]
    assert set(d) == {"coord", "energy", "@system"}
    assert d["coord"]["max_abs"] == pytest.approx(3e-9, rel=1e-6) and d["energy"]["max_abs"] == 0.5
    assert "energy max|Δ| 0.5" in summary_line({"variables": d})
    broken = tmp_path / "broken.nc"
    broken.write_bytes(b"not netcdf")
    assert "error" in dataset_difference(a, broken)


def test_model_difference_per_tensor_and_heldout_errors(tmp_path, tiny_model):
    import torch

    from pipeline.model.serialize import save_model

    a = save_model(tiny_model, tiny_model.config, tmp_path / "a.pt")
    name, param = next((n, p) for n, p in tiny_model.named_parameters() if "fitting" in n)
    with torch.no_grad():
        param.view(-1)[0] += 1e-4
    b = save_model(tiny_model, tiny_model.config, tmp_path / "b.pt")
    # held-out frames of the model's two types, labelled with arbitrary finite numbers
    from conftest import random_system

    pos, cell, atype = random_system(8, seed=1)
    hold = make_frames(pos[None], cell[None], atype, ["A", "B"], energy=[-3.0], force=np.zeros((1, 8, 3)))
    holdout = write_frames(tmp_path / "holdout.nc", hold)
    d = model_difference(a, b, holdout)
    assert list(d["tensors"]) == [f"state_dict.{name}"] and d["tensors"][f"state_dict.{name}"]["max_abs"] == pytest.approx(1e-4, rel=1e-6)
    h = d["heldout"]
    assert h["published"]["force_rmse"] > 0 and h["published"]["energy_rmse_per_atom"] != h["reproduced"]["energy_rmse_per_atom"]
    assert model_difference(a, a, holdout)["tensors"] == {}
    assert "held-out force RMSE" in summary_line(d) and f"state_dict.{name} max|Δ| 0.0001" in summary_line(d)
    # checkpoints: plain numbers (the learning curve) by size too, text by count
    torch.save({"lcurve": [{"rmse": 0.5}], "kind": "x"}, tmp_path / "c1.pt")
    torch.save({"lcurve": [{"rmse": 0.75}], "kind": "y"}, tmp_path / "c2.pt")
    assert model_difference(tmp_path / "c1.pt", tmp_path / "c2.pt")["tensors"] == {"lcurve.0.rmse": {"max_abs": 0.25}, "kind": {"differing": 1}}


def test_text_difference_of_metrics_and_curves(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"overall": {"force_rmse": 0.25, "n": 3}, "name": "x"}))
    (tmp_path / "b.json").write_text(json.dumps({"overall": {"force_rmse": 0.26, "n": 3}, "name": "y"}))
    d = text_difference(tmp_path / "a.json", tmp_path / "b.json")["values"]
    assert set(d) == {"overall.force_rmse", "name"} and d["overall.force_rmse"]["max_abs"] == pytest.approx(0.01)
    (tmp_path / "a.csv").write_text("step,rmse\n1,0.5\n2,nan\n")
    (tmp_path / "b.csv").write_text("step,rmse\n1,0.5\n2,0.4\n")
    assert text_difference(tmp_path / "a.csv", tmp_path / "b.csv")["values"] == {"rmse": {"max_abs": float("inf")}}


def test_compare_file_statuses(tmp_path):
    from pipeline.versioning import sha256

    root, work = tmp_path / "root", tmp_path / "work"
    for base, text in ((root, '{"a": 1}'), (work, '{"a": 1}')):
        (base / "x").mkdir(parents=True)
        (base / "x/r.json").write_text(text)
    digest = sha256(root / "x/r.json")
    assert compare_file("x/r.json", digest, root, work, False, None)["status"] == "identical"
    assert compare_file("x/r.json", digest, root, work, True, None)["status"] == "reused"
    (work / "x/r.json").write_text('{"a": 2}')
    e = compare_file("x/r.json", digest, root, work, False, None)
    assert e["status"] == "different" and e["difference"]["values"]["a"]["max_abs"] == 1.0
    assert compare_file("x/r.json", "0" * 64, root, work, False, None)["status"] == "published-corrupt"
    assert compare_file("x/missing.json", digest, root, work, False, None)["status"] == "missing"
    (root / "x/r.json").unlink()
    assert compare_file("x/r.json", digest, root, work, False, None)["status"] == "published-missing"


# ---------------------------------------------------------------- the environment record


def test_environment_record_and_differences():
    cfg = {"threads": {"train": 1, "explore": 1, "label": 1, "evaluate": 1}, "label": {"oracle": {"name": "emt", "kwargs": {}}}}
    here = environment.describe(cfg)
    assert set(environment.BIT_IDENTITY + environment.INFORMATIONAL) <= set(here)
    assert here["oracle_package"].startswith("ase ") and here["cpu_capability"] in here["embedding_kernel"] + "default"
    assert environment.differences(here, here) == []
    changed = dict(here, torch="2.0.0", cpu_model="another CPU")
    d = {x["key"]: x for x in environment.differences(changed, here)}
    assert set(d) == {"torch", "cpu_model"} and d["torch"]["affects_bits"] and not d["cpu_model"]["affects_bits"]
    # an old manifest without the record promises nothing
    assert {x["key"] for x in environment.differences(None, here)} == set(environment.BIT_IDENTITY + environment.INFORMATIONAL)


def test_kernel_switched_off_is_a_different_environment(monkeypatch):
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "0")
    assert environment.embedding_kernel() == "layer by layer (DPELT_FUSED_KERNEL=0)"


# ---------------------------------------------------------------- the workflow: publish, clone, reproduce


def sh(cwd: Path, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def clone(source: Path, dest: Path, remote: Path | None = None) -> Path:
    """git clone + dvc pull (from ``remote`` instead of the committed one, if given)."""
    sh(source.parent, "git", "clone", "-q", str(source), str(dest))
    if remote is not None:
        sh(dest, "dvc", "remote", "modify", "--local", "local", "url", str(remote))
    sh(dest, "dvc", "pull", "-q")
    return dest


@pytest.fixture(scope="session")
def published(finished_run, tmp_path_factory):
    """The test run as an author publishes it: tags + manifests (auto-published at the end of
    the run), a DVC remote (a directory) committed, pushed; and a reader's clone of it."""
    base = tmp_path_factory.mktemp("published")
    run = base / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    if sh(run, "git", "tag", "--list", "iter-*").stdout.split() != ["iter-000", "iter-001"]:
        sh(run, str(BIN / "dpelt"), "publish", "--all", "--configfile", "config/test.yaml")
    manifest = json.loads((run / "manifests/iter-000.json").read_text())
    assert manifest["run"]["config_file"] == "config/test.yaml" and manifest["run"]["seed"] == 7
    remote = base / "remote"
    remote.mkdir()
    sh(run, "dvc", "remote", "add", "-d", "local", str(remote))
    sh(run, "git", "add", ".dvc/config")
    sh(run, "git", "commit", "-qm", "DVC remote")
    sh(run, "dvc", "push", "-q")
    return {"run": run, "remote": remote, "clone": clone(run, base / "clone")}


def reproduce(cwd: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    proc = sh(cwd, str(BIN / "dpelt"), "reproduce", "--cores", "2", *args, check=False, env=env)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = Path(proc.stdout.rsplit("report: ", 1)[-1].strip())
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="session")
def reproduction(published):
    """`dpelt reproduce iter-000` in the clone (the tag before the latest: up to TAG only)."""
    return reproduce(published["clone"], "iter-000")


def test_reproduce_is_identical(published, reproduction):
    proc, report = reproduction
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert report["identical"] and report["tag"] == "iter-000" and report["iterations"] == ["000"]
    paths = {e["path"]: e for e in report["files"]}
    m = json.loads((published["clone"] / "manifests/iter-000.json").read_text())
    assert set(m["datasets_and_models"]) <= set(paths) and "iter/000/eval/metrics.json" in paths
    assert all(e["status"] == "identical" for e in paths.values()), [e for e in paths.values() if e["status"] != "identical"]
    for rel in m["datasets_and_models"]:
        assert f"identical  {rel}" in proc.stdout
    assert "IDENTICAL:" in proc.stdout and "NOT IDENTICAL" not in proc.stdout
    # re-executed up to the tag only, with the oracle, in a fresh directory inside the clone
    work = Path(report["workdir"])
    assert work == published["clone"] / "reproduce/iter-000" and not (work / "iter/001").exists()
    assert report["labels"]["oracle_calls"] == 3 and not report["reuse_labels"]
    assert not [d for d in report["environment"]["differences"] if d["affects_bits"]]
    assert "environment: as recorded" in proc.stdout
    assert sh(published["clone"], "git", "status", "--porcelain").stdout == ""  # nothing to commit by accident
    # a second reproduction refuses to mix with the first
    again = sh(published["clone"], str(BIN / "dpelt"), "reproduce", "iter-000", check=False)
    assert again.returncode == 2 and "work directory exists" in again.stderr


def test_corrupted_model_in_the_remote_is_named(published, reproduction, tmp_path):
    """One byte of one published model changed in the remote: a reader's clone pulls it, and
    reproduce names it (the re-execution of the first clone is reused: --resume, no new jobs)."""
    remote = tmp_path / "remote"
    shutil.copytree(published["remote"], remote)
    dvc = yaml.safe_load((published["run"] / "iter/000.dvc").read_text())["outs"][0]["md5"]
    listing = json.loads((remote / "files/md5" / dvc[:2] / dvc[2:]).read_text())
    md5 = next(e["md5"] for e in listing if e["relpath"] == "train/1/model.pt")
    victim = remote / "files/md5" / md5[:2] / md5[2:]
    os.chmod(victim, 0o644)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    reader = clone(published["run"], tmp_path / "clone", remote=remote)
    proc, report = reproduce(reader, "iter-000", "--resume", "--workdir", reproduction[1]["workdir"], "--report", str(tmp_path / "report.json"))
    assert proc.returncode == 1 and not report["identical"]
    bad = [e for e in report["files"] if e["status"] != "identical"]
    assert [(e["path"], e["status"]) for e in bad] == [("iter/000/train/1/model.pt", "published-corrupt")]
    assert bad[0]["reproduced_sha256"] == bad[0]["manifest_sha256"] != bad[0]["published_sha256"]
    line = next(line for line in proc.stdout.splitlines() if "iter/000/train/1/model.pt" in line)
    assert line.startswith("published-corrupt") and "max|Δ|" in line and "NOT IDENTICAL" in proc.stdout


SITECUSTOMIZE = '''
import os
from ase.calculators.emt import EMT


def _forbidden(self, *args, **kwargs):
    with open(os.environ["DPELT_TEST_ORACLE_CALLS"], "a") as fh:
        fh.write("called\\n")
    raise RuntimeError("the oracle must not be called")


EMT.calculate = _forbidden
'''


@pytest.mark.slow
def test_reuse_labels_never_calls_the_oracle(published, tmp_path):
    """--reuse-labels with an oracle that raises if called (every process of the re-execution
    imports a sitecustomize that replaces EMT's calculation): still identical."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site/sitecustomize.py").write_text(SITECUSTOMIZE)
    calls = tmp_path / "calls.txt"
    env = dict(ENV, PYTHONPATH=str(tmp_path / "site"), DPELT_TEST_ORACLE_CALLS=str(calls))
    proc, report = reproduce(published["clone"], "iter-001", "--reuse-labels", "--workdir", str(tmp_path / "work"), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert not calls.exists()
    assert report["labels"]["oracle_calls"] == 0 and report["labels"]["from_task_cache"] == 6
    status = {e["path"]: e["status"] for e in report["files"]}
    assert {s for p, s in status.items() if p.startswith("data/")} == {"reused"}
    assert {s for p, s in status.items() if p.startswith("iter/")} == {"identical"} and "iter/001/train/0/model.pt" in status
    assert "oracle calls: 0" in proc.stdout


def test_reproduce_refuses_what_it_cannot_reproduce(tmp_path):
    from pipeline.errors import DpeltError
    from pipeline.reproduce import reproduce as run_reproduce

    with pytest.raises(DpeltError, match="not a git repository"):
        run_reproduce(tmp_path)
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x"]):
        sh(tmp_path, *cmd)
    with pytest.raises(DpeltError, match="no published iterations"):
        run_reproduce(tmp_path)
    sh(tmp_path, "git", "tag", "iter-000")
    with pytest.raises(DpeltError, match=r"no such tag 'iter-007' \(published: iter-000\)"):
        run_reproduce(tmp_path, "iter-007")
    with pytest.raises(DpeltError, match="has no manifests/iter-000.json"):
        run_reproduce(tmp_path, "iter-000")


def test_run_record_names_the_config(tmp_path):
    from pipeline.errors import DpeltError
    from pipeline.versioning import run_record, sha256

    root = tmp_path / "run"
    (root / "config").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parents[1] / "config/test.yaml", root / "config/test.yaml")
    entry, config = run_record(root, "config/test.yaml")
    assert entry == {"config_file": "config/test.yaml", "config_sha256": sha256(root / "config/test.yaml"), "seed": 7}
    assert config["threads"]["train"] == 1 and config["label"]["oracle"]["name"] == "emt"  # validated, defaults filled
    with pytest.raises(DpeltError, match="config file is not there"):
        run_record(root)  # config/config.yaml: not there
    shutil.copy(root / "config/test.yaml", tmp_path / "outside.yaml")
    said = []
    entry, _ = run_record(root, tmp_path / "outside.yaml", log=said.append)
    assert entry["config_file"] is None and entry["config_outside"] == str((tmp_path / "outside.yaml").resolve())
    assert "outside the run directory" in said[0]
