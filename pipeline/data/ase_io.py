"""Frames from and to anything ASE reads and writes (extxyz, VASP, CIF, ASE trajectories …).

Labels travel through ASE's single-point calculator: energy (eV), forces (eV/Å) and
stress (eV/Å³, converted to the virial Ξ = -σ·V in eV).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Sequence

import ase
import numpy as np
import xarray as xr
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers
from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

from ..errors import DataError
from ..fileio import atomic_path
from .frames import PROVENANCE, group_by_system, make_frames, nframes, type_map_of


def _labels(atoms: ase.Atoms) -> tuple[float | None, np.ndarray | None, np.ndarray | None]:
    calc = atoms.calc
    if calc is None:
        return None, None, None
    energy = forces = virial = None
    try:
        energy = float(calc.get_potential_energy(atoms))
    except (PropertyNotImplementedError, RuntimeError, AttributeError):
        pass
    try:
        forces = np.asarray(calc.get_forces(atoms), dtype=np.float64)
    except (PropertyNotImplementedError, RuntimeError, AttributeError):
        pass
    try:
        stress = np.asarray(calc.get_stress(atoms), dtype=np.float64)
        if atoms.cell.rank == 3:
            virial = -voigt_6_to_full_3x3_stress(stress) * atoms.get_volume() if stress.shape == (6,) else -stress * atoms.get_volume()
    except (PropertyNotImplementedError, RuntimeError, AttributeError):
        pass
    return energy, forces, virial


def atoms_to_frames(images: Sequence[ase.Atoms], type_map: Sequence[str] | None = None, source: str = "<atoms>") -> list[xr.Dataset]:
    """Group ASE images into systems (same atoms in the same order) and build frames.

    Without ``type_map`` the elements are ordered by atomic number.
    """
    if not images:
        raise DataError("no structures", path=source)
    if type_map is None:
        present = sorted({s for a in images for s in a.get_chemical_symbols()}, key=lambda s: atomic_numbers[s])
        type_map = present
    type_map = list(type_map)
    buckets: dict[tuple, list[int]] = {}
    for k, a in enumerate(images):
        key = (tuple(a.get_chemical_symbols()), tuple(bool(p) for p in a.pbc))
        buckets.setdefault(key, []).append(k)
    systems = []
    for (symbols, pbc), idx in buckets.items():
        for s in set(symbols):
            if s not in type_map:
                raise DataError(f"element {s} is not in type_map {type_map}", path=source, key="type_map")
        atype = [type_map.index(s) for s in symbols]
        labels = [_labels(images[k]) for k in idx]
        have_virial = [l[2] is not None for l in labels]
        if any(have_virial) and not all(have_virial):  # stress is optional: mixed bulk data is common
            warnings.warn(f"{source}: {have_virial.count(False)} of {len(labels)} structures of one composition carry no stress; the virial of this system is left out", stacklevel=2)
            labels = [(e, f, None) for e, f, _ in labels]
        for slot, name in enumerate(("energy", "force")):
            have = [l[slot] is not None for l in labels]
            if any(have) and not all(have):  # dropping the label of the frames that have it would lose data
                missing = [idx[n] for n, h in enumerate(have) if not h]
                raise DataError(
                    f"structure {idx[have.index(True)]} carries {name} but structure {missing[0]} ({len(missing)} in all, same composition) does not; "
                    "a system's frames must all carry a label or none",
                    path=source,
                    key=name,
                )
        energy = np.array([l[0] for l in labels]) if labels[0][0] is not None else None
        force = np.stack([l[1] for l in labels]) if labels[0][1] is not None else None
        virial = np.stack([l[2] for l in labels]) if labels[0][2] is not None else None
        prov = {}
        for name, (dtype, fill) in PROVENANCE.items():
            vals = [images[k].info.get(name, fill) for k in idx]
            prov[name] = vals
        if not prov.get("source_task") or all(v == "" for v in prov["source_task"]):
            prov["source_task"] = [f"{source}@{k}" for k in idx]
        systems.append(
            make_frames(
                coord=np.stack([images[k].positions for k in idx]),
                cell=np.stack([images[k].cell.array for k in idx]),
                atom_type=atype,
                type_map=type_map,
                pbc=pbc,
                energy=energy,
                force=force,
                virial=virial,
                source=source,
                **prov,
            )
        )
    return group_by_system(systems)


def read_ase(path: str | os.PathLike, type_map: Sequence[str] | None = None, format: str | None = None) -> list[xr.Dataset]:
    """Read every image of a file ASE understands (extxyz, POSCAR, OUTCAR, .traj, CIF …)."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        import ase.io  # lazy: pulls in scipy (~0.7 s per process)

        images = ase.io.read(path, index=":", format=format)
    except Exception as exc:
        raise DataError(f"ASE cannot read this file: {exc}", path=path) from None
    if isinstance(images, ase.Atoms):
        images = [images]
    return atoms_to_frames(images, type_map, source=str(path))


def frames_to_atoms(ds: xr.Dataset) -> list[ase.Atoms]:
    """One :class:`ase.Atoms` per frame; labels attached as a single-point calculator."""
    tm = type_map_of(ds)
    symbols = [tm[t] for t in ds["atom_type"].values]
    pbc = ds["pbc"].values.astype(bool)
    out = []
    for f in range(nframes(ds)):
        atoms = ase.Atoms(symbols=symbols, positions=ds["coord"].values[f], cell=ds["cell"].values[f], pbc=pbc)
        kw = {}
        if "energy" in ds:
            kw["energy"] = float(ds["energy"].values[f])
            kw["free_energy"] = kw["energy"]
        if "force" in ds:
            kw["forces"] = ds["force"].values[f].copy()
        if "virial" in ds and atoms.cell.rank == 3:
            kw["stress"] = full_3x3_to_voigt_6_stress(-ds["virial"].values[f] / atoms.get_volume())
        if kw:
            atoms.calc = SinglePointCalculator(atoms, **kw)
        for name, (_, fill) in PROVENANCE.items():
            value = ds[name].values[f]
            value = value.item() if hasattr(value, "item") else str(value)
            unknown = value == fill or (isinstance(value, float) and np.isnan(value)) or value == ""
            if not unknown:  # extxyz cannot hold an empty string; absent means unknown
                atoms.info[name] = value
        out.append(atoms)
    return out


def write_ase(systems: xr.Dataset | Sequence[xr.Dataset], path: str | os.PathLike, format: str | None = None) -> Path:
    """Write all frames of all systems to one file (extxyz by default for ``.xyz``/``.extxyz``)."""
    path = Path(path)
    if isinstance(systems, xr.Dataset):
        systems = [systems]
    images = [a for ds in systems for a in frames_to_atoms(ds)]
    if format is None and path.suffix in (".xyz", ".extxyz"):
        format = "extxyz"
    import ase.io

    with atomic_path(path) as tmp:
        ase.io.write(tmp, images, format=format)
    return path
