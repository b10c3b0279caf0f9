"""Frames: the canonical form of atomic configurations (DESIGN §3).

A *system* is an :class:`xarray.Dataset` of frames that share the atom count and the
atom types. Dimensions and variables (units eV, Å):

========== ================================ =========================================
variable    dims                             meaning
========== ================================ =========================================
coord       (frame, atom, xyz)               Cartesian positions, Å
cell        (frame, cell_vector, xyz)        cell vectors as rows, Å
pbc         (xyz,)                           periodic along each cell vector (0/1)
atom_type   (atom,)                          index into ``type_map``
energy      (frame,)                         potential energy, eV (optional)
force       (frame, atom, xyz)               forces, eV/Å (optional)
virial      (frame, row, xyz)                virial Ξ = -Σ r ⊗ ∂E/∂r, eV (optional)
========== ================================ =========================================

Coordinates: ``type_map`` (dim ``type``: element symbols) and per-frame provenance
``source_iter``, ``source_task``, ``md_step``, ``temperature_K``, ``pressure_bar``,
``max_devi_f``, ``oracle`` so any training frame can be traced to where it came from.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np
import xarray as xr

from ..errors import DataError

SCHEMA_VERSION = 1

#: Per-frame provenance coordinates: name -> (dtype, fill value when unknown).
PROVENANCE: dict[str, tuple[type, object]] = {
    "source_iter": (np.int64, -1),
    "source_task": (str, ""),
    "md_step": (np.int64, -1),
    "temperature_K": (np.float64, np.nan),
    "pressure_bar": (np.float64, np.nan),
    "max_devi_f": (np.float64, np.nan),
    "oracle": (str, ""),
}

LABELS = ("energy", "force", "virial")


def make_frames(
    coord: np.ndarray,
    cell: np.ndarray,
    atom_type: Sequence[int],
    type_map: Sequence[str],
    pbc: Sequence[bool] = (True, True, True),
    energy: np.ndarray | None = None,
    force: np.ndarray | None = None,
    virial: np.ndarray | None = None,
    source: str = "<arrays>",
    **provenance: Iterable,
) -> xr.Dataset:
    """Build a validated system dataset from arrays.

    Parameters
    ----------
    coord : [nframes, natoms, 3] positions in Å.
    cell : [nframes, 3, 3] cell vectors as rows in Å (zeros for a free molecule).
    atom_type : [natoms] indices into ``type_map``.
    type_map : element symbols, e.g. ``["O", "H"]``.
    pbc : periodicity along each cell vector.
    energy, force, virial : labels in eV, eV/Å, eV (optional).
    source : file named in validation errors.
    provenance : per-frame values for the keys of :data:`PROVENANCE`.
    """
    coord = np.asarray(coord, dtype=np.float64)
    if coord.ndim != 3 or coord.shape[-1] != 3:
        raise DataError(f"coord must have shape [nframes, natoms, 3], got {coord.shape}", key="coord")
    nframes, natoms, _ = coord.shape
    cell = np.asarray(cell, dtype=np.float64)
    if cell.shape == (3, 3):
        cell = np.broadcast_to(cell, (nframes, 3, 3)).copy()
    data_vars = {
        "coord": (("frame", "atom", "xyz"), coord),
        "cell": (("frame", "cell_vector", "xyz"), cell),
        "pbc": (("xyz",), np.asarray(pbc, dtype=np.int8).reshape(3)),
        "atom_type": (("atom",), np.asarray(atom_type, dtype=np.int64)),
    }
    if energy is not None:
        data_vars["energy"] = (("frame",), np.asarray(energy, dtype=np.float64).reshape(nframes))
    if force is not None:
        data_vars["force"] = (("frame", "atom", "xyz"), np.asarray(force, dtype=np.float64).reshape(nframes, natoms, 3))
    if virial is not None:
        data_vars["virial"] = (("frame", "row", "xyz"), np.asarray(virial, dtype=np.float64).reshape(nframes, 3, 3))
    coords = {"type_map": (("type",), np.asarray(list(type_map), dtype=str))}
    for name, (dtype, fill) in PROVENANCE.items():
        values = provenance.pop(name, None)
        if values is None:
            arr = np.full(nframes, fill, dtype=object if dtype is str else dtype)
        else:
            arr = np.asarray(values, dtype=object if dtype is str else dtype)
            if arr.ndim == 0:
                arr = np.full(nframes, arr.item(), dtype=arr.dtype)
        if dtype is str:
            arr = arr.astype(str)
        coords[name] = (("frame",), arr)
    if provenance:
        raise DataError(f"unknown provenance keys {sorted(provenance)}; known: {sorted(PROVENANCE)}")
    ds = xr.Dataset(data_vars, coords=coords, attrs={"dpelt_schema": SCHEMA_VERSION})
    return validate_frames(ds, source)


def type_map_of(ds: xr.Dataset) -> list[str]:
    """Element symbols indexed by ``atom_type``."""
    return [str(s) for s in ds["type_map"].values]


def natoms(ds: xr.Dataset) -> int:
    return int(ds.sizes["atom"])


def nframes(ds: xr.Dataset) -> int:
    return int(ds.sizes.get("frame", 0))


def has_labels(ds: xr.Dataset) -> bool:
    """True when the system carries energies and forces."""
    return "energy" in ds and "force" in ds


def formula(ds: xr.Dataset) -> str:
    """Chemical formula in ``type_map`` order, e.g. ``O64H128``."""
    tm = type_map_of(ds)
    counts = np.bincount(ds["atom_type"].values, minlength=len(tm))
    return "".join(f"{tm[t]}{c}" for t, c in enumerate(counts) if c)


def validate_frames(ds: xr.Dataset, source: str, require_labels: bool = False) -> xr.Dataset:
    """Check shapes, types and finite values; raise one :class:`DataError` naming the variable.

    Returns the dataset (with provenance coordinates filled in where missing).
    """

    def fail(key: str, message: str) -> None:
        raise DataError(message, path=source, key=key)

    for name in ("coord", "cell", "atom_type"):
        if name not in ds:
            fail(name, "missing variable")
    if "type_map" not in ds.coords:
        fail("type_map", "missing coordinate (element symbols of the atom types)")
    expect_dims = {
        "coord": ("frame", "atom", "xyz"),
        "cell": ("frame", "cell_vector", "xyz"),
        "atom_type": ("atom",),
        "pbc": ("xyz",),
        "energy": ("frame",),
        "force": ("frame", "atom", "xyz"),
        "virial": ("frame", "row", "xyz"),
    }
    for name, dims in expect_dims.items():
        if name in ds and ds[name].dims != dims:
            fail(name, f"dimensions {ds[name].dims}, expected {dims}")
    for dim in ("xyz", "cell_vector", "row"):
        if dim in ds.sizes and ds.sizes[dim] != 3:
            fail(dim, f"dimension {dim} has size {ds.sizes[dim]}, expected 3")
    ntypes = ds.sizes["type"]
    elements = [str(e) for e in ds["type_map"].values]
    repeated = sorted({e for e in elements if elements.count(e) > 1})
    if repeated:
        fail("type_map", f"elements {repeated} appear more than once in {elements}: each type needs its own element")
    atype = ds["atom_type"].values
    if not np.issubdtype(atype.dtype, np.integer):
        fail("atom_type", f"must be integers, got {atype.dtype}")
    if atype.size and (atype.min() < 0 or atype.max() >= ntypes):
        fail("atom_type", f"values must lie in [0, {ntypes}) (type_map has {ntypes} elements), got range [{atype.min()}, {atype.max()}]")
    for name in ("coord", "cell", "energy", "force", "virial"):
        if name in ds:
            values = ds[name].values
            if not np.issubdtype(values.dtype, np.floating):
                fail(name, f"must be floating point, got {values.dtype}")
            bad = ~np.isfinite(values)
            if bad.any():
                frame = int(np.argwhere(bad)[0][0])
                fail(name, f"non-finite value (NaN or inf) in frame {frame}")
    if "pbc" not in ds:
        ds = ds.assign(pbc=(("xyz",), np.ones(3, dtype=np.int8)))
    pbc = ds["pbc"].values.astype(bool)
    if pbc.any() and nframes(ds):
        cell = ds["cell"].values
        vol = np.abs(np.linalg.det(cell))
        if (vol < 1e-8).any():
            frame = int(np.argmax(vol < 1e-8))
            fail("cell", f"periodic system with a degenerate cell (volume {vol[frame]:.3g} Å³) in frame {frame}")
    if require_labels:
        for name in ("energy", "force"):
            if name not in ds:
                fail(name, "missing label (training and testing need energies and forces)")
    missing = {}
    n = nframes(ds)
    for name, (dtype, fill) in PROVENANCE.items():
        if name not in ds.coords:
            arr = np.full(n, fill, dtype=object if dtype is str else dtype)
            missing[name] = (("frame",), arr.astype(str) if dtype is str else arr)
    if missing:
        ds = ds.assign_coords(missing)
    return ds


def frame_ids(ds: xr.Dataset) -> np.ndarray:
    """Content identity of each frame: sha256 of types, cell, pbc and coordinates (hex, 16 chars).

    Two frames with bit-identical geometry get the same id; used to never label a frame twice.
    """
    head = np.ascontiguousarray(ds["atom_type"].values, dtype=np.int64).tobytes()
    head += np.ascontiguousarray(ds["pbc"].values, dtype=np.int8).tobytes()
    tm = ",".join(type_map_of(ds)).encode()
    coord = np.ascontiguousarray(ds["coord"].values, dtype=np.float64)
    cell = np.ascontiguousarray(ds["cell"].values, dtype=np.float64)
    ids = []
    for f in range(nframes(ds)):
        h = hashlib.sha256(tm + head + cell[f].tobytes() + coord[f].tobytes())
        ids.append(h.hexdigest()[:16])
    return np.asarray(ids, dtype=str)


def same_system(a: xr.Dataset, b: xr.Dataset) -> bool:
    """True when ``a`` and ``b`` have the same atoms, types and type_map."""
    return (
        natoms(a) == natoms(b)
        and type_map_of(a) == type_map_of(b)
        and np.array_equal(a["atom_type"].values, b["atom_type"].values)
        and np.array_equal(a["pbc"].values, b["pbc"].values)
    )


def concat_frames(systems: Sequence[xr.Dataset]) -> xr.Dataset:
    """Concatenate frames of the same system along ``frame``.

    Label variables present in only some inputs are dropped from the result.
    """
    if not systems:
        raise DataError("nothing to concatenate")
    first = systems[0]
    for s in systems[1:]:
        if not same_system(first, s):
            raise DataError(f"cannot concatenate systems {formula(first)} and {formula(s)}")
    common = [v for v in LABELS if all(v in s for s in systems)]
    drop = [v for v in LABELS if v not in common]
    parts = [s.drop_vars([v for v in drop if v in s]) for s in systems]
    out = xr.concat(parts, dim="frame", data_vars="minimal", coords="minimal", compat="override", join="exact")
    out["atom_type"] = first["atom_type"]
    out["pbc"] = first["pbc"]
    out.attrs = dict(first.attrs)
    out.attrs.pop("content_sha256", None)
    return out


def group_by_system(systems: Sequence[xr.Dataset]) -> list[xr.Dataset]:
    """Merge datasets of identical systems, keeping first-seen order."""
    groups: list[list[xr.Dataset]] = []
    for s in systems:
        for g in groups:
            if same_system(g[0], s):
                g.append(s)
                break
        else:
            groups.append([s])
    return [g[0] if len(g) == 1 else concat_frames(g) for g in groups]


def remap_types(ds: xr.Dataset, type_map: Sequence[str], source: str = "<frames>") -> xr.Dataset:
    """Re-index ``atom_type`` to ``type_map`` (which must contain every element present)."""
    own = type_map_of(ds)
    if own == list(type_map):
        return ds
    present = sorted(set(int(t) for t in ds["atom_type"].values))
    lookup = np.full(len(own), -1, dtype=np.int64)
    for t in present:
        if own[t] not in type_map:
            raise DataError(f"element {own[t]} is not in type_map {list(type_map)}", path=source, key="type_map")
        lookup[t] = list(type_map).index(own[t])
    out = ds.drop_vars("type_map").assign_coords(type_map=(("type",), np.asarray(list(type_map), dtype=str)))
    out["atom_type"] = (("atom",), lookup[ds["atom_type"].values])
    return out
