"""A small ASE calculator for molecular DFT / Hartree-Fock with PySCF: energy and forces.

Units at the edges: PySCF works in Hartree and Bohr; this calculator returns energy in eV and
forces in eV/Å (conversion constants from :mod:`pipeline.units`). Geometries are passed in Å.

Parameters (all optional):

============ ============ ===========================================================
name          default      meaning
============ ============ ===========================================================
basis         "def2-svp"   Gaussian basis set (any name PySCF knows)
xc            "pbe"        exchange-correlation functional; "hf" for Hartree-Fock
charge        0            total charge, e
spin          0            N_alpha - N_beta = 2S (PySCF's convention); >0 gives UKS/UHF
max_cycle     100          SCF iterations
conv_tol      1e-9         SCF energy convergence, Hartree
grid_level    3            DFT integration grid level (PySCF's 0-9)
verbose       0            PySCF print level
============ ============ ===========================================================

For DFT the nuclear gradient includes the grid response, so forces are the exact derivative
of the energy that is returned (a force field trained on both needs them consistent).
PySCF runs with one OpenMP thread while this calculator computes, so labels are
bit-reproducible. Whether the SCF converged is exposed as ``calc.converged`` and
``calc.results["converged"]``; a non-converged SCF still returns numbers (the caller decides).
Periodic systems are refused: this is molecular (gas-phase) quantum chemistry.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
from ase.calculators.calculator import Calculator, CalculatorSetupError, all_changes

from ..units import BOHR_TO_A, HARTREE_TO_EV

PARAMETERS = ("basis", "xc", "charge", "spin", "max_cycle", "conv_tol", "grid_level", "verbose")
HF_NAMES = ("hf", "rhf", "uhf")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run PySCF with one OpenMP thread, restoring the previous count afterwards."""
    from pyscf import lib

    previous = lib.num_threads()
    lib.num_threads(1)
    try:
        yield
    finally:
        lib.num_threads(previous)


class PySCFCalculator(Calculator):
    """Molecular energy (eV) and forces (eV/Å) from a PySCF SCF calculation (RKS/UKS or RHF/UHF)."""

    implemented_properties = ["energy", "free_energy", "forces"]
    default_parameters: dict[str, Any] = {
        "basis": "def2-svp",
        "xc": "pbe",
        "charge": 0,
        "spin": 0,
        "max_cycle": 100,
        "conv_tol": 1e-9,
        "grid_level": 3,
        "verbose": 0,
    }

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(k for k in kwargs if k not in PARAMETERS and k not in ("directory", "label", "atoms"))
        if unknown:
            raise CalculatorSetupError(f"unknown PySCF parameters {unknown}; known: {list(PARAMETERS)}")
        self.converged: bool | None = None
        super().__init__(**kwargs)

    def reset(self) -> None:
        super().reset()
        self.converged = None

    def _mean_field(self, mol):
        from pyscf import dft, scf

        p = self.parameters
        xc = str(p.xc).lower()
        if xc in HF_NAMES:
            mf = scf.HF(mol)  # RHF for closed shells, UHF otherwise
        else:
            mf = dft.KS(mol, xc=p.xc)
            mf.grids.level = int(p.grid_level)
        mf.max_cycle = int(p.max_cycle)
        mf.conv_tol = float(p.conv_tol)
        mf.verbose = int(p.verbose)
        return mf

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        """Run the SCF and the analytic gradient; fill ``results`` (eV, eV/Å) and ``converged``."""
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if atoms.pbc.any():
            raise CalculatorSetupError(f"the PySCF oracle is molecular and cannot label a periodic system (pbc={atoms.pbc.tolist()})")
        from pyscf import gto

        p = self.parameters
        with _one_thread():
            mol = gto.M(
                atom=[(s, tuple(float(x) for x in pos)) for s, pos in zip(atoms.get_chemical_symbols(), atoms.positions)],
                unit="Angstrom",
                basis=p.basis,
                charge=int(p.charge),
                spin=int(p.spin),
                verbose=int(p.verbose),
            )
            mf = self._mean_field(mol)
            e_hartree = float(mf.kernel())
            self.converged = bool(mf.converged)
            grad = mf.nuc_grad_method()
            if hasattr(grad, "grid_response"):
                grad.grid_response = True
            grad.verbose = int(p.verbose)
            g = np.asarray(grad.kernel(), dtype=np.float64)  # Hartree/Bohr
        energy = e_hartree * HARTREE_TO_EV
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": -g * (HARTREE_TO_EV / BOHR_TO_A),
            "converged": self.converged,
        }
