"""Labeling: oracles (EMT, xtb, PySCF, dotted paths), label checks, failure records, reuse, resume, CLI."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import xarray as xr
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.calculator import all_changes
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from pipeline.data.frames import frame_ids, make_frames
from pipeline.data.netcdf import read_frames, write_frames
from pipeline.errors import ConfigError, DataError, DpeltError
from pipeline.examples import emt_bulk_frames
from pipeline.label import check_elements, check_label, label, make_oracle, scf_converged
from pipeline.label.cli import add_label_parser

STEP = 0.01  # Å: frame k has atom 0 moved by k·STEP along x (see displaced_frames)


# ---------------------------------------------------------------- test calculators (by dotted path)


def _step_of(atoms: Atoms) -> int:
    return int(round(atoms.positions[0, 0] / STEP))


class CountingEMT(EMT):
    """EMT that counts its calculations (class-wide)."""

    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        CountingEMT.calls += 1
        super().calculate(atoms, properties, system_changes)


class BrokenEMT(EMT):
    """EMT whose label is broken in one way (``mode``) for the frames whose step is in ``on``."""

    def __init__(self, mode: str = "crash", on=(), **kwargs):
        self.mode, self.on = mode, set(on)
        super().__init__(**kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        atoms = atoms if atoms is not None else self.atoms
        bad = _step_of(atoms) in self.on
        if bad and self.mode == "crash":
            raise RuntimeError("boom: the oracle crashed")
        if bad and self.mode == "exit":  # some codes call sys.exit on a fatal SCF error
            raise SystemExit("scf gave up")
        if bad and self.mode == "interrupt":
            raise KeyboardInterrupt
        if bad and self.mode == "hang":  # an SCF loop that never ends
            while True:
                time.sleep(0.01)
        if bad and self.mode == "hang_swallow":  # a calculator whose loop catches every Exception
            while True:
                try:
                    time.sleep(0.01)
                except Exception:
                    pass
        if bad and self.mode in ("hang_child", "hang_run"):  # a file-based code (VASP, CP2K ...) that never returns
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            script = "echo $$ > child.pid; sleep 600 & echo $! > grandchild.pid; wait"
            if self.mode == "hang_run":  # as ASE's Vasp and its profiles run a code: subprocess.run / check_call
                subprocess.run(script, shell=True, cwd=self.directory, check=True)
            else:  # as ASE's older shell profile: Popen + wait
                subprocess.Popen(script, shell=True, cwd=self.directory).wait()
        super().calculate(atoms, properties, system_changes)
        if not bad:
            return
        forces = self.results["forces"].copy()
        if self.mode == "nan":
            forces[0, 0] = np.nan
        elif self.mode == "shape":
            forces = forces[:-1]
        elif self.mode == "absurd":
            forces[1] = [400.0, 0.0, 0.0]
        elif self.mode == "unconverged":
            self.results["converged"] = False
        self.results["forces"] = forces


class FileWritingEMT(EMT):
    """EMT that leaves a file in its working directory, like a file-based code would."""

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        Path(self.directory).mkdir(parents=True, exist_ok=True)
        (Path(self.directory) / "OUTPUT").write_text("done\n")
        super().calculate(atoms, properties, system_changes)


@pytest.fixture(autouse=True)
def _reset_counter():
    CountingEMT.calls = 0


def dotted(cls: type) -> str:
    return f"{__name__}.{cls.__name__}"


# ---------------------------------------------------------------- frames


def displaced_frames(n: int, symbol: str = "Cu") -> xr.Dataset:
    """``n`` frames of a 4-atom fcc cell, frame k with atom 0 moved by k·STEP Å along x (no labels)."""
    atoms = bulk(symbol, "fcc", a=3.61, cubic=True)
    coord = np.stack([atoms.positions + np.r_[[[k * STEP, 0.0, 0.0]], np.zeros((len(atoms) - 1, 3))] for k in range(n)])
    return make_frames(coord, atoms.cell.array, [0] * len(atoms), [symbol], source_task=[f"task{k % 2}" for k in range(n)], md_step=10 * np.arange(n), temperature_K=300.0)


def write_candidates(path: Path, ds: xr.Dataset) -> Path:
    write_frames(path, ds)
    return path


def emt_candidates(tmp_path: Path) -> Path:
    ds = emt_bulk_frames("Cu", repeat=(1, 1, 1), temperatures_K=(300.0, 900.0), frames_per_temperature=3, stride=3, seed=5)
    return write_candidates(tmp_path / "candidates.nc", ds.drop_vars(["energy", "force", "virial"]))


def direct(atoms: Atoms, calc) -> tuple[float, np.ndarray, np.ndarray | None]:
    atoms = atoms.copy()
    atoms.calc = calc
    e, f = atoms.get_potential_energy(), atoms.get_forces()
    v = -atoms.get_stress(voigt=False) * atoms.get_volume() if atoms.pbc.any() else None
    return e, f, v


def atoms_of(ds, f: int) -> Atoms:
    tm = [str(s) for s in ds["type_map"].values]
    return Atoms([tm[t] for t in ds["atom_type"].values], positions=ds["coord"].values[f], cell=ds["cell"].values[f], pbc=ds["pbc"].values.astype(bool))


# ---------------------------------------------------------------- EMT and the step's files


def test_emt_labels_equal_direct_computation(tmp_path):
    cand = emt_candidates(tmp_path)
    summary = label(cand, {"name": "emt"}, tmp_path / "label")
    (ds,) = read_frames(tmp_path / "label" / "frames.nc", require_labels=True)
    (c,) = read_frames(cand)
    assert ds.sizes["frame"] == c.sizes["frame"] == 6
    for f in range(6):
        e, F, V = direct(atoms_of(c, f), EMT())
        assert ds["energy"].values[f] == e
        np.testing.assert_array_equal(ds["force"].values[f], F)
        np.testing.assert_allclose(ds["virial"].values[f], V, rtol=0, atol=1e-12)
    for name in ("source_task", "md_step", "temperature_K"):
        np.testing.assert_array_equal(ds[name].values, c[name].values)
    assert set(ds["oracle"].values.tolist()) == {"emt"}
    np.testing.assert_array_equal(frame_ids(ds), frame_ids(c))
    assert json.loads((tmp_path / "label" / "failures.json").read_text()) == []
    assert summary == json.loads((tmp_path / "label" / "summary.json").read_text())
    assert (summary["total"], summary["labelled"], summary["reused"], summary["failed"], summary["oracle"]) == (6, 6, 0, 0, "emt")
    for fid in frame_ids(c):
        assert json.loads((tmp_path / "label" / "tasks" / fid / "result.json").read_text())["status"] == "ok"


def test_dotted_path_oracle_and_task_directory(tmp_path):
    cand = write_candidates(tmp_path / "c.nc", displaced_frames(2))
    label(cand, {"name": "ase.calculators.emt.EMT"}, tmp_path / "a")
    label(cand, {"name": dotted(FileWritingEMT)}, tmp_path / "b")
    (a,) = read_frames(tmp_path / "a" / "frames.nc")
    (b,) = read_frames(tmp_path / "b" / "frames.nc")
    np.testing.assert_array_equal(a["energy"].values, b["energy"].values)
    assert a["oracle"].values[0] == "ase.calculators.emt.EMT"
    for fid in frame_ids(a):  # a file-based calculator works in its task directory
        assert (tmp_path / "b" / "tasks" / fid / "OUTPUT").exists()


def test_zero_candidates_give_empty_outputs(tmp_path):
    cand = tmp_path / "empty.nc"
    write_frames(cand, [])
    summary = label(cand, {"name": "emt"}, tmp_path / "label")
    with h5py.File(tmp_path / "label" / "frames.nc", "r") as fh:  # the empty frames file of write_frames([])
        assert np.asarray(fh.attrs["systems"]).ravel().tolist() == [0] and "coord" not in fh and not list(fh)
    assert json.loads((tmp_path / "label" / "failures.json").read_text()) == []
    assert summary["total"] == summary["labelled"] == summary["failed"] == 0


# ---------------------------------------------------------------- validation


def test_check_label_reasons():
    ok = {"energy": -1.0, "forces": np.zeros((2, 3)), "stress": np.zeros(6)}
    assert check_label(ok, 2, periodic=True) == ""
    assert check_label(ok | {"stress": np.zeros((3, 3))}, 2, periodic=True) == ""
    assert check_label(ok | {"stress": np.zeros(4)}, 2, periodic=False) == ""  # molecules: stress not used
    assert "non-finite energy" in check_label(ok | {"energy": np.inf}, 2, True)
    assert "not a scalar" in check_label(ok | {"energy": [1.0, 2.0]}, 2, True)
    assert check_label({"forces": np.zeros((2, 3))}, 2, True) == "no energy"
    assert "shape (3, 3), expected (2, 3)" in check_label(ok | {"forces": np.zeros((3, 3))}, 2, True)
    assert "non-finite force" in check_label(ok | {"forces": np.array([[0, 0, 0], [0, np.nan, 0]])}, 2, True)
    assert "stress has shape" in check_label(ok | {"stress": np.zeros(4)}, 2, True)
    assert "non-finite stress" in check_label(ok | {"stress": np.full(6, np.nan)}, 2, True)
    assert "absurd forces" in check_label(ok | {"forces": np.array([[0, 0, 0], [30.0, 30.0, 30.0]])}, 2, True)
    assert check_label(ok | {"forces": np.array([[0, 0, 0], [30.0, 30.0, 30.0]])}, 2, True, max_force=60.0) == ""
    assert check_label(ok | {"converged": False}, 2, True) == "SCF not converged"
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1.0, forces=np.full((2, 3), np.nan))
    assert "non-finite force" in check_label(atoms, 2, periodic=False)


def test_scf_converged_is_read_defensively():
    class Vasp:  # read_convergence as in ase.calculators.vasp.Vasp
        results: dict = {}

        def __init__(self, value):
            self.value = value

        def read_convergence(self):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    assert scf_converged(Vasp(False)) is False
    assert scf_converged(Vasp(True)) is True
    assert scf_converged(Vasp(FileNotFoundError("OUTCAR"))) is None
    assert scf_converged(EMT()) is None
    calc = EMT()
    calc.results["converged"] = False
    assert scf_converged(calc) is False


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "mode, reason",
    [
        ("crash", "calculator raised RuntimeError: boom"),
        ("nan", "non-finite force"),
        ("shape", "forces have shape (3, 3), expected (4, 3)"),
        ("absurd", "absurd forces"),
        ("unconverged", "SCF not converged"),
        ("exit", "calculator raised SystemExit: scf gave up"),
    ],
)
def test_failed_labels_are_quarantined(tmp_path, mode, reason):
    ds = displaced_frames(10)
    cand = write_candidates(tmp_path / "c.nc", ds)
    ids = frame_ids(ds)
    out = tmp_path / "one"
    s = label(cand, {"name": dotted(BrokenEMT), "kwargs": {"mode": mode, "on": [3]}}, out, max_failed_ratio=0.1)
    assert (s["failed"], s["labelled"]) == (1, 9)
    (fail,) = json.loads((out / "failures.json").read_text())
    assert fail["frame_id"] == ids[3] and reason in fail["reason"]
    assert (fail["source_task"], fail["md_step"]) == ("task1", 30)
    (lab,) = read_frames(out / "frames.nc", require_labels=True)
    assert ids[3] not in frame_ids(lab) and lab.sizes["frame"] == 9

    out = tmp_path / "two"  # 2 of 10 failed > 0.1: the step fails, but keeps everything it learnt
    with pytest.raises(DpeltError, match=r"2 of 10 labels failed.*failures\.json"):
        label(cand, {"name": dotted(BrokenEMT), "kwargs": {"mode": mode, "on": [3, 7]}}, out, max_failed_ratio=0.1)
    assert [f["frame_id"] for f in json.loads((out / "failures.json").read_text())] == [ids[3], ids[7]]
    assert not (out / "frames.nc").exists()
    assert all((out / "tasks" / fid / "result.json").exists() for fid in ids)
    s = label(cand, {"name": dotted(BrokenEMT), "kwargs": {"mode": mode, "on": [3, 7]}}, out, max_failed_ratio=0.25)
    assert (s["failed"], s["labelled"], s["computed"], s["cached"]) == (2, 8, 0, 10)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


@pytest.mark.parametrize("mode", ["hang", "hang_swallow", "hang_child", "hang_run"])
def test_a_label_that_hangs_is_stopped_at_the_timeout(tmp_path, mode):
    """label.timeout: the frame is recorded as failed ("timed out"), the others are labelled, and a
    file-based code's processes (the shell and what it started) are killed, not left running."""
    ds = displaced_frames(4)
    cand = write_candidates(tmp_path / "c.nc", ds)
    ids = frame_ids(ds)
    bystander = subprocess.Popen(["sleep", "600"])  # a process that was running before: spared
    try:
        t = time.monotonic()
        s = label(cand, {"name": dotted(BrokenEMT), "kwargs": {"mode": mode, "on": [2]}}, tmp_path / "out", max_failed_ratio=0.5, timeout=1.0)
        assert time.monotonic() - t < 20
        assert (s["failed"], s["labelled"]) == (1, 3)
        (fail,) = json.loads((tmp_path / "out" / "failures.json").read_text())
        assert fail["frame_id"] == ids[2] and fail["reason"] == "timed out: no result after 1 s (label.timeout)", fail
        if mode in ("hang_child", "hang_run"):
            task = tmp_path / "out" / "tasks" / ids[2]
            pids = [int((task / name).read_text()) for name in ("child.pid", "grandchild.pid")]
            assert all(_gone(p) for p in pids)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    with pytest.raises(ConfigError, match=r"\[timeout\]: must be a number of seconds > 0"):
        label(cand, "emt", tmp_path / "bad", timeout=-1)


def test_time_limit_leaves_a_finished_calculation_alone():
    import signal

    from pipeline.label.timeout import LabelTimeout, time_limit

    before = signal.getsignal(signal.SIGALRM)
    with time_limit(5.0):
        x = sum(range(1000))
    assert x == 499500 and signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    with time_limit(None):
        time.sleep(0.05)
    with pytest.raises(LabelTimeout):
        with time_limit(0.2):
            time.sleep(5)
    assert signal.getsignal(signal.SIGALRM) is before


def test_cli_label_timeout_is_an_explicit_option(monkeypatch, capsys):
    """--timeout takes seconds or 'none' (what the workflow passes for label.timeout); no
    environment variable steers it."""
    from pipeline.cli import build_parser

    monkeypatch.setenv("DPELT_LABEL_TIMEOUT", "90")
    p = build_parser()
    for cmd in (["label", "c.nc", "-o", "out"], ["init", "--spec", "{}", "-o", "x.nc", "--seed", "1"], ["holdout", "--spec", "{}", "-o", "x.nc", "--seed", "1"]):
        assert p.parse_args(cmd).timeout is None
        assert p.parse_args(cmd + ["--timeout", "none"]).timeout is None
        assert p.parse_args(cmd + ["--timeout", "0"]).timeout is None  # the workflow's "no limit"
        assert p.parse_args(cmd + ["--timeout", "600"]).timeout == 600.0
        for bad in ("soon", "-1"):
            with pytest.raises(SystemExit):
                p.parse_args(cmd + ["--timeout", bad])
    assert "expected seconds or 'none', got 'soon'" in capsys.readouterr().err


# ---------------------------------------------------------------- never label twice


def test_known_frames_are_reused_not_recomputed(tmp_path):
    ds = displaced_frames(5)
    first = write_candidates(tmp_path / "first.nc", ds.isel(frame=[0, 1, 2]))
    label(first, {"name": dotted(CountingEMT)}, tmp_path / "it0")
    assert CountingEMT.calls == 3
    (known,) = read_frames(tmp_path / "it0" / "frames.nc")

    CountingEMT.calls = 0
    cand = write_candidates(tmp_path / "cand.nc", ds.isel(frame=[4, 1, 3, 0, 4]))  # two known, one duplicate
    s = label(cand, {"name": dotted(CountingEMT)}, tmp_path / "it1", known=[tmp_path / "it0" / "frames.nc"])
    assert CountingEMT.calls == 2
    assert (s["total"], s["reused"], s["labelled"], s["duplicates"], s["failed"]) == (5, 2, 2, 1, 0)
    (out,) = read_frames(tmp_path / "it1" / "frames.nc")
    np.testing.assert_array_equal(frame_ids(out), frame_ids(ds.isel(frame=[4, 1, 3, 0])))
    np.testing.assert_array_equal(out["energy"].values[[1, 3]], known["energy"].values[[1, 0]])
    assert not (tmp_path / "it1" / "tasks" / frame_ids(ds)[1]).exists()

    # a label from another oracle is not reused: mixing levels of theory would corrupt the data
    CountingEMT.calls = 0
    s = label(cand, {"name": "emt"}, tmp_path / "it1-emt", known=[tmp_path / "it0" / "frames.nc"])
    assert (s["reused"], s["labelled"]) == (0, 4)


def test_rerun_after_kill_reuses_finished_tasks(tmp_path):
    ds = displaced_frames(4)
    cand = write_candidates(tmp_path / "c.nc", ds)
    out = tmp_path / "label"
    label(cand, {"name": dotted(CountingEMT)}, out)
    assert CountingEMT.calls == 4
    (before,) = read_frames(out / "frames.nc")

    # killed before frames.nc was written, one task unfinished (a stray temp file, no result)
    (out / "frames.nc").unlink()
    (out / "summary.json").unlink()
    unfinished = out / "tasks" / frame_ids(ds)[2]
    (unfinished / "result.json").unlink()
    (unfinished / ".result.json.tmp.json").write_text('{"status": "o')
    CountingEMT.calls = 0
    s = label(cand, {"name": dotted(CountingEMT)}, out)
    assert CountingEMT.calls == 1
    assert (s["computed"], s["cached"], s["labelled"]) == (1, 3, 4)
    (after,) = read_frames(out / "frames.nc")
    for name in ("coord", "energy", "force", "virial"):
        np.testing.assert_array_equal(after[name].values, before[name].values)

    # a different oracle configuration does not reuse the old results, nor overwrite them:
    # they are set aside, and switching back finds them again
    CountingEMT.calls = 0
    label(cand, {"name": dotted(CountingEMT), "kwargs": {"asap_cutoff": True}}, out)
    assert CountingEMT.calls == 4
    assert len(list((out / "tasks" / frame_ids(ds)[0]).glob("result.*.json"))) == 1
    CountingEMT.calls = 0
    s = label(cand, {"name": dotted(CountingEMT)}, out)
    assert CountingEMT.calls == 0 and s["cached"] == 4
    (back,) = read_frames(out / "frames.nc")
    np.testing.assert_array_equal(back["energy"].values, before["energy"].values)


def test_a_frame_that_kills_the_labeler_is_recorded_as_failed(tmp_path):
    """A segfault in native code leaves no result: the first death is retried (a node failure),
    a second on the same frame records it as failed instead of crashing every rerun."""
    ds = displaced_frames(4)
    cand = write_candidates(tmp_path / "c.nc", ds)
    out = tmp_path / "label"
    ids = frame_ids(ds)
    for fid, deaths in ((ids[1], 1), (ids[2], 2)):  # as a process killed inside the task leaves it
        (out / "tasks" / fid).mkdir(parents=True)
        (out / "tasks" / fid / "started").write_text(f"{deaths}\n")
    CountingEMT.calls = 0
    s = label(cand, {"name": dotted(CountingEMT)}, out, max_failed_ratio=0.3)
    assert CountingEMT.calls == 3 and (s["failed"], s["labelled"]) == (1, 3)
    (fail,) = json.loads((out / "failures.json").read_text())
    assert fail["frame_id"] == ids[2] and "died 2 times" in fail["reason"]
    assert not any((out / "tasks").glob("*/started"))  # every finished task cleared its marker

    # a configuration error or Ctrl-C inside the task is not a death: the count is restored
    from pipeline.data.ase_io import frames_to_atoms
    from pipeline.label.run import run_task

    task = tmp_path / "t"
    task.mkdir()
    (task / "started").write_text("1\n")
    oracle = make_oracle({"name": dotted(BrokenEMT), "kwargs": {"mode": "interrupt", "on": [0]}})
    with pytest.raises(KeyboardInterrupt):
        run_task(oracle, frames_to_atoms(ds.isel(frame=[0]))[0], task, ids[0], 50.0)
    assert (task / "started").read_text().strip() == "1"


# ---------------------------------------------------------------- configuration errors


def test_unknown_oracle_and_unsupported_elements(tmp_path):
    with pytest.raises(ConfigError, match=r"\[oracle\.name\].*unknown oracle 'gaussian16'"):
        make_oracle({"name": "gaussian16"})
    with pytest.raises(ConfigError, match=r"\[oracle\.name\].*nosuchpkg\.calc"):
        make_oracle({"name": "nosuchpkg.calc.Calculator"})
    with pytest.raises(ConfigError, match=r"\[oracle\.name\].*no attribute 'Vsap'"):
        make_oracle({"name": "ase.calculators.emt.Vsap"})
    with pytest.raises(ConfigError, match=r"\[oracle\]"):
        make_oracle({"name": "emt", "kwarg": {}})
    with pytest.raises(ConfigError, match=r"\[oracle\.name\].*element Fe"):
        check_elements({"name": "emt"}, ["Cu", "Fe"])
    with pytest.raises(ConfigError, match=r"element U\b"):
        check_elements({"name": "xtb"}, ["U", "O"])
    check_elements({"name": "emt"}, ["Cu", "O", "H"])
    check_elements({"name": "ase.calculators.vasp.Vasp"}, ["Fe", "U"])  # not checked in advance

    cand = write_candidates(tmp_path / "fe.nc", displaced_frames(2, "Fe"))
    with pytest.raises(ConfigError, match="element Fe"):
        label(cand, {"name": "emt"}, tmp_path / "label")
    assert not (tmp_path / "label").exists()  # refused before any work
    with pytest.raises(ConfigError, match=r"max_failed_ratio"):
        label(cand, {"name": "emt"}, tmp_path / "label", max_failed_ratio=1.5)
    with pytest.raises(DataError, match="energy"):  # a 'known' file must carry labels
        label(cand, {"name": "ase.calculators.emt.EMT"}, tmp_path / "label", known=[cand])


# ---------------------------------------------------------------- CLI


def test_cli_label(tmp_path, capsys):
    cand = write_candidates(tmp_path / "c.nc", displaced_frames(3))
    parser = argparse.ArgumentParser(prog="dpelt")
    add_label_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["label", str(cand), "-o", str(tmp_path / "a"), "--oracle", "emt"])
    args.func(args)
    line = capsys.readouterr().out.strip()
    assert line.startswith("emt: 3 candidates, 3 labelled") and "0 failed" in line

    args = parser.parse_args(
        ["label", str(cand), "-o", str(tmp_path / "b"), "--oracle", dotted(CountingEMT), "--oracle-kwargs", '{"asap_cutoff": false}',
         "--max-failed-ratio", "0", "--max-force", "20", "--known", str(tmp_path / "a" / "frames.nc")]
    )
    args.func(args)
    assert CountingEMT.calls == 3  # the known labels came from 'emt', a different oracle name
    assert "3 labelled" in capsys.readouterr().out
    args = parser.parse_args(["label", str(cand), "-o", str(tmp_path / "c"), "--oracle-kwargs", "[1, 2]"])
    with pytest.raises(ConfigError, match="--oracle-kwargs"):
        args.func(args)


# ---------------------------------------------------------------- xtb (tblite)


def test_xtb_periodic_with_stress_and_molecule(tmp_path):
    pytest.importorskip("tblite.ase", reason="tblite not installed (pip install 'dpelt[xtb]')")
    from tblite.ase import TBLite

    from pipeline.label.oracles import omp_threads

    def xtb(**kw):
        return TBLite(method="GFN2-xTB", verbosity=0, **kw)

    box = Atoms("H2", positions=[[1.0, 1.2, 1.1], [1.76, 1.25, 1.12]], cell=np.diag([5.0, 5.2, 5.4]), pbc=True)
    coord = np.stack([box.positions, box.positions + [[0.03, -0.02, 0.01], [0.0, 0.0, 0.0]]])
    per = make_frames(coord, box.cell.array, [0, 0], ["H"], source_task="h2-box")
    cand = write_candidates(tmp_path / "h2.nc", per)
    s = label(cand, {"name": "xtb"}, tmp_path / "h2")
    assert s["labelled"] == 2 and s["failed"] == 0
    (ds,) = read_frames(tmp_path / "h2" / "frames.nc", require_labels=True)
    assert "virial" in ds and set(ds["oracle"].values.tolist()) == {"xtb"}
    with omp_threads(1):
        for f in range(2):
            e, F, V = direct(atoms_of(per, f), xtb())
            assert ds["energy"].values[f] == pytest.approx(e, abs=1e-8)
            np.testing.assert_allclose(ds["force"].values[f], F, atol=1e-8)
            np.testing.assert_allclose(ds["virial"].values[f], V, atol=1e-8)
        # the virial is -dE/dε: central difference on one diagonal and one shear strain
        atoms, h = atoms_of(per, 1), 1e-4
        for i, j in ((0, 0), (0, 1)):
            energies = []
            for sign in (1, -1):
                a = atoms.copy()
                strain = np.eye(3)
                strain[i, j] += sign * h / (1 if i == j else 2)
                strain[j, i] += 0 if i == j else sign * h / 2
                a.set_cell(a.cell.array @ strain, scale_atoms=True)
                a.calc = xtb(accuracy=0.01)
                energies.append(a.get_potential_energy())
            assert ds["virial"].values[1][i, j] == pytest.approx(-(energies[0] - energies[1]) / (2 * h), abs=1e-4)

    h2o = molecule("H2O")
    mol = make_frames(h2o.positions[None], np.zeros((3, 3)), [0, 1, 1], ["O", "H"], pbc=(False, False, False))
    cand = write_candidates(tmp_path / "h2o.nc", mol)
    label(cand, {"name": "xtb", "kwargs": {"accuracy": 0.1}}, tmp_path / "h2o")
    (ds,) = read_frames(tmp_path / "h2o" / "frames.nc", require_labels=True)
    assert "virial" not in ds
    with omp_threads(1):
        e, F, _ = direct(h2o, xtb(accuracy=0.1))
    assert ds["energy"].values[0] == pytest.approx(e, abs=1e-8)
    np.testing.assert_allclose(ds["force"].values[0], F, atol=1e-8)
    with pytest.raises(ConfigError, match="oracle.kwargs"):
        make_oracle({"name": "xtb", "kwargs": {"methdo": "GFN1-xTB"}})


# ---------------------------------------------------------------- PySCF


def test_pyscf_water_energy_forces_and_convergence(tmp_path):
    pytest.importorskip("pyscf", reason="PySCF not installed (pip install 'dpelt[pyscf]')")
    from pipeline.label.pyscf_calc import PySCFCalculator

    kw = {"basis": "sto-3g", "xc": "pbe"}
    water = molecule("H2O")
    water.positions[1] += [0.03, 0.0, -0.02]  # off equilibrium: forces worth checking
    mol = make_frames(water.positions[None], np.zeros((3, 3)), [0, 1, 1], ["O", "H"], pbc=(False, False, False), source_task="water")
    cand = write_candidates(tmp_path / "w.nc", mol)
    s = label(cand, {"name": "pyscf", "kwargs": kw}, tmp_path / "w")
    assert (s["labelled"], s["failed"], s["oracle"]) == (1, 0, "pyscf")
    (ds,) = read_frames(tmp_path / "w" / "frames.nc", require_labels=True)
    assert ds["oracle"].values[0] == "pyscf"

    calc = PySCFCalculator(**kw)
    e, F, _ = direct(water, calc)
    assert calc.converged is True and calc.results["converged"] is True
    assert ds["energy"].values[0] == e  # one thread: bit-reproducible
    np.testing.assert_array_equal(ds["force"].values[0], F)
    assert -2100 < e < -2000  # about -76 Hartree, in eV
    h = 1e-3  # forces are -dE/dx: central difference on one coordinate of one H
    ep, em = [direct(_moved(water, 1, 0, d), PySCFCalculator(**kw))[0] for d in (h, -h)]
    assert F[1, 0] == pytest.approx(-(ep - em) / (2 * h), abs=2e-5)

    # an SCF stopped after one cycle is not converged: quarantined
    s = label(cand, {"name": "pyscf", "kwargs": kw | {"max_cycle": 1}}, tmp_path / "nc", max_failed_ratio=1.0)
    assert s["failed"] == 1
    assert json.loads((tmp_path / "nc" / "failures.json").read_text())[0]["reason"] == "SCF not converged"

    # periodic systems are refused before any work
    cell = write_candidates(tmp_path / "p.nc", make_frames(water.positions[None], np.eye(3) * 8.0, [0, 1, 1], ["O", "H"]))
    with pytest.raises(ConfigError, match=r"\[oracle\.name\].*molecular"):
        label(cell, {"name": "pyscf", "kwargs": kw}, tmp_path / "p")
    with pytest.raises(ConfigError, match="oracle.kwargs"):
        make_oracle({"name": "pyscf", "kwargs": {"bassis": "sto-3g"}})


def _moved(atoms: Atoms, i: int, axis: int, d: float) -> Atoms:
    a = atoms.copy()
    a.positions[i, axis] += d
    return a


@pytest.mark.parametrize("oracle, reason", [("bad_oracles.UnconvergedEMT", "SCF not converged"), ("bad_oracles.CrashingEMT", "RuntimeError: segfault in SCF")])
def test_oracle_md_of_init_and_holdout_keeps_only_good_labels(tmp_path, oracle, reason):
    """Oracle MD (init, holdout) used to keep unconverged labels and to crash with a traceback."""
    from pipeline.init_data import OracleMDSpec, make_holdout, parse_init_spec

    spec = parse_init_spec({"structures": [{"name": "cu", "lattice": "fcc", "elements": ["Cu"], "a": 3.61, "repeat": [2, 2, 2]}], "md": {"nsteps": 40, "trj_freq": 5}})
    summary = make_holdout(spec, ["cu"], [300.0], 8, OracleMDSpec(trj_freq=5), {"name": oracle, "kwargs": {"fail_after": 12}}, ["Cu"], tmp_path / "h.nc", 1, tmp_path / "work")
    (failure,) = summary["failures"]
    assert reason in failure["reason"] and failure["source_task"] == "holdout:cu:T300" and failure["md_step"] == 11, failure
    assert json.loads((tmp_path / "failures.json").read_text()) == [failure]
    # the frames labelled before the failure are kept, none after it
    assert summary["systems"][0]["frames"] == 2


def test_init_and_holdout_stop_a_hung_calculation_at_the_timeout(tmp_path):
    """label.timeout also bounds the oracle work of init (single points, oracle MD) and holdout:
    the hung calculation is a failed label, what came before is kept, and the code's processes,
    including a server its first MD step started, are killed; a process running before is spared."""
    from pipeline.init_data import OracleMDSpec, make_holdout, make_init, parse_init_spec

    cu = {"name": "cu", "lattice": "fcc", "elements": ["Cu"], "a": 3.61, "repeat": [2, 2, 2]}
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        t = time.monotonic()
        spec = parse_init_spec({"structures": [cu]})
        oracle = {"name": "bad_oracles.HangingEMT", "kwargs": {"fail_after": 12, "server": True}}
        summary = make_holdout(spec, ["cu"], [300.0], 8, OracleMDSpec(trj_freq=5), oracle, ["Cu"], tmp_path / "h.nc", 1, tmp_path / "h", timeout=1.0)
        assert time.monotonic() - t < 20
        (failure,) = summary["failures"]
        assert failure["source_task"] == "holdout:cu:T300" and failure["reason"].startswith("timed out: no result after 1 s (label.timeout)"), failure
        assert summary["systems"][0]["frames"] == 2 and summary["timeout_s"] == 1.0  # the frames before the hang are kept
        task = tmp_path / "h" / "cu" / "T300"
        assert all(_gone(int((task / step / name).read_text())) for step, name in (("step.000001", "server.pid"), ("step.000012", "hang.pid")))

        spec = parse_init_spec({"structures": [cu], "perturb": {"count": 2}})
        oracle = {"name": "bad_oracles.HangingEMT", "kwargs": {"hang_in": "sp.00001"}}
        summary = make_init(spec, oracle, ["Cu"], tmp_path / "init.nc", 1, tmp_path / "i", timeout=1.0)
        (failure,) = summary["failures"]
        assert failure["source_task"].endswith("#1") and failure["reason"] == "timed out: no result after 1 s (label.timeout)", failure
        assert summary["systems"][0]["frames"] == 2
        assert _gone(int((tmp_path / "i" / "cu" / "scale0" / "sp.00001" / "hang.pid").read_text()))
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    with pytest.raises(ConfigError, match=r"\[label\.timeout\]: must be a number of seconds > 0"):
        make_init(spec, {"name": "emt"}, ["Cu"], tmp_path / "bad.nc", 1, tmp_path / "b", timeout=0)
    assert not (tmp_path / "b").exists()


def test_init_of_a_slab_mixes_single_points_and_oracle_md(tmp_path, monkeypatch):
    """Single points and oracle MD label a partly periodic structure the same way (stress for
    any periodic direction), so their frames form one system (was: a partial-virial error after
    all the oracle work)."""
    from ase.build import fcc111
    from ase.io import write

    from pipeline.init_data import make_init, parse_init_spec

    monkeypatch.chdir(tmp_path)
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    assert list(slab.pbc) == [True, True, False]
    write("slab.xyz", slab)
    spec = parse_init_spec({"structures": [{"name": "slab", "file": "slab.xyz"}], "perturb": {"count": 1}, "md": {"nsteps": 10, "trj_freq": 5}})
    summary = make_init(spec, {"name": "emt"}, ["Cu"], tmp_path / "init.nc", 1, tmp_path / "work")
    assert summary["failures"] == [] and summary["systems"][0]["frames"] == 4  # 2 single points + 2 MD frames
    (ds,) = read_frames(tmp_path / "init.nc")
    assert "virial" in ds and np.isfinite(ds["virial"].values).all()  # every frame carries it, none dropped


def test_holdout_that_keeps_no_frame_is_an_error(tmp_path):
    from pipeline.init_data import OracleMDSpec, make_holdout, parse_init_spec

    spec = parse_init_spec({"structures": [{"name": "cu", "lattice": "fcc", "elements": ["Cu"], "a": 3.61, "repeat": [2, 2, 2]}]})
    with pytest.raises(DataError, match=r"h\.nc \[label\.oracle\]: oracle MD for the held-out frames of 'cu' at 300 K kept no frame: .*segfault"):
        make_holdout(spec, ["cu"], [300.0], 3, OracleMDSpec(trj_freq=5), {"name": "bad_oracles.CrashingEMT", "kwargs": {"fail_after": 1}}, ["Cu"], tmp_path / "h.nc", 1, tmp_path / "w")
    assert not (tmp_path / "h.nc").exists()


def test_init_scale_that_squeezes_atoms_is_refused_before_labelling(tmp_path):
    from pipeline.init_data import make_init, parse_init_spec

    spec = parse_init_spec({"structures": [{"name": "cu", "lattice": "fcc", "elements": ["Cu"], "a": 3.61}], "scale": [1.0, 0.1]})
    CountingEMT.calls = 0
    with pytest.raises(ConfigError, match=r"\[init\.scale\[1\]\]: scale 0\.1 puts atoms of 'cu' 0\.255 Å apart"):
        make_init(spec, {"name": dotted(CountingEMT)}, ["Cu"], tmp_path / "init.nc", 1, tmp_path / "work")
    assert CountingEMT.calls == 0 and not (tmp_path / "init.nc").exists()


def test_init_and_holdout_label_through_the_label_steps_tasks_and_reuse_them(tmp_path):
    """init's single points and the init/holdout oracle MD are labeling tasks like the label
    step's: a rerun recomputes nothing and gives the same bits; a task directory holding the
    result of another structure (another seed) is not taken for this one."""
    from pipeline.init_data import OracleMDSpec, make_holdout, make_init, parse_init_spec

    spec = parse_init_spec({"structures": [{"name": "cu", "lattice": "fcc", "elements": ["Cu"], "a": 3.61}], "perturb": {"count": 2}, "md": {"nsteps": 10, "trj_freq": 5}})
    oracle = {"name": dotted(CountingEMT)}
    CountingEMT.calls = 0
    make_init(spec, oracle, ["Cu"], tmp_path / "a" / "init.nc", 1, tmp_path / "work")
    first = CountingEMT.calls
    assert first == 3 + 11  # 3 single points, 11 MD calculations (steps 0-10)
    assert len(list((tmp_path / "work" / "cu" / "md0").glob("step.*/result.json"))) == 11
    make_init(spec, oracle, ["Cu"], tmp_path / "b" / "init.nc", 1, tmp_path / "work")
    assert CountingEMT.calls == first  # every label came from its finished task
    assert (tmp_path / "a" / "init.nc").read_bytes() == (tmp_path / "b" / "init.nc").read_bytes()
    assert json.loads((tmp_path / "b" / "failures.json").read_text()) == []
    make_init(spec, oracle, ["Cu"], tmp_path / "c" / "init.nc", 2, tmp_path / "work")  # another seed: other structures
    assert CountingEMT.calls == 2 * first - 2  # all anew but the unperturbed single point and MD step 0 (same structures)
    CountingEMT.calls = 0
    make_holdout(spec, ["cu"], [300.0], 2, OracleMDSpec(trj_freq=5), oracle, ["Cu"], tmp_path / "h1.nc", 1, tmp_path / "hw")
    n = CountingEMT.calls
    make_holdout(spec, ["cu"], [300.0], 2, OracleMDSpec(trj_freq=5), oracle, ["Cu"], tmp_path / "h2.nc", 1, tmp_path / "hw")
    assert n > 0 and CountingEMT.calls == n
    (a,), (b,) = read_frames(tmp_path / "h1.nc"), read_frames(tmp_path / "h2.nc")
    assert np.array_equal(a["force"].values, b["force"].values) and np.array_equal(a["coord"].values, b["coord"].values)
