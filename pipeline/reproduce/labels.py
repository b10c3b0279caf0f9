"""``dpelt reproduce --reuse-labels``: the label step's task cache, seeded from the published run.

The label step (:mod:`pipeline.label.run`) keeps one ``tasks/<frame id>/result.json`` per
frame the oracle labelled and, on a rerun, reuses every finished result made with the same
oracle spec instead of calling the oracle. A published iteration holds those records (they
are under ``iter/NNN/label``), and its ``select/candidates.nc`` holds the exact geometry of
every frame they were computed for.

Before the label step of a re-executed iteration runs, :func:`seed_label_cache` copies a
published record into the new iteration's task cache only for a candidate whose types, pbc,
cell and coordinates are bit-identical (byte for byte, float64) to a published candidate with
a successful label. Everything else — a frame the re-execution selected differently, a
published failure — is left to the oracle. The records are copied verbatim, so the label step
builds ``frames.nc`` from the very numbers the oracle gave the published run (energy, forces
and stress as JSON floats, which round-trip exactly).

The only coupling with the label code is the cache's layout (``TASKS_DIR``/<id>/``RESULT``)
and its rule that a result is reused when its ``oracle`` spec equals the step's; the label
step's own ``summary.json`` (``computed`` vs ``cached``) shows afterwards that no frame was
sent to the oracle.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.frames import frame_ids, type_map_of
from ..data.netcdf import read_frames
from ..fileio import atomic_path
from ..label.run import RESULT, TASKS_DIR


@dataclass(frozen=True)
class Geometry:
    """What a label depends on, as bytes: type names, pbc, cell [3, 3] Å, coordinates [atom, 3] Å."""

    types: tuple[str, ...]
    pbc: bytes
    cell: bytes
    coord: bytes


def _geometries(path: Path) -> dict[str, Geometry]:
    """{frame id: geometry} of every frame of a frames file."""
    out = {}
    for ds in read_frames(path):
        tm = type_map_of(ds)
        types = tuple(tm[t] for t in ds["atom_type"].values)
        pbc = np.ascontiguousarray(ds["pbc"].values, dtype=bool).tobytes()
        cell = np.ascontiguousarray(ds["cell"].values, dtype=np.float64)
        coord = np.ascontiguousarray(ds["coord"].values, dtype=np.float64)
        for f, fid in enumerate(frame_ids(ds)):
            out[str(fid)] = Geometry(types, pbc, cell[f].tobytes(), coord[f].tobytes())
    return out


@dataclass
class PublishedLabels:
    """Successful oracle results of a published run, by frame id, with the geometry each was computed for."""

    records: dict[str, tuple[Geometry, Path]]

    @classmethod
    def from_run(cls, root: Path, iterations: list[str]) -> "PublishedLabels":
        records: dict[str, tuple[Geometry, Path]] = {}
        for it in iterations:
            candidates = root / "iter" / it / "select" / "candidates.nc"
            tasks = root / "iter" / it / "label" / TASKS_DIR
            if not candidates.exists() or not tasks.is_dir():
                continue
            for fid, geom in _geometries(candidates).items():
                result = tasks / fid / RESULT
                if fid not in records and result.exists() and _status(result) == "ok":
                    records[fid] = (geom, result)
        return cls(records)

    def seed(self, candidates: Path, label_dir: Path) -> dict:
        """Copy the published result of every candidate of ``candidates`` with a bit-identical
        published geometry into ``label_dir``'s task cache. Returns ``{"reused": [ids],
        "recomputed": {id: reason}}``."""
        reused, recomputed = [], {}
        for fid, geom in _geometries(candidates).items():
            hit = self.records.get(fid)
            if hit is None:
                recomputed[fid] = "no published label for this geometry"
                continue
            if hit[0] != geom:  # the same 16-hex id, another geometry: never trust a hash alone
                recomputed[fid] = "frame id collides with a published frame of another geometry"
                continue
            with atomic_path(label_dir / TASKS_DIR / fid / RESULT) as tmp:  # (a half copy would look like a result)
                shutil.copyfile(hit[1], tmp)
            reused.append(fid)
        return {"reused": reused, "recomputed": recomputed}


def _status(result: Path) -> str | None:
    try:
        return json.loads(result.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None
