"""Make config/examples/water8.xyz: 8 randomly oriented water molecules (gas-phase geometry) on a
2×2×2 grid in a 6.21 Å cubic box (1.00 g/cm³), the start of the CP2K water example.

usage: python bench/studies/water_box.py [--out config/examples/water8.xyz] [--seed 0]

Not equilibrated: the example's initial CP2K MD and the exploration disorder it (a pre-run of a
classical or tight-binding model cost more CPU than the shared machine had to give). Deterministic.
"""

from __future__ import annotations

import argparse

import ase
import ase.io
import numpy as np
from ase.build import molecule


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
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    ase.io.write(args.out, water_grid(seed=args.seed), format="extxyz")
    print(f"{args.out}: 8 H2O, 6.21 Å box")


if __name__ == "__main__":
    main()
