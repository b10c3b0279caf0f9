"""ASE calculators backed by dpelt models.

``DeepPotCalculator("model.pt")`` gives energy, free_energy (= energy), forces, stress
(eV/Å³, Voigt, periodic cells only) and per-atom energies, in ASE's units (eV, Å).
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes, compare_atoms
from ase.stress import full_3x3_to_voigt_6_stress

from .errors import DpeltError
from .model.deeppot import DeepPot
from .model.inputs import frame_inputs
from .model.serialize import inference_model
from .runtime import configure_torch


def atom_types(symbols: Sequence[str], type_map: Sequence[str], model: str | None = None) -> np.ndarray:
    """Map chemical symbols to model type indices (the error names an unknown element and the model file)."""
    lookup = {s: k for k, s in enumerate(type_map)}
    missing = sorted(set(symbols) - set(lookup))
    if missing:
        raise DpeltError(f"elements {missing} are not in the model's type_map {list(type_map)}", path=model, key="type_map")
    return np.array([lookup[s] for s in symbols], dtype=np.int64)


def _path_of(model) -> str | None:
    """The file of a model given as a path (named in errors); None for a loaded model."""
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else None


class _ExactStateCheck:
    """``check_state`` comparing positions, numbers, cell and pbc exactly with ``np.array_equal``.

    ASE's default compares with ``np.isclose`` (tolerance 1e-15 Å) on every property access;
    in MD that is several comparisons per step, ~5 % of a small system's step. An exact
    comparison can only report a change ASE would call none, i.e. recompute, never reuse
    stale results.
    """

    _EXACT = ("positions", "numbers", "cell", "pbc")

    def check_state(self, atoms, tol=1e-15):
        old = self.atoms
        if old is None:
            return list(all_changes)
        changes = []
        for prop, x, y in (
            ("positions", old.positions, atoms.positions),
            ("numbers", old.numbers, atoms.numbers),
            ("cell", old.cell.array, atoms.cell.array),
            ("pbc", old.pbc, atoms.pbc),
        ):
            if x.shape != y.shape or not np.array_equal(x, y):
                changes.append(prop)
        return changes + compare_atoms(old, atoms, tol, excluded_properties=set(self._EXACT) | set(self.ignored_changes))


class DeepPotCalculator(_ExactStateCheck, Calculator):
    """ASE calculator for one dpelt model file (or a loaded :class:`DeepPot`).

    Parameters
    ----------
    model : path of a model file, or a DeepPot.
    threads : torch intra-op threads (default: $DPELT_THREADS or torch's default).
    on_overflow : "warn" (default) keeps the nearest ``sel`` neighbours, warns once and counts
        the frames in ``self.overflow_frames``; "error" raises.
    compress : evaluate the embedding nets through their tables (default; equal to the nets
        within docs/compression.md's tolerance, faster); False evaluates the nets.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: str | os.PathLike | DeepPot, threads: int | None = None, on_overflow: str = "warn", compress: bool = True, **kwargs):
        super().__init__(**kwargs)
        configure_torch(threads)
        self.model = inference_model(model, compress)
        self.compressed = self.model.compressed
        self.model_path = _path_of(model)
        self.type_map = list(self.model.type_map)
        self.on_overflow = on_overflow
        self.overflow_frames = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = atoms.pbc
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        atype = atom_types(atoms.get_chemical_symbols(), self.type_map, self.model_path)
        rij, nlist, overflow, partner = frame_inputs(
            atoms.positions[None], atoms.cell.array[None], pbc, atype, self.model.rcut, self.model.sel, self.type_map,
            on_overflow="error" if self.on_overflow == "error" else "ignore", where="atoms",
        )
        if overflow:
            if self.overflow_frames == 0:
                warnings.warn(f"an atom has more neighbours than sel allows ({overflow} beyond sel); the nearest are kept", stacklevel=2)
            self.overflow_frames += 1
        out = self.model.forward_rij(rij, nlist, torch.from_numpy(atype), True, bool(pbc.all()), False, partner)
        energy = float(out["energy"][0].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["atom_energy"][0].detach().numpy().copy()
        self.results["forces"] = out["force"][0].detach().numpy().copy()
        if pbc.all():
            virial = out["virial"][0].detach().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())


class EnsembleCalculator(_ExactStateCheck, Calculator):
    """ASE calculator for an ensemble: one model (or the mean) drives, all are evaluated together.

    Parameters
    ----------
    models : model files or loaded DeepPot models (same type_map, rcut and sel).
    drive : "first" — model 0 drives MD and the whole ensemble is evaluated only when
        ``deviation_due`` is set (every ``trj_freq`` steps, by the MD driver); "mean" — the
        ensemble mean drives and every step evaluates all models.
    bias : optional :class:`pipeline.explore.bias.BiasConfig`; with an active bias every step
        evaluates the ensemble (the bias depends on its deviation) and adds the bias energy,
        forces and stress.
    compress : as for :class:`DeepPotCalculator` (every member tabulated, or none).

    After a step with the ensemble evaluated, ``results["deviation"]`` holds DP-GEN's
    deviations (max/min/avg_devi_f eV/Å, devi_e eV/atom, max/min/avg_devi_v eV/atom);
    ``results["mean_energy"]`` (eV) the ensemble mean; ``results["bias_energy"]`` (eV) and
    ``results["min_distance"]`` (Å) are always set. ``bias_ceiling`` (eV) is the reference of
    the confidence bias (set by the MD driver from the mean energy of the start frame).
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, models, drive: str = "first", bias=None, threads: int | None = None, on_overflow: str = "warn", compress: bool = True, **kwargs):
        super().__init__(**kwargs)
        from .model.ensemble import Ensemble

        configure_torch(threads)
        if drive not in ("first", "mean"):
            raise DpeltError(f"drive must be 'first' or 'mean', got {drive!r}", key="drive")
        loaded = [inference_model(m, compress) for m in models]
        self.ensemble = Ensemble(loaded, [_path_of(m) for m in models])
        self.model_path = _path_of(models[0]) if models else None
        self.type_map = self.ensemble.type_map
        self.compressed = all(m.compressed for m in loaded)
        self.drive = drive
        self.bias = bias if bias is not None and bias.active else None
        self.bias_ceiling: float | None = None
        self.deviation_due = True
        self.on_overflow = on_overflow
        self.overflow_frames = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from .explore.bias import bias_energy
        from .explore.deviation import model_deviation
        from .model.deeppot import scatter_forces, virial_from_grad

        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        periodic = bool(atoms.pbc.all())
        if "stress" in properties and not periodic:
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        atype = atom_types(atoms.get_chemical_symbols(), self.type_map, self.model_path)
        rij, nlist, overflow, partner = frame_inputs(
            atoms.positions[None], atoms.cell.array[None], atoms.pbc, atype, self.ensemble.rcut, self.ensemble.sel, self.type_map,
            on_overflow="error" if self.on_overflow == "error" else "ignore", where="atoms",
        )
        if overflow:
            if self.overflow_frames == 0:
                warnings.warn(f"an atom has more neighbours than sel allows ({overflow} beyond sel); the nearest are kept", stacklevel=2)
            self.overflow_frames += 1
        real = nlist >= 0
        self.results["min_distance"] = float(torch.linalg.vector_norm(rij, dim=-1)[real].min()) if bool(real.any()) else float("inf")
        ta = torch.from_numpy(atype)
        full = self.bias is not None or self.drive == "mean" or self.deviation_due
        if not full:
            out = self.ensemble.models[0].forward_rij(rij, nlist, ta, True, periodic, False, partner)
            energy, forces = float(out["energy"][0].detach()), out["force"][0].detach().numpy()
            virial = out["virial"][0].detach().numpy() if periodic else None
            self.results["deviation"] = None
            self.results["bias_energy"] = 0.0
        else:
            out = self.ensemble.evaluate(rij, nlist, ta, do_virial=periodic, create_graph=self.bias is not None)
            E, F = out["energy"][:, 0], out["force"][:, 0]  # [M], [M, nloc, 3]
            pick = (lambda x: x.mean(0)) if self.drive == "mean" else (lambda x: x[0])
            energy = float(pick(E).detach())
            forces = pick(F).detach().numpy().copy()
            virial = pick(out["virial"][:, 0]).detach().numpy().copy() if periodic else None
            dev = model_deviation(E.detach().numpy()[:, None], F.detach().numpy()[:, None], out["virial"].detach().numpy() if periodic else None)
            self.results["deviation"] = {k: float(v[0]) for k, v in dev.items()}
            self.results["mean_energy"] = float(E.mean().detach())
            self.results["bias_energy"] = 0.0
            if self.bias is not None:
                ceiling = self.bias_ceiling if self.bias_ceiling is not None else float(E.mean().detach())
                v = bias_energy(self.bias, E, F, ceiling)
                (g,) = torch.autograd.grad([v], [out["rij"]], allow_unused=True)
                if g is not None:
                    g = g.sum(0)  # every member saw the same displacements: [nf, nloc, nnei, 3]
                    forces = forces + scatter_forces(g.unsqueeze(0), nlist)[0, 0].detach().numpy()
                    if periodic:
                        virial = virial - virial_from_grad(g.unsqueeze(0), rij.unsqueeze(0))[0, 0].detach().numpy()
                energy += float(v.detach())
                self.results["bias_energy"] = float(v.detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["forces"] = forces
        if periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())
