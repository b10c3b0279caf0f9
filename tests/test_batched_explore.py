"""Batched exploration (explore.batched): all walkers of an iteration in one process.

Held against the per-task ASE driver (pipeline.explore.md.run_md), which stays the reference:
one walker gives ASE's trajectory bit for bit; in a batch a walker's frames do not depend on
its companions beyond rounding; seeds, guards, bias and the written files behave as today.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import randomize_stats
from pipeline.calculator import EnsembleCalculator
from pipeline.data.netcdf import read_frames
from pipeline.errors import ConfigError
from pipeline.explore.batched import explore_batch
from pipeline.explore.bias import BiasConfig
from pipeline.explore.guards import GuardConfig
from pipeline.explore.md import MDTask, run_md
from pipeline.model.config import parse_model_config
from pipeline.model.deeppot import DeepPot

COORDS = ("coord", "max_devi_f", "min_devi_f", "avg_devi_f", "devi_e", "max_devi_v", "min_devi_v", "avg_devi_v", "potential_energy", "kinetic_temperature_K", "bias_energy", "md_step")


@pytest.fixture(scope="module")
def models():
    """Three Cu/Au models with different weights (random, small: smooth forces for short MD)."""
    out = []
    for k in range(3):
        cfg = parse_model_config(
            {
                "type_map": ["Cu", "Au"],
                "descriptor": {"sel": [40, 40], "rcut": 4.0, "rcut_smth": 1.5, "neuron": [4, 8], "axis_neuron": 4, "type_one_side": True, "seed": 3 + k},
                "fitting_net": {"neuron": [16, 16], "seed": 10 + k},
            }
        )
        m = randomize_stats(DeepPot(cfg), seed=k)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.3)
        out.append(m.requires_grad_(False))
    return out


def crystal(symbols=("Cu", "Au"), a=3.7, rattle=0.0, seed=0):
    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat((2, 2, 2))
    atoms.set_chemical_symbols([symbols[i % len(symbols)] for i in range(len(atoms))])
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def task(name="t", **kw):
    return MDTask(**({"name": name, "temperature_K": 300.0, "nsteps": 12, "trj_freq": 4, "seed": 5, "dt_fs": 1.0} | kw))


def frames(path: Path):
    (ds,) = read_frames(path / "frames.nc")
    return ds


def assert_same_files(a: Path, b: Path, atol: float = 0.0):
    da, db = frames(a), frames(b)
    assert da.sizes == db.sizes
    for k in COORDS:
        np.testing.assert_allclose(da[k].values, db[k].values, rtol=0, atol=atol, err_msg=k)
    assert json.loads(da.attrs["task"]) == json.loads(db.attrs["task"])
    assert (da.attrs["status"], da.attrs["reason"], da.attrs["steps_done"]) == (db.attrs["status"], db.attrs["reason"], db.attrs["steps_done"])
    ja, jb = json.loads((a / "md.json").read_text()), json.loads((b / "md.json").read_text())
    assert ja == jb
    if atol == 0.0:  # the log, but for its last line (wall time)
        assert (a / "md.log").read_text().splitlines()[:-1] == (b / "md.log").read_text().splitlines()[:-1]


@pytest.mark.parametrize("ensemble", ["nvt", "nve"])
def test_one_walker_is_ase_bit_for_bit(models, tmp_path, ensemble):
    t = task(ensemble=ensemble)
    atoms = crystal(rattle=0.02)
    run_md(t, atoms, EnsembleCalculator(models), tmp_path / "ref")
    explore_batch([t], [atoms], models, [tmp_path / "bat"])
    assert_same_files(tmp_path / "ref", tmp_path / "bat")
    assert frames(tmp_path / "bat").sizes["frame"] == 4


def test_bias_and_mean_drive_match_ase(models, tmp_path):
    t = task(drive="mean", bias=BiasConfig(kind="udd", strength=0.5, width=0.05), nsteps=8)
    atoms = crystal(rattle=0.05)
    run_md(t, atoms, EnsembleCalculator(models, drive="mean", bias=t.bias), tmp_path / "ref")
    explore_batch([t], [atoms], models, [tmp_path / "bat"])
    assert np.abs(frames(tmp_path / "bat")["bias_energy"].values).max() > 0  # the bias acted
    assert_same_files(tmp_path / "ref", tmp_path / "bat")


def test_walker_alone_equals_walker_in_a_batch(models, tmp_path):
    """A task's frames do not depend on which walkers share its batch (own seed, own rows)."""
    a = task("a", ensemble="nvt", seed=11)
    b = task("b", ensemble="nvt", seed=12, temperature_K=600.0)
    c = task("c", ensemble="nvt", seed=13, nsteps=6)  # ends early: the batch shrinks
    # b shares a's super-frame (same elements), c is evaluated apart (copper only)
    start_a, start_b, start_c = crystal(rattle=0.03, seed=1), crystal(("Au", "Cu", "Cu"), a=3.8, rattle=0.03, seed=2), crystal(("Cu",), a=3.6)
    explore_batch([a], [start_a], models, [tmp_path / "alone"])
    explore_batch([b, a, c], [start_b, start_a, start_c], models, [tmp_path / "b", tmp_path / "a", tmp_path / "c"])
    assert_same_files(tmp_path / "alone", tmp_path / "a", atol=1e-9)
    assert frames(tmp_path / "c").sizes["frame"] == 2 and frames(tmp_path / "b").sizes["frame"] == 4
    # and b ran its own task (its own seed and temperature), not a copy of a's
    explore_batch([b], [start_b], models, [tmp_path / "b_alone"])
    assert_same_files(tmp_path / "b_alone", tmp_path / "b", atol=1e-9)


def test_guard_stops_one_walker_the_others_go_on(models, tmp_path):
    """A walker cut by a guard (here the deviation ceiling) ends as through ASE; the batch goes on."""
    hot = task("hot", guards=GuardConfig(devi_ceiling=1e-9, devi_patience=2))
    calm = task("calm")
    atoms = crystal(rattle=0.02)
    run_md(hot, atoms, EnsembleCalculator(models), tmp_path / "ref")
    explore_batch([hot, calm], [atoms, atoms], models, [tmp_path / "hot", tmp_path / "calm"])
    ref = json.loads((tmp_path / "ref" / "md.json").read_text())
    got = json.loads((tmp_path / "hot" / "md.json").read_text())
    assert got["status"] == "stopped" and "max_devi_f above" in got["reason"] and got["steps_done"] == 4
    assert got == ref
    assert json.loads((tmp_path / "calm" / "md.json").read_text())["status"] == "completed"


def test_unsupported_ensemble_is_refused(models, tmp_path):
    with pytest.raises(ConfigError) as err:
        explore_batch([task(ensemble="nvt-bussi")], [crystal()], models, [tmp_path / "x"])
    assert err.value.key == "explore.batched"
    with pytest.raises(ConfigError):
        explore_batch([task("a"), task("b", drive="mean")], [crystal(), crystal()], models, [tmp_path / "a", tmp_path / "b"])


def test_cli_writes_every_task_and_the_manifest(models, tmp_path):
    from pipeline.cli import main
    from pipeline.data.ase_io import atoms_to_frames
    from pipeline.data.netcdf import write_frames
    from pipeline.model.serialize import save_model

    paths = []
    for k, m in enumerate(models):
        paths.append(str(tmp_path / f"m{k}.pt"))
        save_model(m, m.config, paths[-1])
    cu = crystal(("Cu",), a=3.6)
    cu.info["system"] = "cu"
    (ds,) = atoms_to_frames([cu], ["Cu", "Au"], source="test")
    write_frames(tmp_path / "init.nc", [ds.assign_attrs(system="cu")])
    spec = {"temperature_K": 300.0, "pressure_bar": None, "ensemble": "nvt", "nsteps": 8, "trj_freq": 4, "dt_fs": 1.0, "tau_t_fs": 100.0, "tau_p_fs": 1000.0, "drive": "first", "bias": {}, "guards": {}, "trust_lo": 0.1, "trust_hi": 0.3}
    items = [{"name": "cu_T300", "system": "cu", "seed": 7, "spec": spec}, {"name": "cu_T600", "system": "cu", "seed": 8, "spec": spec | {"temperature_K": 600.0}}]
    out = tmp_path / "iter" / "explore"
    assert main(["explore-batch", "-m", *paths, "--start", str(tmp_path / "init.nc"), "--tasks", json.dumps(items), "-o", str(out), "--iteration", "3"]) in (0, None)
    manifest = json.loads((out / "batch.json").read_text())
    assert [s["task"]["name"] for s in manifest["tasks"]] == ["cu_T300", "cu_T600"]
    for name, seed in (("cu_T300", 7), ("cu_T600", 8)):
        ds = frames(out / name)
        assert ds.sizes["frame"] == 3 and set(ds["source_task"].values) == {name} and set(ds["source_iter"].values) == {3}
        assert json.loads(ds.attrs["task"])["seed"] == seed
    # the same task through `dpelt explore` (the per-task rule) gives the same files
    assert main(["explore", "-m", *paths, "--start", str(tmp_path / "init.nc"), "--system", "cu", "--spec", json.dumps(spec), "-o", str(tmp_path / "one"), "--name", "cu_T300", "--seed", "7", "--iteration", "3"]) in (0, None)
    assert_same_files(tmp_path / "one", out / "cu_T300", atol=1e-9)


def _batched_run_dir(tmp_path):
    import yaml
    from test_workflow import ROOT, workflow_dir

    cfg = yaml.safe_load((ROOT / "config" / "test.yaml").read_text())
    cfg["explore"]["batched"] = True
    cfg["explore"]["stages"][0]["temps"] = [300.0, 600.0]
    cfg["max_iter"] = 1
    return workflow_dir(tmp_path, cfg)


def test_workflow_dry_run_schedules_one_batch_job(tmp_path):
    from test_workflow import snakemake

    run = _batched_run_dir(tmp_path)
    dry = snakemake(run, "-n", configfile="config/run.yaml")
    assert "explore_batch" in dry.stdout and "rule explore:" not in dry.stdout
    lint = snakemake(run, "--lint", configfile="config/run.yaml", check=False)
    findings = {line.strip() for line in lint.stdout.splitlines() + lint.stderr.splitlines() if line.strip().startswith("* ")}
    assert findings <= {"* Specify a conda environment or container for each rule.:"}, findings


@pytest.mark.slow
def test_workflow_batched_iteration_writes_every_task(tmp_path):
    """One iteration with explore.batched: one exploration job, every task's files, select reads them."""
    from test_workflow import snakemake

    run = _batched_run_dir(tmp_path)
    snakemake(run, "--cores", "2", configfile="config/run.yaml")
    assert sorted(p.name for p in (run / "benchmarks" / "explore").iterdir()) == ["000_batch.tsv"]
    for task in ("cu_T300", "cu_T600"):
        assert frames(run / "iter/000/explore" / task).sizes["frame"] > 0
    report = json.loads((run / "iter/000/select/report.json").read_text())
    assert report  # select ran on the batch's files
    assert "walkers" in (run / "logs/explore/000_batch.log").read_text()
