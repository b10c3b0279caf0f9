"""Read and write frames in any supported format, chosen by path or by name.

Formats: ``netcdf`` (``*.nc``, dpelt's own), ``deepmd/npy`` (a directory with ``type.raw``,
or a directory of such systems), ``extxyz`` and anything else ASE reads (``ase`` or
``ase:<ase-format>``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import xarray as xr

from ..errors import DataError
from . import deepmd_npy, netcdf
from .frames import group_by_system, remap_types, validate_frames

FORMATS = ("netcdf", "deepmd/npy", "extxyz", "ase")


def detect_format(path: str | os.PathLike) -> str:
    """Guess the format of an existing path."""
    path = Path(path)
    if path.is_dir():
        if deepmd_npy.find_deepmd_systems(path):
            return "deepmd/npy"
        if any(path.glob("*.nc")):
            return "netcdf-dir"
        raise DataError("directory holds neither deepmd/npy systems (type.raw) nor *.nc files", path=path)
    if path.suffix == ".nc":
        return "netcdf"
    if path.suffix in (".xyz", ".extxyz"):
        return "extxyz"
    return "ase"


def read_systems(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    type_map: Sequence[str] | None = None,
    fmt: str | None = None,
    require_labels: bool = False,
) -> list[xr.Dataset]:
    """Read systems from one or several paths; re-index types to ``type_map`` when given.

    Frames of the same system found in several files are kept as separate datasets
    (so their origin stays visible); use :func:`group_by_system` to merge them.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[xr.Dataset] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise DataError("file or directory not found", path=p)
        kind = fmt or detect_format(p)
        if kind == "netcdf":
            systems = netcdf.read_frames(p, require_labels=require_labels)
        elif kind == "netcdf-dir":
            systems = [s for f in sorted(p.glob("*.nc")) for s in netcdf.read_frames(f, require_labels=require_labels)]
        elif kind == "deepmd/npy":
            systems = deepmd_npy.read_deepmd(p, type_map)
        elif kind == "extxyz":
            from . import ase_io  # lazy: ase.io pulls in scipy (~0.7 s per process)

            systems = ase_io.read_ase(p, type_map, format="extxyz")
        elif kind == "ase" or kind.startswith("ase:"):
            from . import ase_io

            systems = ase_io.read_ase(p, type_map, format=kind[4:] or None if ":" in kind else None)
        else:
            raise DataError(f"unknown format {kind!r}; known: {', '.join(FORMATS)}", path=p, key="format")
        for k, ds in enumerate(systems):
            if type_map is not None:
                ds = remap_types(ds, type_map, source=str(p))
            systems[k] = validate_frames(ds, str(p), require_labels=require_labels)
        out.extend(systems)
    return out


def write_systems(systems: xr.Dataset | Sequence[xr.Dataset], dst: str | os.PathLike, fmt: str | None = None) -> list[Path]:
    """Write systems to ``dst``; the format follows ``fmt`` or the suffix (``.nc``, ``.xyz``, else deepmd/npy)."""
    dst = Path(dst)
    if isinstance(systems, xr.Dataset):
        systems = [systems]
    if fmt is None:
        fmt = "netcdf" if dst.suffix == ".nc" else "extxyz" if dst.suffix in (".xyz", ".extxyz") else "deepmd/npy"
    if fmt == "netcdf":
        return [netcdf.write_frames(dst, systems)]
    if fmt == "extxyz":
        from . import ase_io

        return [ase_io.write_ase(systems, dst, format="extxyz")]
    if fmt == "deepmd/npy":
        return deepmd_npy.write_deepmd(systems, dst)
    if fmt.startswith("ase:"):
        from . import ase_io

        return [ase_io.write_ase(systems, dst, format=fmt[4:])]
    raise DataError(f"unknown output format {fmt!r}; known: netcdf, deepmd/npy, extxyz, ase:<format>", path=dst, key="format")


__all__ = ["read_systems", "write_systems", "detect_format", "group_by_system"]
