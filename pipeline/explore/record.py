"""What an exploration task keeps and writes, shared by the per-task (ASE) and batched drivers.

After every MD step a driver hands the walker's state to :meth:`TaskRecorder.observe`: the
step is checked (:mod:`pipeline.explore.guards`), every ``trj_freq`` steps the frame and the
ensemble's deviations are kept (and the ``devi_ceiling`` streak counted), and the first
failed check ends the task with its reason. :meth:`TaskRecorder.finish` writes the task
directory: ``frames.nc`` (kept frames; deviations, md_step, temperature_K, pressure_bar,
bias_energy … as per-frame coordinates; the task and its outcome as attributes), ``md.json``
(the summary) and ``md.log`` (a readable log), each atomically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import ase
import numpy as np

from ..data.frames import make_frames
from ..data.netcdf import write_frames
from ..fileio import write_json_atomic, write_text_atomic
from .deviation import DEVIATION_KEYS
from .guards import check_step

KEPT = ("coord", "cell", "md_step", "bias_energy", "potential_energy", "kinetic_temperature_K") + DEVIATION_KEYS


def task_dict(task) -> dict:
    """An MDTask as plain JSON-able data (recorded in frames.nc and md.json)."""
    return json.loads(json.dumps(asdict(task), default=float))


class TaskRecorder:
    """Kept frames, log lines and the outcome of one MD task (units: Å, eV, K)."""

    def __init__(self, task, atoms: ase.Atoms):
        self.task = task
        self.natoms = len(atoms)
        self.volume0 = atoms.get_volume() if atoms.pbc.all() else None
        self.kept: dict[str, list] = {k: [] for k in KEPT}
        self.status, self.reason, self.step, self.high_streak = "completed", "", 0, 0
        self.t_start = time.perf_counter()
        self.log = [
            f"# task {task.name}: {task.ensemble} T={task.temperature_K} K P={task.pressure_bar} bar, {task.nsteps} steps of {task.dt_fs} fs, "
            f"trj_freq {task.trj_freq}, seed {task.seed}, bias {task.bias.kind}",
            f"# {'step':>8s} {'T_K':>9s} {'E_pot_eV':>14s} {'max_devi_f':>11s} {'devi_e':>11s} {'bias_eV':>10s}",
        ]

    def observe(self, step: int, atoms: ase.Atoms, results: dict) -> str:
        """Check step ``step`` (atoms after it, the calculator's ``results`` for them), keep the
        frame when due; '' when the task goes on, else the reason it stops (recorded)."""
        task, kept = self.task, self.kept
        self.step = step
        reason = check_step(task.guards, atoms, results, task.temperature_K, self.volume0)
        dev = results.get("deviation")
        if not reason and step % task.trj_freq == 0 and dev is not None:
            if task.guards.devi_ceiling is not None and dev["max_devi_f"] > task.guards.devi_ceiling:
                self.high_streak += 1
                if self.high_streak >= task.guards.devi_patience:
                    reason = f"max_devi_f above {task.guards.devi_ceiling} eV/Å for {self.high_streak} frames in a row"
            else:
                self.high_streak = 0
            T_inst = atoms.get_temperature()
            bias = float(results.get("bias_energy", 0.0))
            kept["coord"].append(atoms.positions.copy())
            kept["cell"].append(atoms.cell.array.copy())
            kept["md_step"].append(step)
            kept["bias_energy"].append(bias)
            kept["potential_energy"].append(float(results["energy"]) - bias)
            kept["kinetic_temperature_K"].append(T_inst)
            for k in DEVIATION_KEYS:
                kept[k].append(dev[k])
            self.log.append(f"  {step:8d} {T_inst:9.1f} {kept['potential_energy'][-1]:14.6f} {dev['max_devi_f']:11.4e} {dev['devi_e']:11.4e} {bias:10.4f}")
        if reason:
            self.status, self.reason = "stopped", reason
            self.log.append(f"# stopped at step {step}: {reason}")
        return reason

    def finish(self, out_dir: str | os.PathLike, atoms: ase.Atoms, type_map, source: str = "") -> dict:
        """Write frames.nc, md.json and md.log into ``out_dir``; returns the summary."""
        out_dir, task, kept, step = Path(out_dir), self.task, self.kept, self.step
        summary = {
            "task": task_dict(task),
            "source": source,
            "status": self.status,
            "reason": self.reason,
            "steps_done": int(step),
            "frames": len(kept["md_step"]),
            "natoms": self.natoms,
        }
        systems = []
        if kept["md_step"]:
            ds = make_frames(
                coord=np.stack(kept["coord"]),
                cell=np.stack(kept["cell"]),
                atom_type=[list(type_map).index(s) for s in atoms.get_chemical_symbols()],
                type_map=type_map,
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
            ds.attrs.update({"task": json.dumps(summary["task"], sort_keys=True), "status": self.status, "reason": self.reason, "steps_done": int(step)})
            systems.append(ds)
        write_frames(out_dir / "frames.nc", systems)
        write_json_atomic(out_dir / "md.json", summary)
        self.log.append(f"# {self.status}: {summary['frames']} frames kept, {step} steps in {time.perf_counter() - self.t_start:.1f} s")
        write_text_atomic(out_dir / "md.log", "\n".join(self.log) + "\n")
        return summary
