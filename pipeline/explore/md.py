"""Exploration MD: one task = one start frame under one condition, driven by the ensemble.

A task (system/start frame, temperature, pressure, ensemble, nsteps, dt, trj_freq, seed)
runs through ASE with an explicit seeded generator. Every ``trj_freq`` steps the frame and
the ensemble's deviations are kept. Blow-ups are detected every step and the trajectory is
cut there with the reason recorded (:mod:`pipeline.explore.guards`).

Outputs in the task directory: ``frames.nc`` (kept frames; deviations, md_step,
temperature_K, pressure_bar, bias_energy … as per-frame coordinates; the task and its
outcome as attributes), ``md.json`` and ``md.log`` (a readable log), written atomically by
:class:`~pipeline.explore.record.TaskRecorder` (shared with the batched driver).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import ase
import numpy as np
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from ..errors import ConfigError
from ..units import bar_to_ev_per_a3, fs_to_ase_time
from .bias import BiasConfig, energy_ceiling
from .guards import GuardConfig
from .record import TaskRecorder

ENSEMBLES = ("nvt", "nvt-langevin", "nvt-bussi", "nvt-nh", "nve", "npt", "npt-iso", "npt-aniso", "npt-tri")


@dataclass(frozen=True)
class MDTask:
    """One exploration run. Units: K, bar, fs."""

    name: str
    temperature_K: float
    nsteps: int
    trj_freq: int = 10
    ensemble: str = "nvt"
    pressure_bar: Optional[float] = None
    dt_fs: float = 1.0
    tau_t_fs: float = 100.0
    tau_p_fs: float = 1000.0
    seed: int = 0
    iteration: int = -1
    drive: str = "first"
    bias: BiasConfig = field(default_factory=BiasConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)

    def __post_init__(self) -> None:
        if self.ensemble not in ENSEMBLES:
            raise ConfigError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}", key="ensemble")
        if self.ensemble.startswith("npt") and self.pressure_bar is None:
            raise ConfigError(f"ensemble {self.ensemble} needs a pressure (bar)", key="press")
        for name, ok, need in (
            ("nsteps", self.nsteps >= 0, ">= 0"),
            ("trj_freq", self.trj_freq >= 1, ">= 1"),
            ("dt_fs", self.dt_fs > 0, "> 0 (fs)"),
            ("temperature_K", self.temperature_K >= 0, ">= 0 (K)"),
        ):
            if not ok:
                raise ConfigError(f"need {name} {need}, got {getattr(self, name)!r}", key=name)


def make_dynamics(task: MDTask, atoms: ase.Atoms, rng: np.random.Generator):
    """The ASE integrator for the task's ensemble (all stochastic ones seeded by ``rng``)."""
    from ase.md.bussi import Bussi
    from ase.md.langevin import Langevin
    from ase.md.nose_hoover_chain import IsotropicMTKNPT, MaskedMTKNPT, MTKNPT, NoseHooverChainNVT
    from ase.md.verlet import VelocityVerlet

    dt = fs_to_ase_time(task.dt_fs)
    T = task.temperature_K
    tau_t = fs_to_ase_time(task.tau_t_fs)
    e = task.ensemble
    if e == "nve":
        return VelocityVerlet(atoms, timestep=dt)
    if e in ("nvt", "nvt-langevin"):
        return Langevin(atoms, timestep=dt, temperature_K=T, friction=1.0 / tau_t, fixcm=False, rng=rng)
    if e == "nvt-bussi":
        return Bussi(atoms, timestep=dt, temperature_K=T, taut=tau_t, rng=rng)
    if e == "nvt-nh":
        return NoseHooverChainNVT(atoms, timestep=dt, temperature_K=T, tdamp=tau_t)
    if not atoms.pbc.all():
        raise ConfigError(f"ensemble {e} needs a cell periodic in all directions", key="ensemble")
    p = bar_to_ev_per_a3(task.pressure_bar)
    tau_p = fs_to_ase_time(task.tau_p_fs)
    if e in ("npt", "npt-iso"):
        return IsotropicMTKNPT(atoms, timestep=dt, temperature_K=T, pressure_au=p, tdamp=tau_t, pdamp=tau_p)
    if e == "npt-aniso":
        return MaskedMTKNPT(atoms, timestep=dt, temperature_K=T, pressure_au=p, tdamp=tau_t, pdamp=tau_p, mask=(True, True, True))
    return MTKNPT(atoms, timestep=dt, temperature_K=T, pressure_au=p, tdamp=tau_t, pdamp=tau_p)


def run_md(task: MDTask, atoms: ase.Atoms, calc, out_dir: str | os.PathLike, source: str = "") -> dict:
    """Run ``task`` from ``atoms`` with an :class:`~pipeline.calculator.EnsembleCalculator`.

    Returns the task summary (also stored as attributes of ``frames.nc``).
    """
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(task.seed)
    thermalize_momenta(atoms, temperature_K=task.temperature_K, rng=rng)
    Stationary(atoms)
    dyn = make_dynamics(task, atoms, rng)
    record = TaskRecorder(task, atoms)
    calc.deviation_due = True
    for _ in dyn.irun(steps=task.nsteps):
        step = dyn.nsteps
        if step == 0 and task.bias.active and calc.bias_ceiling is None:
            calc.bias_ceiling = energy_ceiling(task.bias, float(calc.results["mean_energy"]), len(atoms), task.temperature_K)
        if record.observe(step, atoms, calc.results):
            break
        calc.deviation_due = (step + 1) % task.trj_freq == 0
    return record.finish(out_dir, atoms, calc.type_map, source)
