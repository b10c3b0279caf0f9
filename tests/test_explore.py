"""Exploration: ensemble evaluation, model deviation, MD drivers, guards and biases."""

import numpy as np
import pytest
import torch
from ase.build import bulk

from conftest import random_system, randomize_stats, tiny_model_config
from pipeline.calculator import DeepPotCalculator, EnsembleCalculator
from pipeline.data.netcdf import read_frames, write_frames
from pipeline.examples import emt_bulk_frames
from pipeline.explore.bias import BiasConfig
from pipeline.explore.deviation import model_deviation
from pipeline.explore.guards import GuardConfig
from pipeline.explore.md import MDTask, run_md
from pipeline.model.deeppot import DeepPot
from pipeline.model.ensemble import Ensemble
from pipeline.model.inputs import frame_inputs
from pipeline.model.serialize import load_model
from pipeline.train.config import parse_train_config
from pipeline.train.loop import train


@pytest.fixture(scope="session")
def cu_ensemble(tmp_path_factory):
    """Four small models trained briefly on EMT copper with different seeds."""
    d = tmp_path_factory.mktemp("cu")
    write_frames(d / "train.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=15, seed=1))
    paths = []
    for k in range(4):
        cfg = parse_train_config(
            {
                "model": {"type_map": ["Cu"], "descriptor": {"sel": [60], "rcut": 4.5, "rcut_smth": 2.0, "neuron": [4, 8], "axis_neuron": 4, "type_one_side": True}, "fitting_net": {"neuron": [16, 16]}},
                "learning_rate": {"start_lr": 2e-2, "stop_lr": 1e-4, "decay_steps": 10},
                "training": {"training_data": {"systems": [str(d / "train.nc")]}, "numb_steps": 400, "seed": 100 + k, "disp_freq": 400, "save_freq": 400, "threads": 2},
            }
        )
        paths.append(train(cfg, d / f"m{k}", log=lambda s: None))
    return paths


def cu_atoms(repeat=(2, 2, 2)):
    return bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)


def test_model_deviation_matches_direct_numpy():
    rng = np.random.default_rng(0)
    M, nf, n = 4, 3, 5
    E, F, V = rng.normal(size=(M, nf)), rng.normal(size=(M, nf, n, 3)), rng.normal(size=(M, nf, 3, 3))
    d = model_deviation(E, F, V)
    for f in range(nf):
        per_atom = [np.sqrt(np.mean([np.sum((F[m, f, i] - F[:, f, i].mean(0)) ** 2) for m in range(M)])) for i in range(n)]
        assert d["max_devi_f"][f] == pytest.approx(max(per_atom))
        assert d["min_devi_f"][f] == pytest.approx(min(per_atom))
        assert d["avg_devi_f"][f] == pytest.approx(np.mean(per_atom))
        assert d["devi_e"][f] == pytest.approx(np.std(E[:, f] / n))
        sv = np.std(V[:, f].reshape(M, 9) / n, axis=0)
        assert d["max_devi_v"][f] == pytest.approx(sv.max())
        assert d["avg_devi_v"][f] == pytest.approx(np.linalg.norm(sv) / 3)


@pytest.mark.parametrize("same_shapes", [True, False])
def test_ensemble_pass_equals_models_one_by_one(same_shapes):
    models = [randomize_stats(DeepPot(tiny_model_config(type_one_side=k % 2 == 0 if not same_shapes else False)), seed=k) for k in range(3)]
    for k, m in enumerate(models):  # different weights
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * k)
    ens = Ensemble(models)
    assert ens.stacked == same_shapes
    pos, cell, atype = random_system(10, seed=3)
    rij, nlist, _, _ = frame_inputs(pos[None], cell[None], (True,) * 3, atype, ens.rcut, ens.sel, ens.type_map)
    out = ens.evaluate(rij, nlist, torch.from_numpy(atype))
    for k, m in enumerate(models):
        ref = m.forward_rij(rij, nlist, torch.from_numpy(atype))
        torch.testing.assert_close(out["energy"][k], ref["energy"], rtol=0, atol=1e-12)
        torch.testing.assert_close(out["force"][k], ref["force"], rtol=0, atol=1e-12)
        torch.testing.assert_close(out["virial"][k], ref["virial"], rtol=0, atol=1e-12)


@pytest.mark.parametrize("type_one_side,precision,resnet_dt", [(True, "float64", False), (False, "float64", True), (True, "float32", True)])
def test_stacked_pass_equals_members_padded_and_full(type_one_side, precision, resnet_dt):
    """The batched (stacked) ensemble pass gives each member's own energies and forces, with
    different statistics per member, on the padding-skipping path and on the full-slot path."""
    models = []
    for k in range(4):
        cfg = tiny_model_config(type_one_side=type_one_side, precision=precision, resnet_dt=resnet_dt, seed=10 + k)
        models.append(randomize_stats(DeepPot(cfg), seed=k))
    ens = Ensemble(models)
    assert ens.stack is not None
    pos, cell, atype = random_system(10, seed=5)
    rij, nlist, _, _ = frame_inputs(pos[None], cell[None], (True,) * 3, atype, ens.rcut, ens.sel, ens.type_map)
    ta = torch.from_numpy(atype)
    counts = models[0].section_counts(nlist)
    assert sum(counts) < sum(ens.sel)  # the padding path is exercised
    tol = 1e-12 if precision == "float64" else 1e-4
    rij_m = rij.unsqueeze(0).repeat(4, 1, 1, 1, 1)
    for c in (counts, None):
        stacked = ens.stack.atomic_energy(rij_m, ta, c)  # [M, nf, nloc]
        for k, m in enumerate(models):
            torch.testing.assert_close(stacked[k], m.atomic_energy(rij, ta, c), rtol=0, atol=tol)
    out = ens.evaluate(rij, nlist, ta)
    for k, m in enumerate(models):
        ref = m.forward_rij(rij, nlist, ta)
        torch.testing.assert_close(out["force"][k], ref["force"], rtol=0, atol=tol)
        torch.testing.assert_close(out["virial"][k], ref["virial"], rtol=0, atol=tol)


def test_identical_models_give_zero_deviation(cu_ensemble):
    calc = EnsembleCalculator([cu_ensemble[0]] * 4, threads=1)
    atoms = cu_atoms()
    atoms.rattle(0.1, seed=1)
    atoms.calc = calc
    atoms.get_forces()
    dev = calc.results["deviation"]
    assert max(abs(v) for v in dev.values()) < 1e-12  # zero up to rounding of the mean


def test_ensemble_deviation_matches_separate_calculators(cu_ensemble):
    atoms = cu_atoms()
    atoms.rattle(0.1, seed=2)
    F, E = [], []
    for p in cu_ensemble:
        a = atoms.copy()
        a.calc = DeepPotCalculator(p, threads=1)
        F.append(a.get_forces())
        E.append(a.get_potential_energy())
    calc = EnsembleCalculator(cu_ensemble, threads=1)
    atoms.calc = calc
    np.testing.assert_allclose(atoms.get_forces(), F[0], atol=1e-12)  # the first model drives
    ref = model_deviation(np.array(E)[:, None], np.array(F)[:, None])
    assert calc.results["deviation"]["max_devi_f"] == pytest.approx(ref["max_devi_f"][0], abs=1e-12)
    assert calc.results["deviation"]["devi_e"] == pytest.approx(ref["devi_e"][0], abs=1e-12)
    assert calc.results["deviation"]["max_devi_f"] > 1e-4


def _run(tmp_path, models, name, **task):
    calc = EnsembleCalculator(models, threads=1, bias=task.get("bias"))
    t = MDTask(name=name, **({"temperature_K": 600.0, "nsteps": 60, "trj_freq": 10, "dt_fs": 2.0, "seed": 7} | task))
    summary = run_md(t, cu_atoms(), calc, tmp_path / name)
    return summary, tmp_path / name


def test_seeded_md_repeats_bit_for_bit(tmp_path, cu_ensemble):
    s1, d1 = _run(tmp_path, cu_ensemble, "a")
    s2, d2 = _run(tmp_path, cu_ensemble, "a2", seed=7)
    s3, d3 = _run(tmp_path, cu_ensemble, "b", seed=8)
    (f1,), (f2,), (f3,) = read_frames(d1 / "frames.nc"), read_frames(d2 / "frames.nc"), read_frames(d3 / "frames.nc")
    assert s1["status"] == "completed" and f1.sizes["frame"] == 7  # steps 0, 10, …, 60
    np.testing.assert_array_equal(f1["coord"].values, f2["coord"].values)
    np.testing.assert_array_equal(f1["max_devi_f"].values, f2["max_devi_f"].values)
    assert not np.array_equal(f1["coord"].values, f3["coord"].values)
    assert list(f1["md_step"].values) == [0, 10, 20, 30, 40, 50, 60]
    assert (f1["temperature_K"].values == 600.0).all() and (f1["source_task"].values == "a").all()
    assert (f1["max_devi_f"].values > 0).all() and "devi_e" in f1.coords


@pytest.mark.parametrize("ensemble,press", [("nvt-bussi", None), ("nvt-nh", None), ("npt", 1000.0), ("npt-aniso", 1.0), ("npt-tri", 1.0)])
def test_every_ensemble_runs(tmp_path, cu_ensemble, ensemble, press):
    s, d = _run(tmp_path, cu_ensemble, ensemble, ensemble=ensemble, pressure_bar=press, nsteps=20)
    assert s["status"] == "completed", s["reason"]
    (f,) = read_frames(d / "frames.nc")
    assert f.sizes["frame"] == 3
    if ensemble.startswith("npt"):
        assert not np.allclose(f["cell"].values[0], f["cell"].values[-1])  # the cell moves


def test_nve_conserves_energy(cu_ensemble):
    from ase.md.verlet import VelocityVerlet
    from ase.md.velocitydistribution import thermalize_momenta

    atoms = cu_atoms()
    atoms.calc = DeepPotCalculator(cu_ensemble[0], threads=1)
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = VelocityVerlet(atoms, timestep=1.0 * 0.09822694788464063)  # 1 fs in ASE units
    e0 = atoms.get_total_energy()
    energies = []
    for _ in range(10):
        dyn.run(20)
        energies.append(atoms.get_total_energy())
    drift = np.abs(np.array(energies) - e0).max() / len(atoms)
    assert drift < 2e-4, drift  # eV/atom over 200 fs
    assert abs(atoms.get_potential_energy() - energies[-1] + atoms.get_kinetic_energy()) < 1e-9


def test_blow_up_is_detected_and_cut(tmp_path, cu_ensemble):
    # a deliberately broken potential: amplify model 0 so forces are enormous
    broken = load_model(cu_ensemble[0])
    with torch.no_grad():
        for net in broken.fitting.nets:
            net.layers[-1].weight.mul_(-400.0)  # an inverted, steep landscape
    s, d = _run(tmp_path, [broken] + [load_model(p) for p in cu_ensemble[1:]], "broken", nsteps=300)
    assert s["status"] == "stopped"
    assert any(w in s["reason"] for w in ("temperature runaway", "apart", "non-finite", "volume"))
    frames = read_frames(d / "frames.nc")
    kept = frames[0].sizes["frame"] if frames else 0
    assert kept <= s["steps_done"] // 10 + 1
    assert "stopped at step" in (d / "md.log").read_text()
    # a deviation ceiling stops a run whose ensemble disagrees for k kept frames in a row
    s2, _ = _run(tmp_path, cu_ensemble, "ceiling", guards=GuardConfig(devi_ceiling=1e-9, devi_patience=2))
    # step 0 is the perfect crystal (zero forces, zero deviation); steps 10 and 20 are above the ceiling
    assert s2["status"] == "stopped" and "for 2 frames in a row" in s2["reason"] and s2["frames"] == 3


def test_atoms_too_close_is_detected(tmp_path, cu_ensemble):
    calc = EnsembleCalculator(cu_ensemble, threads=1)
    atoms = cu_atoms()
    atoms.positions[1] = atoms.positions[0] + [0.3, 0.0, 0.0]
    summary = run_md(MDTask(name="close", temperature_K=300.0, nsteps=10, seed=1), atoms, calc, tmp_path / "close")
    assert summary["status"] == "stopped" and "apart" in summary["reason"] and summary["frames"] == 0
    assert read_frames(tmp_path / "close" / "frames.nc") == []


@pytest.mark.parametrize("kind,strength", [("confidence", 0.6), ("udd", 2.0)])
def test_bias_forces_are_minus_gradient(cu_ensemble, kind, strength):
    bias = BiasConfig(kind=kind, strength=strength, width=0.5, trust_lo=0.0, trust_hi=5.0)
    calc = EnsembleCalculator(cu_ensemble, bias=bias, threads=1)
    atoms = cu_atoms((1, 1, 2))
    atoms.rattle(0.15, seed=3)
    atoms.calc = calc
    e0 = atoms.get_potential_energy()
    calc.bias_ceiling = e0 + 10.0  # well above every member's energy
    atoms.calc.reset()
    f = atoms.get_forces()
    assert calc.results["bias_energy"] != 0.0
    from ase.calculators.fd import calculate_numerical_forces

    np.testing.assert_allclose(f, calculate_numerical_forces(atoms, eps=1e-5), atol=1e-6)


def test_biases_shorten_the_stay_in_the_start_basin(tmp_path, cu_ensemble):
    """Fraction of kept frames within 0.15 Å RMSD of the start crystal: plain MD vs each bias."""
    start = cu_atoms()
    stay = {}
    for kind, strength in (("none", 0.0), ("confidence", 0.8), ("udd", 2.0)):
        bias = BiasConfig(kind=kind, strength=strength, width=0.3, trust_lo=0.5, trust_hi=2.0)
        calc = EnsembleCalculator(cu_ensemble, bias=bias, threads=1)
        task = MDTask(name=kind, temperature_K=300.0, nsteps=400, trj_freq=10, dt_fs=2.0, seed=3, bias=bias)
        summary = run_md(task, start, calc, tmp_path / kind)
        assert summary["status"] == "completed", summary["reason"]
        (f,) = read_frames(tmp_path / kind / "frames.nc")
        d = f["coord"].values - start.positions
        d -= d.mean(axis=1, keepdims=True)  # remove the drift of the centre of mass
        rmsd = np.sqrt((d**2).sum(-1).mean(-1))
        stay[kind] = float((rmsd < 0.15).mean())
        if kind != "none":
            assert np.abs(f["bias_energy"].values).max() > 0  # the bias energy is recorded per frame
    assert stay["none"] > 0.3
    assert stay["confidence"] < 0.5 * stay["none"], stay
    assert stay["udd"] < 0.5 * stay["none"], stay
