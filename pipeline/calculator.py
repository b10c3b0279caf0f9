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
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .errors import DpeltError
from .model.deeppot import DeepPot
from .model.inputs import frame_inputs
from .model.serialize import load_model
from .runtime import configure_torch


def atom_types(symbols: Sequence[str], type_map: Sequence[str]) -> np.ndarray:
    """Map chemical symbols to model type indices (error names an unknown element)."""
    lookup = {s: k for k, s in enumerate(type_map)}
    missing = sorted(set(symbols) - set(lookup))
    if missing:
        raise DpeltError(f"elements {missing} are not in the model's type_map {list(type_map)}", key="type_map")
    return np.array([lookup[s] for s in symbols], dtype=np.int64)


class DeepPotCalculator(Calculator):
    """ASE calculator for one dpelt model file (or a loaded :class:`DeepPot`).

    Parameters
    ----------
    model : path of a model file, or a DeepPot.
    threads : torch intra-op threads (default: $DPELT_THREADS or torch's default).
    on_overflow : "warn" (default) keeps the nearest ``sel`` neighbours, warns once and counts
        the frames in ``self.overflow_frames``; "error" raises.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress", "energies"]

    def __init__(self, model: str | os.PathLike | DeepPot, threads: int | None = None, on_overflow: str = "warn", **kwargs):
        super().__init__(**kwargs)
        configure_torch(threads)
        self.model = load_model(model) if isinstance(model, (str, os.PathLike)) else model.eval()
        self.type_map = list(self.model.type_map)
        self.on_overflow = on_overflow
        self.overflow_frames = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = atoms.pbc
        if "stress" in properties and not pbc.all():
            raise PropertyNotImplementedError("stress needs a cell periodic in all three directions")
        atype = atom_types(atoms.get_chemical_symbols(), self.type_map)
        rij, nlist, overflow = frame_inputs(
            atoms.positions[None], atoms.cell.array[None], pbc, atype, self.model.rcut, self.model.sel, self.type_map,
            on_overflow="error" if self.on_overflow == "error" else "ignore", where="atoms",
        )
        if overflow:
            if self.overflow_frames == 0:
                warnings.warn(f"an atom has more neighbours than sel allows ({overflow} beyond sel); the nearest are kept", stacklevel=2)
            self.overflow_frames += 1
        out = self.model.forward_rij(rij, nlist, torch.from_numpy(atype), True, bool(pbc.all()), False)
        energy = float(out["energy"][0].detach())
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out["atom_energy"][0].detach().numpy().copy()
        self.results["forces"] = out["force"][0].detach().numpy().copy()
        if pbc.all():
            virial = out["virial"][0].detach().numpy()
            self.results["stress"] = full_3x3_to_voigt_6_stress(-virial / atoms.get_volume())
