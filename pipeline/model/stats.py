"""Statistics taken from the training data before training.

* Environment normalisation: for every (centre type, neighbour type) pair, the mean and
  standard deviation of s(r) and the root-mean-square of the angular components s·x/r
  (mean taken as 0 by symmetry), over real neighbours. Stored in DeePMD's per-slot layout
  ``davg``/``dstd`` [ntypes, nnei, 4]. A standard deviation below ``protect`` is raised to it.
* Energy bias per element: least squares of frame energies on element counts (eV/atom).
* ``sel: auto``: the largest neighbour count per type seen in the data, times a margin.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

from .env_mat import environment_matrix


class EnvStatAccumulator:
    """Running sums for the environment statistics (float64)."""

    def __init__(self, ntypes: int):
        self.ntypes = ntypes
        self.count = np.zeros((ntypes, ntypes))
        self.sum_s = np.zeros((ntypes, ntypes))
        self.sum_s2 = np.zeros((ntypes, ntypes))
        self.sum_a2 = np.zeros((ntypes, ntypes))

    def add(self, rij: torch.Tensor, nlist: torch.Tensor, atype: torch.Tensor, sel: Sequence[int], rcut_smth: float, rcut: float) -> None:
        """rij [nf, nloc, nnei, 3] Å, nlist [nf, nloc, nnei], atype [nloc]."""
        rr = environment_matrix(rij.to(torch.float64), rcut_smth, rcut).numpy()  # [nf, nloc, nnei, 4]
        real = nlist.numpy() >= 0  # [nf, nloc, nnei]
        at = atype.numpy()
        sec = np.concatenate([[0], np.cumsum(sel)])
        for ti in range(self.ntypes):
            rows = at == ti
            if not rows.any():
                continue
            for tj in range(self.ntypes):
                block = rr[:, rows, sec[tj] : sec[tj + 1], :]  # [nf, n_i, sel_j, 4]
                mask = real[:, rows, sec[tj] : sec[tj + 1]]
                vals = block[mask]  # [n_real, 4]
                self.count[ti, tj] += len(vals)
                self.sum_s[ti, tj] += vals[:, 0].sum()
                self.sum_s2[ti, tj] += (vals[:, 0] ** 2).sum()
                self.sum_a2[ti, tj] += (vals[:, 1:] ** 2).sum()

    def result(self, sel: Sequence[int], protect: float) -> tuple[np.ndarray, np.ndarray]:
        """davg, dstd [ntypes, nnei, 4] in DeePMD's per-slot layout."""
        nnei = int(sum(sel))
        sec = np.concatenate([[0], np.cumsum(sel)])
        davg = np.zeros((self.ntypes, nnei, 4))
        dstd = np.ones((self.ntypes, nnei, 4))
        for ti in range(self.ntypes):
            for tj in range(self.ntypes):
                n = self.count[ti, tj]
                if n == 0:
                    mean, std_r, std_a = 0.0, 1.0, 1.0
                else:
                    mean = self.sum_s[ti, tj] / n
                    std_r = math.sqrt(max(self.sum_s2[ti, tj] / n - mean * mean, 0.0))
                    std_a = math.sqrt(self.sum_a2[ti, tj] / (3 * n))
                davg[ti, sec[tj] : sec[tj + 1], 0] = mean
                dstd[ti, sec[tj] : sec[tj + 1], 0] = max(std_r, protect)
                dstd[ti, sec[tj] : sec[tj + 1], 1:] = max(std_a, protect)
        return davg, dstd


def fit_energy_bias(counts: np.ndarray, energies: np.ndarray, rcond: float | None = None) -> np.ndarray:
    """Per-element energy (eV) minimising Σ_frames (E − Σ_t n_t b_t)².

    counts [nframes, ntypes] element counts, energies [nframes] eV. Elements absent from the
    data get 0; an under-determined system (one composition) gets the minimum-norm solution.
    """
    counts = np.asarray(counts, dtype=np.float64)
    energies = np.asarray(energies, dtype=np.float64)
    bias = np.zeros(counts.shape[1])
    present = counts.sum(0) > 0
    if present.any():
        sol, *_ = np.linalg.lstsq(counts[:, present], energies, rcond=rcond)
        bias[present] = sol
    return bias


def auto_sel(max_counts: Iterable[int], factor: float = 1.1) -> list[int]:
    """``sel: auto``: ceil(max neighbours seen × factor), at least 1, per type."""
    return [max(1, int(math.ceil(c * factor))) for c in max_counts]
