"""Energy fitting: one network per element maps the descriptor to an atomic energy (eV).

E_i = F_{type(i)}(D_i) + b_{type(i)}, where the per-element bias b is fitted by least
squares to the training energies before training (so the nets learn deviations only).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .network import MLP


class EnergyFitting(nn.Module):
    """Per-element fitting nets plus the energy bias buffer ``bias_atom_e`` [ntypes] (eV)."""

    def __init__(
        self,
        ntypes: int,
        dim_in: int,
        neuron: Sequence[int],
        resnet_dt: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.ntypes = ntypes
        self.nets = nn.ModuleList([MLP(dim_in, neuron, resnet_dt, generator, dtype, n_out=1) for _ in range(ntypes)])
        self.register_buffer("bias_atom_e", torch.zeros(ntypes, dtype=dtype))

    def forward(self, descriptor: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """descriptor [nf, nloc, dim], atype [nloc] -> atomic energies [nf, nloc] (eV)."""
        nf, nloc = descriptor.shape[0], descriptor.shape[1]
        out = torch.zeros(nf, nloc, dtype=descriptor.dtype, device=descriptor.device)
        for t, net in enumerate(self.nets):
            idx = torch.nonzero(atype == t).squeeze(1)
            if idx.numel() > 0:
                e_t = net(descriptor.index_select(1, idx)).squeeze(-1) + self.bias_atom_e[t]  # [nf, n_t]
                out = out.index_copy(1, idx, e_t)
        return out
