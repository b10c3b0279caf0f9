"""NetCDF4/HDF5 storage of frames (h5netcdf engine), with a content checksum.

One file holds one system at its root, or several systems as groups ``system_000``,
``system_001``, … Every system carries ``attrs["content_sha256"]``, a hash of all its
variables, verified on load: a flipped byte gives a clear error instead of training on it.
Files are written to a temporary name and renamed (a killed writer leaves no finished file).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np
import xarray as xr

from ..errors import DataError
from ..fileio import atomic_path
from .frames import SCHEMA_VERSION, validate_frames

GROUP_PREFIX = "system_"


def content_sha256(ds: xr.Dataset) -> str:
    """sha256 over every variable and coordinate (name, dtype, shape, bytes), in sorted order."""
    h = hashlib.sha256()
    for name in sorted(list(ds.data_vars) + list(ds.coords)):
        values = ds[name].values
        h.update(name.encode())
        if values.dtype.kind in "OUS":
            h.update(b"str")
            h.update("\x1f".join(str(v) for v in values.ravel()).encode())
        else:
            arr = np.ascontiguousarray(values)
            h.update(arr.dtype.str.encode())
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def _prepare(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    out.attrs = {k: v for k, v in ds.attrs.items() if k != "content_sha256"}
    out.attrs["dpelt_schema"] = SCHEMA_VERSION
    out.attrs["content_sha256"] = content_sha256(out)
    return out


def write_frames(path: str | os.PathLike, systems: xr.Dataset | Sequence[xr.Dataset]) -> Path:
    """Write one system (root) or several (groups) to ``path`` atomically."""
    path = Path(path)
    if isinstance(systems, xr.Dataset):
        systems = [systems]
    systems = list(systems)
    with atomic_path(path) as tmp:
        if not systems:  # a valid file that holds no system (e.g. nothing selected)
            xr.Dataset(attrs={"dpelt_schema": SCHEMA_VERSION, "systems": 0}).to_netcdf(tmp, engine="h5netcdf")
        elif len(systems) == 1:
            _prepare(systems[0]).to_netcdf(tmp, engine="h5netcdf")
        else:
            for k, system in enumerate(systems):
                group = f"{GROUP_PREFIX}{k:03d}"
                _prepare(system).to_netcdf(tmp, engine="h5netcdf", group=group, mode="w" if k == 0 else "a")
    return path


def _groups(path: Path) -> list[str | None]:
    try:
        with h5py.File(path, "r") as fh:
            groups = sorted(k for k in fh.keys() if k.startswith(GROUP_PREFIX) and isinstance(fh[k], h5py.Group))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot open as NetCDF4/HDF5 (truncated or not a dpelt frames file): {exc}", path=path) from None
    return groups or [None]


def read_frames(path: str | os.PathLike, require_labels: bool = False, verify: bool = True) -> list[xr.Dataset]:
    """Read every system of a frames file, validated and checksum-verified."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    out = []
    groups = _groups(path)
    if groups == [None]:
        try:
            with h5py.File(path, "r") as fh:
                if int(np.asarray(fh.attrs.get("systems", -1)).ravel()[0]) == 0 and "coord" not in fh:
                    return []
        except (OSError, ValueError):
            pass
    for group in groups:
        where = f"{path}" + (f"#{group}" if group else "")
        try:
            ds = xr.load_dataset(path, engine="h5netcdf", group=group)
        except Exception as exc:  # h5py/xarray raise many types for a damaged file
            raise DataError(f"cannot read NetCDF data: {exc}", path=where) from None
        if verify and "content_sha256" in ds.attrs:
            stored = ds.attrs["content_sha256"]
            actual = content_sha256(ds)
            if stored != actual:
                raise DataError(
                    f"checksum mismatch (stored {stored[:12]}…, content {actual[:12]}…): the file was modified or corrupted",
                    path=where,
                    key="content_sha256",
                )
        ds.attrs.pop("content_sha256", None)
        out.append(validate_frames(ds, where, require_labels=require_labels))
    return out
