"""Shared fixtures: tiny models, random periodic systems, the shared water data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.model.config import parse_model_config
from pipeline.model.deeppot import DeepPot

torch.set_num_threads(int(os.environ.get("DPELT_TEST_THREADS", "2")))

WATER = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "water"


@pytest.fixture
def water_dir() -> Path:
    """DeePMD-kit's water example data (../shared/data/water), or skip."""
    if not (WATER / "data_0" / "type.raw").exists():
        pytest.skip(f"shared water data not found at {WATER} (it lives beside the checkout in ../shared)")
    return WATER


def tiny_model_config(type_one_side: bool = False, precision: str = "float64", sel=(24, 24), rcut: float = 4.0, rcut_smth: float = 1.5, **descr):
    d = {"sel": list(sel), "rcut": rcut, "rcut_smth": rcut_smth, "neuron": [4, 8, 16], "axis_neuron": 4, "type_one_side": type_one_side, "precision": precision, "seed": 3} | descr
    return parse_model_config({"type_map": ["A", "B"], "descriptor": d, "fitting_net": {"neuron": [16, 16], "precision": precision, "seed": 4}})


def randomize_stats(model: DeepPot, seed: int = 0) -> DeepPot:
    """Give the statistics non-trivial values so tests exercise normalisation and bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = model.descriptor
        for ti in range(d.ntypes):
            for tj in range(d.ntypes):
                sl = slice(d.sec[tj], d.sec[tj + 1])
                d.davg[ti, sl, 0] = 0.2 + 0.1 * torch.rand((), generator=g)
                d.dstd[ti, sl, 0] = 0.1 + 0.1 * torch.rand((), generator=g)
                d.dstd[ti, sl, 1:] = 0.05 + 0.1 * torch.rand((), generator=g)
        model.fitting.bias_atom_e.copy_(torch.tensor([-1.5, -2.5]))
    return model


@pytest.fixture
def tiny_model() -> DeepPot:
    return randomize_stats(DeepPot(tiny_model_config()))


def random_system(n: int = 12, seed: int = 0, cell_scale: float = 5.0, triclinic: bool = True):
    """Random periodic two-type system that keeps atoms apart (min distance ~1 Å)."""
    rng = np.random.default_rng(seed)
    cell = np.eye(3) * cell_scale
    if triclinic:
        cell = cell + np.array([[0.0, 0.0, 0.0], [0.8, 0.0, 0.0], [0.4, -0.6, 0.0]])
    frac = []
    while len(frac) < n:
        f = rng.random(3)
        ok = True
        for p in frac:
            d = (f - p) - np.round(f - p)
            if np.linalg.norm(d @ cell) < 1.1:
                ok = False
                break
        if ok:
            frac.append(f)
    pos = np.array(frac) @ cell
    atype = rng.integers(0, 2, n)
    atype[:2] = [0, 1]
    return pos, cell, atype


def run_model(model: DeepPot, pos, cell, atype, pbc=(True, True, True), counts_full: bool = False, pairs: bool = True) -> dict:
    """Energy (eV), forces (eV/Å), virial (eV), atomic energies for one frame, as numpy.

    ``pairs``: pass the neighbour list's reverse-pair slots (same-type pairs embedded once),
    as every caller in the package does."""
    from pipeline.model.inputs import frame_inputs

    rij, nlist, _, partner = frame_inputs(np.asarray(pos)[None], np.asarray(cell)[None], pbc, np.asarray(atype), model.rcut, model.sel, model.type_map)
    if counts_full:
        rij = rij.requires_grad_(True)
        ae = model.atomic_energy(rij, torch.from_numpy(np.asarray(atype)), None)
        return {"energy": float(ae.sum().detach()), "atom_energy": ae[0].detach().numpy()}
    out = model.forward_rij(rij, nlist, torch.from_numpy(np.asarray(atype)), partner=partner if pairs else None)
    return {"energy": float(out["energy"][0].detach()), "force": out["force"][0].detach().numpy(), "virial": out["virial"][0].detach().numpy(), "atom_energy": out["atom_energy"][0].detach().numpy()}


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


_SKIPPED: list[tuple[str, str]] = []  # (test, reason) of every skip in this session


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason.removeprefix("Skipped: ")))


def disallowed_skips() -> list[tuple[str, str]]:
    """Skips of this session that tests/allowed_skips.py does not list."""
    import re

    from allowed_skips import ALLOWED_SKIPS

    return [(test, why) for test, why in _SKIPPED if not any(re.search(p, why) for p in ALLOWED_SKIPS)]


def pytest_terminal_summary(terminalreporter):
    if _ci() and disallowed_skips():
        terminalreporter.section("skipped in CI without being allowed (tests/allowed_skips.py)", red=True)
        for test, why in disallowed_skips():
            terminalreporter.line(f"{test}: {why}")


def pytest_sessionfinish(session, exitstatus):
    """With CI=true, a skip not listed in tests/allowed_skips.py fails the session."""
    if _ci() and disallowed_skips() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run with DPELT_RUN_SLOW=1 (``make test-all``), not in CI."""
    if os.environ.get("DPELT_RUN_SLOW") or not _ci():
        return
    skip = pytest.mark.skip(reason="slow test: skipped when CI=true; run with `make test-all`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """config/test.yaml run to the end with --cores 2 in a git repository (shared by the workflow
    and SLURM tests; tests that change it work on a copy)."""
    from test_workflow import snakemake, workflow_dir

    run = workflow_dir(tmp_path_factory.mktemp("run") / "a", git=True)
    snakemake(run, "--cores", "2")
    return run
