"""The cp2k oracle with the real CP2K (Debian's cp2k_shell): units and signs, reproducibility,
one shell per job, and the failures a real DFT code produces (unconverged SCF, a crashed or
hung shell, an element without basis set). Tests that run CP2K skip where it is not installed."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import ase
import numpy as np
import pytest
from ase.build import molecule

from pipeline.errors import ConfigError, DpeltError
from pipeline.label.cp2k_calc import DEFAULT_DATA_DIR, NOT_CONVERGED, check_cp2k_elements, cp2k_kwargs, read_scf_converged
from pipeline.label.oracles import check_elements, make_oracle
from pipeline.label.run import label, run_task
from pipeline.label.timeout import descendants

HAVE_CP2K = shutil.which("cp2k_shell") is not None and (Path(DEFAULT_DATA_DIR) / "BASIS_MOLOPT").is_file()
SKIP_REASON = "cp2k_shell or /usr/share/cp2k not found (apt-get install cp2k cp2k-data)"
needs_cp2k = pytest.mark.skipif(not HAVE_CP2K, reason=SKIP_REASON)

#: Small and quick: a minimal basis at 150 Ry (about a second per label of one water molecule).
CHEAP = {"basis_set": "SZV-MOLOPT-SR-GTH", "cutoff_Ry": 150, "rel_cutoff_Ry": 30}


def water_cell(length: float = 4.0, shift: float = 0.0) -> ase.Atoms:
    """One H2O in a periodic cube of ``length`` Å (slightly off-centre and skewed: no symmetry zeroes)."""
    w = molecule("H2O")
    w.rotate(30, "x")
    w.rotate(20, "z")
    w.cell = np.eye(3) * length + np.array([[0, 0, 0], [0.15, 0, 0], [0, 0.1, 0]])
    w.pbc = True
    w.center()
    w.positions[1, 0] += shift
    return w


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _candidates(path: Path, images: list[ase.Atoms]) -> Path:
    from pipeline.data.ase_io import atoms_to_frames
    from pipeline.data.netcdf import write_frames

    for k, a in enumerate(images):
        a.info.update({"source_task": f"test:{k}", "md_step": k})
    write_frames(path, atoms_to_frames(images, ["O", "H"], source="test"))
    return path


# ---------------------------------------------------------------- without CP2K


def _fake_data(tmp_path: Path) -> Path:
    (tmp_path / "BASIS").write_text("# a basis file\n H  SZV-MOLOPT-SR-GTH SZV-MOLOPT-SR-GTH-q1\n 1\n O SZV-MOLOPT-SR-GTH\n 1\n")
    (tmp_path / "POT").write_text("H GTH-PBE-q1 GTH-PBE\n    1\nO GTH-PBE-q6 GTH-PBE\n")
    return tmp_path


def test_missing_basis_or_potential_is_one_error_naming_element_and_file(tmp_path):
    data = _fake_data(tmp_path)
    kw = cp2k_kwargs({"basis_set": "SZV-MOLOPT-SR-GTH", "basis_set_file": "BASIS", "potential_file": "POT", "data_dir": str(data)})
    check_cp2k_elements(kw, ["O", "H"])  # both present
    with pytest.raises(ConfigError, match=rf"\[oracle\.kwargs\.basis_set\]: no basis set 'SZV-MOLOPT-SR-GTH' for element Na in {data / 'BASIS'}"):
        check_cp2k_elements(kw, ["H", "Na"])
    with pytest.raises(ConfigError, match=rf"\[oracle\.kwargs\.pseudo_potential\]: no pseudopotential 'GTH-BLYP' for element H in {data / 'POT'}"):
        check_cp2k_elements(kw | {"pseudo_potential": "GTH-BLYP"}, ["H"])
    with pytest.raises(ConfigError, match=r"\[oracle\.kwargs\.basis_set_file\]: the CP2K basis set file .*/NOPE does not exist"):
        check_cp2k_elements(kw | {"basis_set_file": "NOPE"}, ["H"])
    # the same through the oracle's own check (what config validation and every job call)
    with pytest.raises(ConfigError, match=r"element Na"):
        check_elements({"name": "cp2k", "kwargs": {"basis_set_file": "BASIS", "potential_file": "POT", "data_dir": str(data), "basis_set": "SZV-MOLOPT-SR-GTH"}}, ["Na"])


@pytest.mark.skipif(not (Path(DEFAULT_DATA_DIR) / "BASIS_MOLOPT").is_file(), reason=SKIP_REASON)
def test_config_validation_refuses_an_element_without_basis_before_any_job(tmp_path):
    """Francium has no MOLOPT basis: the run config is refused when it is loaded."""
    import yaml

    from pipeline.runconfig import load_run_config

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "examples" / "water-cp2k.yaml").read_text())
    cfg["type_map"] = ["O", "H", "Fr"]
    cfg["init"]["structures"] = [{"name": "w", "lattice": "sc", "elements": ["O"], "a": 3.0}]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"run\.yaml \[label\.oracle\.kwargs\.basis_set\]: no basis set 'SZV-MOLOPT-SR-GTH' for element Fr in /usr/share/cp2k/BASIS_MOLOPT"):
        load_run_config(tmp_path / "run.yaml")


def test_settings_are_checked_and_defaults_come_from_the_schema():
    kw = cp2k_kwargs({})
    assert kw["xc"] == "PBE" and kw["basis_set"] == "DZVP-MOLOPT-SR-GTH" and kw["pseudo_potential"] == "GTH-PBE"
    assert kw["cutoff_Ry"] == 400 and kw["rel_cutoff_Ry"] == 50 and kw["max_scf"] == 50 and kw["eps_scf"] == 1e-6 and kw["stress"] is None
    with pytest.raises(ConfigError, match=r"unknown cp2k settings \['cutoff'\]"):
        cp2k_kwargs({"cutoff": 400})
    with pytest.raises(ConfigError, match=r"\[oracle\.kwargs\.max_scf\]: must be an integer >= 1"):
        cp2k_kwargs({"max_scf": 0})
    with pytest.raises(ConfigError, match=r"\[oracle\.kwargs\.inp\]: the cp2k input template clashes"):
        make_oracle({"name": "cp2k", "kwargs": {"inp": "&FORCE_EVAL\n&DFT\n&SCF\nEPS_SCF 1e-3\n&END SCF\n&END DFT\n&END FORCE_EVAL"}}).kwargs and __import__("pipeline.label.cp2k_calc", fromlist=["x"]).input_template(cp2k_kwargs({"inp": "&FORCE_EVAL\n&DFT\n&SCF\nEPS_SCF 1e-3\n&END SCF\n&END DFT\n&END FORCE_EVAL"}))


def test_scf_convergence_is_read_from_this_evaluations_output(tmp_path):
    out = tmp_path / "cp2k.out"
    assert read_scf_converged(out) is None  # no file
    done = " ENERGY| Total FORCE_EVAL ( QS ) energy [a.u.]:   -17.1\n"
    out.write_text(" *** SCF run converged in 12 steps ***\n" + done)
    assert read_scf_converged(out) is True
    offset = out.stat().st_size
    with open(out, "a") as fh:
        fh.write(f" *** WARNING in qs_scf.F:601 :: {NOT_CONVERGED} ***\n" + done)
    assert read_scf_converged(out) is False and read_scf_converged(out, offset) is False
    assert read_scf_converged(out, out.stat().st_size) is None  # nothing evaluated past the offset


# ---------------------------------------------------------------- with CP2K


@needs_cp2k
def test_one_shell_per_job_labels_bit_reproducible_in_any_order(tmp_path):
    """The same frame labelled in two jobs, after another frame in one and first in the other,
    gives the same bits; one cp2k_shell serves a job and is gone after it."""
    oracle = make_oracle({"name": "cp2k", "kwargs": CHEAP})
    a, b = water_cell(), water_cell(shift=0.07)
    with oracle.session() as s:
        ra, _ = run_task(s, a, tmp_path / "job1" / "a", "a", 50.0)
        pid = s.server.calc._shell._child.pid
        rb1, _ = run_task(s, b, tmp_path / "job1" / "b", "b", 50.0)
        assert s.server.starts == 1 and s.server.calc._shell._child.pid == pid  # reused, not restarted
    assert _gone(pid)
    with oracle.session() as s:
        rb2, _ = run_task(s, b, tmp_path / "job2" / "b", "b", 50.0)
    assert ra["status"] == rb1["status"] == rb2["status"] == "ok" and ra["converged"] is True
    for key in ("energy", "forces", "stress"):
        assert np.array_equal(np.asarray(rb1[key]), np.asarray(rb2[key])), key
    assert ra["energy"] != rb1["energy"]
    # eV: one water molecule's PBE/GTH total energy is about -17.2 Ha
    assert -480 < ra["energy"] < -460 and np.asarray(ra["stress"]).shape == (6,)


@needs_cp2k
def test_stress_and_forces_match_finite_differences_of_the_energy(tmp_path):
    """ASE's sign and units: stress = (1/V) dE/dε (eV/Å³), F = -dE/dx (eV/Å), to a few 1e-3."""
    oracle = make_oracle({"name": "cp2k", "kwargs": CHEAP | {"eps_scf": 1e-9, "cutoff_Ry": 200}})
    atoms = water_cell()
    h = 2e-3
    with oracle.session() as s:
        n = [0]

        def energy(a):
            n[0] += 1
            r, _ = run_task(s, a, tmp_path / f"t{n[0]}", f"t{n[0]}", 50.0)
            assert r["status"] == "ok", r
            return r

        ref = energy(atoms)
        vol = atoms.get_volume()
        for (i, j), voigt in (((0, 0), 0), ((0, 1), 5)):
            e = []
            for sign in (1, -1):
                eps = np.eye(3)
                eps[i, j] += sign * h / (1 if i == j else 2)
                eps[j, i] += 0 if i == j else sign * h / 2
                strained = atoms.copy()
                strained.set_cell(atoms.cell.array @ eps, scale_atoms=True)
                e.append(energy(strained)["energy"])
            fd = (e[0] - e[1]) / (2 * h) / vol
            assert abs(fd - ref["stress"][voigt]) < 2e-3 + 0.05 * abs(fd), (voigt, fd, ref["stress"][voigt])
        e = []
        for sign in (1, -1):
            moved = atoms.copy()
            moved.positions[0, 2] += sign * h
            e.append(energy(moved)["energy"])
        fd = -(e[0] - e[1]) / (2 * h)
        assert abs(fd - ref["forces"][0][2]) < 2e-2 + 0.02 * abs(fd), (fd, ref["forces"][0][2])


@needs_cp2k
def test_unconverged_scf_is_a_quarantined_failure_never_a_label(tmp_path):
    cand = _candidates(tmp_path / "cand.nc", [water_cell(), water_cell(shift=0.05)])
    with pytest.raises(DpeltError, match=r"2 of 2 labels failed"):
        label(cand, {"name": "cp2k", "kwargs": CHEAP | {"max_scf": 2}}, tmp_path / "out", max_failed_ratio=0.5)
    failures = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert [f["reason"] for f in failures] == ["SCF not converged"] * 2
    task = tmp_path / "out" / failures[0]["task_dir"]
    assert NOT_CONVERGED in (task / "cp2k.out").read_text()  # what CP2K itself printed
    assert not (tmp_path / "out" / "frames.nc").exists()


@needs_cp2k
def test_a_shell_that_dies_is_a_failed_label_with_the_reason(tmp_path):
    cand = _candidates(tmp_path / "cand.nc", [water_cell()])
    summary = label(cand, {"name": "cp2k", "kwargs": CHEAP | {"command": "sh -c 'exit 3'"}}, tmp_path / "out", max_failed_ratio=1.0)
    assert summary["failed"] == 1 and summary["labelled"] == 0
    (failure,) = json.loads((tmp_path / "out" / "failures.json").read_text())
    assert failure["reason"].startswith("calculator raised RuntimeError: cp2k_shell did not start (sh -c 'exit 3')"), failure
    assert descendants(os.getpid()) == []


@needs_cp2k
def test_a_hung_shell_is_killed_at_the_timeout_and_the_next_frame_gets_a_new_one(tmp_path):
    """A 1-s limit on a calculation that takes longer: failed ("timed out"), the shell and its
    children killed, no process left behind, and the step goes on."""
    cand = _candidates(tmp_path / "cand.nc", [water_cell(), water_cell(shift=0.05)])
    t = time.monotonic()
    kw = CHEAP | {"cutoff_Ry": 400, "basis_set": "DZVP-MOLOPT-SR-GTH"}  # several seconds per label
    summary = label(cand, {"name": "cp2k", "kwargs": kw}, tmp_path / "out", max_failed_ratio=1.0, timeout=1.0)
    assert time.monotonic() - t < 60
    assert summary["failed"] == 2
    reasons = [f["reason"] for f in json.loads((tmp_path / "out" / "failures.json").read_text())]
    assert all(r.startswith("timed out: no result after 1 s") for r in reasons), reasons
    assert descendants(os.getpid()) == []


@needs_cp2k
def test_a_tiny_loop_labelled_by_cp2k(tmp_path):
    """THE CI proof: one iteration of the whole workflow (init single points, holdout CP2K MD,
    train, explore, select, label) on 2 H2O in a 3.9 Å box with real CP2K labels, a minimal basis
    at 150 Ry. Labels carry PBE energies, forces and a virial; nothing failed."""
    import yaml
    from ase.io import write

    from pipeline.data.netcdf import read_frames
    from test_workflow import snakemake, workflow_dir

    rng = np.random.default_rng(0)
    box = ase.Atoms(cell=[3.9] * 3, pbc=True)
    for centre in ([1.0, 1.0, 1.0], [2.9, 2.9, 2.9]):
        w = molecule("H2O")
        w.rotate(rng.uniform(0, 360), "x")
        w.rotate(rng.uniform(0, 360), "z")
        w.translate(np.array(centre) - w.get_center_of_mass())
        box += w
    cfg = {
        "seed": 1,
        "type_map": ["O", "H"],
        "numb_models": 2,
        "max_iter": 1,
        "threads": {"train": 1, "explore": 1, "label": 1, "evaluate": 1},
        "init": {"structures": [{"name": "w2", "file": "w2.xyz"}], "perturb": {"count": 3, "atom_displacement": 0.05}},
        "holdout": {"frames": 2, "trj_freq": 1, "dt_fs": 0.5, "equilibration": 0},
        "train": {
            "model": {"descriptor": {"sel": [8, 16], "rcut": 3.5, "rcut_smth": 1.0, "neuron": [4, 8], "axis_neuron": 4, "type_one_side": True}, "fitting_net": {"neuron": [8, 8]}},
            "learning_rate": {"start_lr": 0.005, "stop_lr": 0.0005, "decay_steps": 10},
            "training": {"numb_steps": 30, "disp_freq": 10, "save_freq": 30},
        },
        "explore": {"dt_fs": 0.5, "stages": [{"temps": [300], "nsteps": 20, "trj_freq": 4, "max_iter": 1}]},
        "select": {"trust_lo": 0.0, "trust_hi": 1.0e6, "max_labels": 3},  # every explored frame is a candidate
        "label": {"oracle": {"name": "cp2k", "kwargs": CHEAP}, "timeout": 300},
    }
    run = workflow_dir(tmp_path / "run", cfg)
    write(run / "w2.xyz", box)
    snakemake(run, "--cores", "2", configfile="config/run.yaml", timeout=600)
    summary = json.loads((run / "iter/000/label/summary.json").read_text())
    # (a 30-step model may blow the MD up early: then fewer than max_labels candidates)
    assert summary["oracle"] == "cp2k" and summary["labelled"] == summary["total"] >= 1 and summary["failed"] == 0, summary
    assert json.loads((run / "iter/000/label/failures.json").read_text()) == []
    for path in ("iter/000/label/frames.nc", "data/init/frames.nc", "data/holdout/frames.nc"):
        (ds,) = read_frames(run / path)
        assert set(ds["oracle"].values) == {"cp2k"}, path
        e = ds["energy"].values / 2  # per molecule: PBE/GTH, about -17.2 Ha = -468 eV
        assert np.all((e > -480) & (e < -460)), (path, e)
        assert "virial" in ds and np.isfinite(ds["virial"].values).all(), path
    assert json.loads((run / "data/init/failures.json").read_text()) == []
    assert len(list((run / "iter/000/label/tasks").iterdir())) == summary["total"]


@needs_cp2k
def test_a_cancelled_label_job_stops_its_cp2k_shell(tmp_path):
    """SIGTERM to `dpelt label` (Snakemake or Slurm cancelling the job) used to leave cp2k_shell
    running, orphaned; now the session stops it, and the frame is neither failed nor counted as
    a death of the labeler."""
    import signal
    import subprocess
    import sys

    cand = _candidates(tmp_path / "cand.nc", [water_cell()])
    kw = json.dumps(CHEAP | {"cutoff_Ry": 400, "basis_set": "DZVP-MOLOPT-SR-GTH"})
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dpelt"), "label", str(cand), "-o", str(tmp_path / "out"), "--oracle", "cp2k", "--oracle-kwargs", kw])
    try:
        shells: list[int] = []
        deadline = time.monotonic() + 60
        while not shells and time.monotonic() < deadline:
            time.sleep(0.2)
            shells = [p for p in descendants(proc.pid) if "cp2k" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")]
        assert shells, "no cp2k_shell started"
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) != 0
    finally:
        proc.kill()
    deadline = time.monotonic() + 15
    while not all(_gone(p) for p in shells) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(_gone(p) for p in shells)
    (task,) = (tmp_path / "out" / "tasks").iterdir()
    assert not (task / "result.json").exists() and not (task / "started").exists()
