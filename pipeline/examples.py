"""Small labelled data sets generated on the fly (EMT oracle): for the quick start and tests.

EMT (ASE's effective-medium theory for fcc metals) is instant and deterministic, so these
sets are bit-for-bit reproducible from their seed.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import xarray as xr
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import thermalize_momenta

from .data.ase_io import atoms_to_frames
from .units import fs_to_ase_time


def emt_bulk_frames(
    symbol: str = "Cu",
    repeat: Sequence[int] = (2, 2, 2),
    temperatures_K: Sequence[float] = (300.0, 900.0),
    frames_per_temperature: int = 20,
    stride: int = 10,
    timestep_fs: float = 2.0,
    strain: float = 0.02,
    seed: int = 0,
) -> xr.Dataset:
    """Frames of an fcc crystal from Langevin MD with EMT at each temperature.

    Each temperature starts from the perfect crystal with the cell scaled by a random factor
    within ±``strain`` (so virials vary), and records every ``stride`` steps (timestep in fs).
    Returns one system with energy (eV), forces (eV/Å) and virial (eV).
    """
    rng = np.random.default_rng(seed)
    images = []
    for k, T in enumerate(temperatures_K):
        atoms = bulk(symbol, "fcc", cubic=True).repeat(tuple(repeat))
        atoms.set_cell(atoms.cell.array * (1.0 + rng.uniform(-strain, strain)), scale_atoms=True)
        atoms.calc = EMT()
        thermalize_momenta(atoms, temperature_K=T, rng=rng)
        dyn = Langevin(atoms, timestep=fs_to_ase_time(timestep_fs), temperature_K=T, friction=0.02, fixcm=False, rng=rng)
        for step in range(frames_per_temperature):
            dyn.run(stride)
            snap = atoms.copy()
            snap.calc = SinglePointCalculator(snap, energy=atoms.get_potential_energy(), forces=atoms.get_forces(), stress=atoms.get_stress())
            snap.info.update({"temperature_K": float(T), "md_step": (step + 1) * stride, "oracle": "emt", "source_task": f"example-{symbol}-T{T:g}"})
            images.append(snap)
    (ds,) = atoms_to_frames(images, [symbol], source=f"emt_bulk_frames({symbol})")
    return ds
