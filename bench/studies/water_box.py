"""Make config/examples/water8.xyz: 8 water molecules in a 6.21 Å cubic box (1.00 g/cm³),
pre-equilibrated by 5 ps of rigid TIP3P Langevin MD at 300 K (ASE's TIP3P, cutoff 3.0 Å: the
box allows no more; only a cheap way to a disordered, liquid-like start), so that the CP2K
example's initial and held-out oracle MD do not start from a lattice of molecules.

usage: python bench/studies/water_box.py [--out config/examples/water8.xyz] [--steps 5000]

Deterministic (seeded); seconds. Not a test.
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
    p.add_argument("--steps", type=int, default=5000, help="1 fs steps")
    args = p.parse_args()
    from ase.calculators.tip3p import TIP3P, angleHOH, rOH
    from ase.constraints import FixBondLengths

    atoms = water_grid()
    for k in range(0, len(atoms), 3):  # TIP3P geometry, then kept rigid
        atoms.set_distance(k, k + 1, rOH, fix=0)
        atoms.set_distance(k, k + 2, rOH, fix=0)
        atoms.set_angle(k + 1, k, k + 2, angleHOH)
    atoms.constraints = FixBondLengths([(3 * i + j, 3 * i + (j + 1) % 3) for i in range(len(atoms) // 3) for j in (0, 1, 2)])
    if args.steps <= 0:
        ase.io.write(args.out, water_grid(), format="extxyz")
        print(f"{args.out}: the grid of molecules, no MD")
        return
    atoms.calc = TIP3P(rc=3.0, width=0.5)
    rng = np.random.default_rng(1)
    MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
    Stationary(atoms)
    Langevin(atoms, timestep=1.0 * fs, temperature_K=300, friction=0.02, rng=rng).run(args.steps)
    atoms.wrap()
    out = ase.Atoms(atoms.numbers, atoms.positions, cell=atoms.cell, pbc=True)
    ase.io.write(args.out, out, format="extxyz")
    print(f"{args.out}: {len(out)} atoms, T = {atoms.get_temperature():.0f} K at the end")


if __name__ == "__main__":
    main()
