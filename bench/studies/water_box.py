"""Make config/examples/water8.xyz: 8 water molecules in a 6.21 Å cubic box (1.00 g/cm³),
pre-equilibrated by 0.2 ps of GFN2-xTB Langevin MD at 300 K (tblite), so that the CP2K example's
initial and held-out oracle MD start from a liquid-like structure, not a lattice of molecules.

usage: python bench/studies/water_box.py [--out config/examples/water8.xyz] [--steps 2000]

Deterministic (seeded); a few minutes on one core. Not a test.
"""

from __future__ import annotations

import argparse

import ase
import ase.io
import numpy as np
from ase.build import molecule
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.units import fs


def water_grid(n_side: int = 2, length: float = 6.21, seed: int = 0) -> ase.Atoms:
    """n_side³ randomly oriented molecules on a cubic grid in a periodic box of ``length`` Å."""
    rng = np.random.default_rng(seed)
    atoms = ase.Atoms(cell=[length] * 3, pbc=True)
    d = length / n_side
    for idx in np.ndindex(n_side, n_side, n_side):
        w = molecule("H2O")
        for axis in "xyz":
            w.rotate(rng.uniform(0, 360), axis)
        w.translate((np.array(idx) + 0.5) * d - w.get_center_of_mass())
        atoms += w
    return atoms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="config/examples/water8.xyz")
    p.add_argument("--steps", type=int, default=400, help="0.5 fs steps")
    args = p.parse_args()
    from tblite.ase import TBLite

    atoms = water_grid()
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    rng = np.random.default_rng(1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    Stationary(atoms)
    Langevin(atoms, timestep=0.5 * fs, temperature_K=300, friction=0.02, rng=rng).run(args.steps)
    atoms.wrap()
    out = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    ase.io.write(args.out, out, format="extxyz")
    print(f"{args.out}: {len(out)} atoms, T = {atoms.get_temperature():.0f} K at the end")


if __name__ == "__main__":
    main()
