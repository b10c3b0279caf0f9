"""Training data in memory: labelled systems with their neighbour lists built once.

Neighbour lists of training frames do not change, so they are built once at load time
(compact: int32 indices and int8 image shifts) and displacements are gathered per batch.
Batches hold frames of one system; systems are drawn with probability proportional to
their number of batches (``prob_sys_size``) or uniformly, by a generator seeded from
(seed, step) — so a resumed run draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import xarray as xr

from ..data.frames import formula, type_map_of
from ..errors import DataError, NeighborOverflowError, TooManyNeighborsError
from ..model.neighbor import build_neighbor_list, neighbor_counts, overflow_message, padding_vector


def resolve_batch_size(spec: int | str | Sequence[int], natoms: int, k: int) -> int:
    """DeePMD's batch_size: an int, per-system list, 'auto' (≥32 atoms) or 'auto:N' (≥N atoms)."""
    if isinstance(spec, str):
        target = 32 if spec == "auto" else int(spec.split(":", 1)[1])
        return max(1, math.ceil(target / natoms))
    if isinstance(spec, (list, tuple)):
        return int(spec[k])
    return int(spec)


@dataclass
class Batch:
    """Frames of one system, ready for the model."""

    rij: torch.Tensor  # [nf, nloc, nnei, 3] Å
    nlist: torch.Tensor  # [nf, nloc, nnei] int64, -1 = empty
    atype: torch.Tensor  # [nloc]
    energy: torch.Tensor  # [nf] eV
    force: torch.Tensor  # [nf, nloc, 3] eV/Å
    virial: torch.Tensor | None  # [nf, 3, 3] eV
    partner: torch.Tensor | None = None  # [nf, nloc, nnei] int64 reverse-pair slots (see DeepPot.forward_rij)

    @property
    def natoms(self) -> int:
        return int(self.atype.shape[0])


class TrainSystem:
    """One labelled system with cached neighbour lists."""

    def __init__(self, ds: xr.Dataset, source: str, type_map: Sequence[str], rcut: float, sel: Sequence[int]):
        if type_map_of(ds) != list(type_map):
            raise DataError(f"type_map {type_map_of(ds)} differs from the model's {list(type_map)}", path=source, key="type_map")
        if "energy" not in ds or "force" not in ds:
            raise DataError("training data needs energy and force labels", path=source, key="energy" if "energy" not in ds else "force")
        self.source = source
        self.name = formula(ds)
        self.rcut = float(rcut)
        self.coord = torch.from_numpy(np.ascontiguousarray(ds["coord"].values, dtype=np.float64))  # [nf, nloc, 3]
        self.cell = torch.from_numpy(np.ascontiguousarray(ds["cell"].values, dtype=np.float64))  # [nf, 3, 3]
        self.pbc = ds["pbc"].values.astype(bool)
        self.atype = torch.from_numpy(ds["atom_type"].values.astype(np.int64))  # [nloc]
        self.energy = torch.from_numpy(ds["energy"].values.astype(np.float64))  # [nf]
        self.force = torch.from_numpy(ds["force"].values.astype(np.float64))  # [nf, nloc, 3]
        self.virial = torch.from_numpy(ds["virial"].values.astype(np.float64)) if "virial" in ds else None
        self.nframes, self.natoms = int(self.coord.shape[0]), int(self.coord.shape[1])
        nnei = int(sum(sel))
        nlist = np.empty((self.nframes, self.natoms, nnei), dtype=np.int32)
        shift = np.empty((self.nframes, self.natoms, nnei, 3), dtype=np.int8)
        partner = np.empty((self.nframes, self.natoms, nnei), dtype=np.int32)
        coord, cell, atype = self.coord.numpy(), self.cell.numpy(), self.atype.numpy()
        for f in range(self.nframes):
            try:
                nl = build_neighbor_list(coord[f], cell[f], self.pbc, atype, rcut, sel)
            except TooManyNeighborsError as exc:
                raise TooManyNeighborsError(f"frame {f}: {exc.message}", path=source, key=exc.key) from None
            if nl.max_overflow:
                raise NeighborOverflowError(overflow_message(nl.overflow, sel, list(type_map), f"{source} frame {f}"), key="model.descriptor.sel")
            if np.abs(nl.shift).max(initial=0) > 127:
                raise DataError("cell far smaller than rcut (image shift > 127)", path=source, key="cell")
            nlist[f] = nl.nlist
            shift[f] = nl.shift
            partner[f] = nl.partner
        self.nlist = torch.from_numpy(nlist)
        self.partner = torch.from_numpy(partner)
        self.shift = torch.from_numpy(shift)
        self._pad = torch.from_numpy(padding_vector(rcut))

    def batch(self, frames: Sequence[int] | np.ndarray) -> Batch:
        idx = torch.as_tensor(np.asarray(frames, dtype=np.int64))
        nlist = self.nlist.index_select(0, idx).to(torch.int64)  # [nf, nloc, nnei]
        coord = self.coord.index_select(0, idx)  # [nf, nloc, 3]
        cell = self.cell.index_select(0, idx)  # [nf, 3, 3]
        shift = self.shift.index_select(0, idx).to(torch.float64)  # [nf, nloc, nnei, 3]
        nf, nloc, nnei = nlist.shape
        gathered = torch.gather(coord, 1, nlist.clamp(min=0).reshape(nf, -1, 1).expand(nf, nloc * nnei, 3)).reshape(nf, nloc, nnei, 3)
        rij = gathered + torch.einsum("fnjc,fcx->fnjx", shift, cell) - coord.unsqueeze(2)
        rij = torch.where((nlist >= 0).unsqueeze(-1), rij, self._pad)
        return Batch(
            rij=rij,
            nlist=nlist,
            atype=self.atype,
            energy=self.energy.index_select(0, idx),
            force=self.force.index_select(0, idx),
            virial=None if self.virial is None else self.virial.index_select(0, idx),
            partner=self.partner.index_select(0, idx).to(torch.int64),
        )


def max_neighbor_counts(systems: Sequence[tuple[xr.Dataset, str]], rcut: float, ntypes: int) -> np.ndarray:
    """Largest number of neighbours of each type within rcut over all frames: [ntypes]."""
    best = np.zeros(ntypes, dtype=np.int64)
    for ds, source in systems:
        coord, cell, pbc, atype = ds["coord"].values, ds["cell"].values, ds["pbc"].values, ds["atom_type"].values
        for f in range(coord.shape[0]):
            try:
                best = np.maximum(best, neighbor_counts(coord[f], cell[f], pbc, atype, rcut, ntypes).max(0))
            except TooManyNeighborsError as exc:
                raise TooManyNeighborsError(f"frame {f}: {exc.message}", path=source, key=exc.key) from None
    return best


class BatchSampler:
    """Deterministic, resumable batch order.

    Step t draws its system from ``default_rng([seed, t])``; within a system, frames are
    taken in the order of a permutation drawn from ``default_rng([seed, system, epoch])``.
    The state is the (epoch, position) of every system — a few integers.
    """

    def __init__(self, systems: Sequence[TrainSystem], batch_sizes: Sequence[int], seed: int, auto_prob: str = "prob_sys_size"):
        self.systems = list(systems)
        self.batch_sizes = list(batch_sizes)
        self.seed = int(seed)
        nbatch = np.array([max(1, s.nframes // b) for s, b in zip(self.systems, self.batch_sizes)], dtype=np.float64)
        weights = nbatch if auto_prob == "prob_sys_size" else np.ones(len(self.systems))
        self.prob = weights / weights.sum()
        self.epoch = [0] * len(self.systems)
        self.pos = [0] * len(self.systems)

    def _perm(self, k: int) -> np.ndarray:
        return np.random.default_rng([self.seed, k, self.epoch[k]]).permutation(self.systems[k].nframes)

    def next(self, step: int) -> tuple[int, np.ndarray]:
        """(system index, frame indices) for training step ``step``."""
        k = int(np.random.default_rng([self.seed, 7919, step]).choice(len(self.systems), p=self.prob)) if len(self.systems) > 1 else 0
        b = min(self.batch_sizes[k], self.systems[k].nframes)
        if self.pos[k] + b > self.systems[k].nframes:
            self.epoch[k] += 1
            self.pos[k] = 0
        frames = self._perm(k)[self.pos[k] : self.pos[k] + b]
        self.pos[k] += b
        return k, frames

    def state(self) -> dict:
        return {"epoch": list(self.epoch), "pos": list(self.pos)}

    def load_state(self, state: dict) -> None:
        if len(state["epoch"]) != len(self.systems):
            raise ValueError("checkpoint was written for a different number of training systems")
        self.epoch = [int(e) for e in state["epoch"]]
        self.pos = [int(p) for p in state["pos"]]
