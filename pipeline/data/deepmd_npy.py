"""DeePMD-kit's ``deepmd/npy`` format: import and export.

A system directory holds ``type.raw`` (one type index per atom), optionally
``type_map.raw`` (element symbols) and ``nopbc`` (a free system), and one or more
``set.*`` directories with ``coord.npy`` [nf, natoms*3] (Å), ``box.npy`` [nf, 9] (Å),
``energy.npy`` [nf] (eV), ``force.npy`` [nf, natoms*3] (eV/Å) and optionally
``virial.npy`` [nf, 9] (eV). Described in DeePMD-kit's documentation ("Data format").
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import xarray as xr

from ..errors import DataError
from .frames import formula, make_frames, remap_types, type_map_of


def is_deepmd_system(path: str | os.PathLike) -> bool:
    return (Path(path) / "type.raw").is_file()


def find_deepmd_systems(path: str | os.PathLike) -> list[Path]:
    """System directories at or below ``path`` (a directory containing ``type.raw``), sorted."""
    path = Path(path)
    if is_deepmd_system(path):
        return [path]
    return sorted(p.parent for p in path.rglob("type.raw"))


def _load_npy(path: Path, key: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise DataError(f"cannot read .npy array: {exc}", path=path, key=key) from None


def _check_finite(arr: np.ndarray, path: Path, key: str) -> None:
    """A NaN or infinity names the file and the frame (row) within it."""
    if np.issubdtype(arr.dtype, np.number) and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1))
        raise DataError(f"non-finite value (NaN or inf) in frame {int(bad[0])} of this file ({len(bad)} frame(s) affected)", path=path, key=key)


def read_deepmd_system(path: str | os.PathLike, type_map: Sequence[str] | None = None) -> xr.Dataset:
    """Read one deepmd/npy system directory into a frames dataset (all ``set.*`` concatenated).

    ``type_map`` is required when the directory has no ``type_map.raw``; when both exist,
    ``type_map.raw`` names the types and the result is re-indexed to ``type_map``.
    """
    path = Path(path)
    type_raw = path / "type.raw"
    if not type_raw.is_file():
        raise DataError("not a deepmd/npy system (no type.raw)", path=path)
    try:
        atype = np.loadtxt(type_raw, dtype=np.int64, ndmin=1)
    except ValueError as exc:
        raise DataError(f"type.raw must hold one integer per atom: {exc}", path=type_raw, key="type") from None
    if atype.size == 0:
        raise DataError("no atoms", path=type_raw, key="type")
    natoms = atype.size
    if (path / "real_atom_types.npy").exists() or any(path.glob("set.*/real_atom_type.npy")):
        raise DataError("mixed_type deepmd/npy data is not supported; convert it to one system per composition", path=path)
    tm_file = path / "type_map.raw"
    if tm_file.is_file():
        own_map = tm_file.read_text().split()
        if not own_map:
            raise DataError("empty type_map.raw", path=tm_file, key="type_map")
        repeated = sorted({e for e in own_map if own_map.count(e) > 1})
        if repeated:
            raise DataError(f"elements {repeated} appear more than once in {own_map}: each type needs its own element", path=tm_file, key="type_map")
    elif type_map is not None:
        own_map = list(type_map)
    else:
        raise DataError("no type_map.raw: pass the element order (type_map, e.g. --type-map O H)", path=path, key="type_map")
    outside = (atype < 0) | (atype >= len(own_map))
    if outside.any():
        first = int(np.flatnonzero(outside)[0])
        raise DataError(f"type index {int(atype[first])} outside type_map {own_map} (atom {first}, line {first + 1})", path=type_raw, key="type")
    nopbc = (path / "nopbc").exists()
    sets = sorted(p for p in path.glob("set.*") if p.is_dir())
    if not sets:
        raise DataError("no set.* directories", path=path)
    coords, cells, energies, forces, virials = [], [], [], [], []
    for s in sets:
        coord = _load_npy(s / "coord.npy", "coord") if (s / "coord.npy").exists() else None
        if coord is None:
            raise DataError("missing coord.npy", path=s, key="coord")
        if coord.ndim != 2 or coord.shape[1] != natoms * 3:
            raise DataError(f"shape {coord.shape}, expected [nframes, {natoms * 3}] for {natoms} atoms in type.raw", path=s / "coord.npy", key="coord")
        nf = coord.shape[0]
        _check_finite(coord, s / "coord.npy", "coord")

        def load(name: str, width: int | None, required: bool) -> np.ndarray | None:
            f = s / f"{name}.npy"
            if not f.exists():
                if required:
                    raise DataError(f"missing {name}.npy", path=s, key=name)
                return None
            arr = _load_npy(f, name)
            want = (nf,) if width is None else (nf, width)
            if width is None and arr.shape == (nf, 1):
                arr = arr.reshape(nf)
            if arr.shape != want:
                raise DataError(f"shape {arr.shape}, expected {list(want)} ({nf} frames in coord.npy)", path=f, key=name)
            _check_finite(arr, f, name)
            return arr

        box = load("box", 9, required=not nopbc)
        coords.append(coord.reshape(nf, natoms, 3))
        cells.append(np.zeros((nf, 3, 3)) if box is None else box.reshape(nf, 3, 3))
        energies.append(load("energy", None, False))
        forces.append(load("force", natoms * 3, False))
        virials.append(load("virial", 9, False))

    def join(parts: list, name: str, shape_tail: tuple) -> np.ndarray | None:
        have = [p is not None for p in parts]
        if not any(have):
            return None
        if not all(have):
            missing = [sets[k].name for k, h in enumerate(have) if not h]
            raise DataError(f"{name}.npy present in some sets but missing in {missing}", path=path, key=name)
        return np.concatenate([p.reshape((p.shape[0],) + shape_tail) for p in parts])

    nf_total = sum(c.shape[0] for c in coords)
    ds = make_frames(
        coord=np.concatenate(coords),
        cell=np.concatenate(cells),
        atom_type=atype,
        type_map=own_map,
        pbc=(not nopbc,) * 3,
        energy=join(energies, "energy", ()),
        force=join(forces, "force", (natoms, 3)),
        virial=join(virials, "virial", (3, 3)),
        source_task=[str(path)] * nf_total,
        source=str(path),
    )
    if type_map is not None and list(type_map) != own_map:
        ds = remap_types(ds, type_map, source=str(path))
    return ds


def read_deepmd(path: str | os.PathLike, type_map: Sequence[str] | None = None) -> list[xr.Dataset]:
    """Read every deepmd/npy system at or below ``path``."""
    systems = find_deepmd_systems(path)
    if not systems:
        raise DataError("no deepmd/npy system (directory with type.raw) found", path=path)
    return [read_deepmd_system(p, type_map) for p in systems]


def _write_system(ds: xr.Dataset, out: Path, set_size: int) -> None:
    pbc = ds["pbc"].values.astype(bool)
    if pbc.any() and not pbc.all():
        raise DataError("deepmd/npy cannot express partial periodicity (pbc must be all true or all false)", key="pbc")
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    natoms = ds.sizes["atom"]
    np.savetxt(tmp / "type.raw", ds["atom_type"].values, fmt="%d")
    (tmp / "type_map.raw").write_text("\n".join(type_map_of(ds)) + "\n")
    if not pbc.any():
        (tmp / "nopbc").write_text("")
    nf = ds.sizes["frame"]
    for k, start in enumerate(range(0, max(nf, 1), set_size)):
        sl = slice(start, min(start + set_size, nf))
        sdir = tmp / f"set.{k:03d}"
        sdir.mkdir()
        n = sl.stop - sl.start
        np.save(sdir / "coord.npy", ds["coord"].values[sl].reshape(n, natoms * 3))
        if pbc.any():
            np.save(sdir / "box.npy", ds["cell"].values[sl].reshape(n, 9))
        if "energy" in ds:
            np.save(sdir / "energy.npy", ds["energy"].values[sl])
        if "force" in ds:
            np.save(sdir / "force.npy", ds["force"].values[sl].reshape(n, natoms * 3))
        if "virial" in ds:
            np.save(sdir / "virial.npy", ds["virial"].values[sl].reshape(n, 9))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_deepmd(systems: xr.Dataset | Sequence[xr.Dataset], out_dir: str | os.PathLike, set_size: int = 5000) -> list[Path]:
    """Write systems as deepmd/npy. One system -> ``out_dir`` itself; several -> ``out_dir/<formula>``."""
    out_dir = Path(out_dir)
    if isinstance(systems, xr.Dataset):
        systems = [systems]
    systems = list(systems)
    if len(systems) == 1:
        _write_system(systems[0], out_dir, set_size)
        return [out_dir]
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, seen = [], {}
    for ds in systems:
        name = formula(ds)
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}_{seen[name] - 1}"
        _write_system(ds, out_dir / name, set_size)
        paths.append(out_dir / name)
    return paths
