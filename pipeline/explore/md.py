"""Exploration MD: one task = one start frame under one condition, driven by the ensemble.

A task (system/start frame, temperature, pressure, ensemble, nsteps, dt, trj_freq, seed)
runs through ASE with an explicit seeded generator. Every ``trj_freq`` steps the frame and
the ensemble's deviations are kept. Blow-ups are detected every step and the trajectory is
cut there with the reason recorded (:mod:`pipeline.explore.guards`).

Outputs in the task directory: ``frames.nc`` (kept frames; deviations, md_step,
temperature_K, pressure_bar, bias_energy … as per-frame coordinates; the task and its
outcome as attributes), ``md.log`` (a readable log) — both written atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import ase
import numpy as np
from ase.md.velocitydistribution import Stationary, thermalize_momenta

from ..data.frames import make_frames
from ..data.netcdf import write_frames
from ..errors import ConfigError
from ..fileio import write_json_atomic, write_text_atomic
from ..units import bar_to_ev_per_a3, fs_to_ase_time
from .bias import BiasConfig, energy_ceiling
from .deviation import DEVIATION_KEYS
from .guards import GuardConfig, check_step

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
    compress: bool = True  # MD on the tabulated embedding nets (pipeline.model.compress)
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
    out_dir = Path(out_dir)
    t_start = time.perf_counter()
    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(task.seed)
    thermalize_momenta(atoms, temperature_K=task.temperature_K, rng=rng)
    Stationary(atoms)
    dyn = make_dynamics(task, atoms, rng)
    natoms = len(atoms)
    volume0 = atoms.get_volume() if atoms.pbc.all() else None
    calc.deviation_due = True
    kept: dict[str, list] = {k: [] for k in ("coord", "cell", "md_step", "bias_energy", "potential_energy", "kinetic_temperature_K") + DEVIATION_KEYS}
    log = [f"# task {task.name}: {task.ensemble} T={task.temperature_K} K P={task.pressure_bar} bar, {task.nsteps} steps of {task.dt_fs} fs, trj_freq {task.trj_freq}, seed {task.seed}, bias {task.bias.kind}"]
    log.append(f"# embedding nets: {'tabulated (compressed)' if getattr(calc, 'compressed', False) else 'evaluated as nets'}")
    log.append(f"# {'step':>8s} {'T_K':>9s} {'E_pot_eV':>14s} {'max_devi_f':>11s} {'devi_e':>11s} {'bias_eV':>10s}")
    status, reason, high_streak, step = "completed", "", 0, 0
    for _ in dyn.irun(steps=task.nsteps):
        step = dyn.nsteps
        if step == 0 and task.bias.active and calc.bias_ceiling is None:
            calc.bias_ceiling = energy_ceiling(task.bias, float(calc.results["mean_energy"]), natoms, task.temperature_K)
        reason = check_step(task.guards, atoms, calc.results, task.temperature_K, volume0)
        dev = calc.results.get("deviation")
        if not reason and step % task.trj_freq == 0 and dev is not None:
            if task.guards.devi_ceiling is not None and dev["max_devi_f"] > task.guards.devi_ceiling:
                high_streak += 1
                if high_streak >= task.guards.devi_patience:
                    reason = f"max_devi_f above {task.guards.devi_ceiling} eV/Å for {high_streak} frames in a row"
            else:
                high_streak = 0
            T_inst = atoms.get_temperature()
            kept["coord"].append(atoms.positions.copy())
            kept["cell"].append(atoms.cell.array.copy())
            kept["md_step"].append(step)
            kept["bias_energy"].append(float(calc.results.get("bias_energy", 0.0)))
            kept["potential_energy"].append(float(calc.results["energy"]) - float(calc.results.get("bias_energy", 0.0)))
            kept["kinetic_temperature_K"].append(T_inst)
            for k in DEVIATION_KEYS:
                kept[k].append(dev[k])
            log.append(f"  {step:8d} {T_inst:9.1f} {kept['potential_energy'][-1]:14.6f} {dev['max_devi_f']:11.4e} {dev['devi_e']:11.4e} {kept['bias_energy'][-1]:10.4f}")
        if reason:
            status = "stopped"
            log.append(f"# stopped at step {step}: {reason}")
            break
        calc.deviation_due = (step + 1) % task.trj_freq == 0
    summary = {
        "task": _task_dict(task),
        "source": source,
        "status": status,
        "reason": reason,
        "steps_done": int(step),
        "frames": len(kept["md_step"]),
        "natoms": natoms,
    }
    systems = []
    if kept["md_step"]:
        tm = calc.type_map
        atype = [tm.index(s) for s in atoms.get_chemical_symbols()]
        nf = len(kept["md_step"])
        ds = make_frames(
            coord=np.stack(kept["coord"]),
            cell=np.stack(kept["cell"]),
            atom_type=atype,
            type_map=tm,
            pbc=atoms.pbc,
            source=str(out_dir / "frames.nc"),
            source_iter=task.iteration,
            source_task=task.name,
            md_step=kept["md_step"],
            temperature_K=task.temperature_K,
            pressure_bar=np.nan if task.pressure_bar is None else task.pressure_bar,
            max_devi_f=kept["max_devi_f"],
        )
        extra = {k: (("frame",), np.asarray(kept[k], dtype=np.float64)) for k in DEVIATION_KEYS[1:] + ("bias_energy", "potential_energy", "kinetic_temperature_K")}
        ds = ds.assign_coords(extra)
        ds.attrs.update({"task": json.dumps(summary["task"], sort_keys=True), "status": status, "reason": reason, "steps_done": int(step)})
        assert nf == ds.sizes["frame"]
        systems.append(ds)
    write_frames(out_dir / "frames.nc", systems)
    write_json_atomic(out_dir / "md.json", summary)
    log.append(f"# {status}: {summary['frames']} frames kept, {step} steps in {time.perf_counter() - t_start:.1f} s")
    write_text_atomic(out_dir / "md.log", "\n".join(log) + "\n")
    return summary


def _task_dict(task: MDTask) -> dict:
    d = asdict(task)
    return json.loads(json.dumps(d, default=float))
