"""Smooth environment matrix of DeepPot-SE (Zhang et al., NeurIPS 2018).

For a neighbour j of atom i at displacement r_ij (Å), distance r:

    s(r) = sw(r) / r,      R̃_ij = s(r) · (1, x/r, y/r, z/r)

with the C²-continuous switch sw = 1 for r < rcut_smth, u³(-6u² + 15u - 10) + 1 with
u = (r - rcut_smth)/(rcut - rcut_smth) in between, 0 beyond rcut. Units: s in 1/Å.
"""

from __future__ import annotations

import torch


def smooth_switch(r: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """Quintic switch: 1 below ``rcut_smth``, 0 above ``rcut``; value, slope and curvature continuous."""
    u = (r - rcut_smth) / (rcut - rcut_smth)
    poly = u * u * u * (-6.0 * u * u + 15.0 * u - 10.0) + 1.0
    one = torch.ones_like(r)
    zero = torch.zeros_like(r)
    return torch.where(r < rcut_smth, one, torch.where(r < rcut, poly, zero))


def environment_matrix(rij: torch.Tensor, rcut_smth: float, rcut: float) -> torch.Tensor:
    """R̃ from displacements.

    rij: [..., nnei, 3] in Å (empty slots placed beyond ``rcut``).
    Returns [..., nnei, 4]: s(r)·(1, x/r, y/r, z/r).
    """
    r = torch.linalg.vector_norm(rij, dim=-1, keepdim=True)  # [..., nnei, 1]
    s = smooth_switch(r, rcut_smth, rcut) / r  # [..., nnei, 1]
    return torch.cat([s, s * rij / r], dim=-1)  # [..., nnei, 4]
