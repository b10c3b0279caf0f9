"""Model inputs (displacements and neighbour lists) for frames given as arrays."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch

from .neighbor import build_neighbor_list, overflow_message
from ..errors import NeighborOverflowError, TooManyNeighborsError


class FrameInputs(NamedTuple):
    """Model inputs of a system's frames (see :func:`frame_inputs`)."""

    rij: torch.Tensor  # [nf, natoms, nnei, 3] float64 displacements, Å
    nlist: torch.Tensor  # [nf, natoms, nnei] int64, -1 = empty
    overflow: int  # largest neighbour overflow seen (0 = none)
    partner: torch.Tensor  # [nf, natoms, nnei] int64: flat slot of the reverse pair in its frame, -1 = none


def frame_inputs(
    coord: np.ndarray,
    cell: np.ndarray,
    pbc: Sequence[bool],
    atype: np.ndarray,
    rcut: float,
    sel: Sequence[int],
    type_map: Sequence[str],
    on_overflow: str = "error",
    where: str = "frame",
) -> FrameInputs:
    """Displacements and neighbour lists for frames of one system.

    coord [nf, natoms, 3] Å, cell [nf, 3, 3] Å, atype [natoms].
    Returns rij [nf, natoms, nnei, 3] (float64), nlist [nf, natoms, nnei] (int64), the
    largest neighbour overflow seen (0 = none) and the reverse-pair slots ``partner``
    [nf, natoms, nnei] (int64; pass it to ``DeepPot.forward_rij``). ``on_overflow``: "error"
    raises :class:`NeighborOverflowError`; "ignore" keeps the nearest ``sel`` (the caller reports).
    """
    coord = np.asarray(coord, dtype=np.float64)
    cell = np.asarray(cell, dtype=np.float64)
    nf = coord.shape[0]
    rijs, nlists, partners, worst = [], [], [], 0
    for f in range(nf):
        try:
            nl = build_neighbor_list(coord[f], cell[f], pbc, atype, rcut, sel)
        except TooManyNeighborsError as exc:
            raise TooManyNeighborsError(f"{where} {f}: {exc.message}", key=exc.key) from None
        if nl.max_overflow:
            if on_overflow == "error":
                raise NeighborOverflowError(overflow_message(nl.overflow, sel, type_map, f"{where} {f}"), key="sel")
            worst = max(worst, nl.max_overflow)
        rijs.append(nl.rij)
        nlists.append(nl.nlist)
        partners.append(nl.partner)
    return FrameInputs(torch.from_numpy(np.stack(rijs)), torch.from_numpy(np.stack(nlists)), worst, torch.from_numpy(np.stack(partners)))
