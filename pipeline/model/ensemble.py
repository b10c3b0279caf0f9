"""An ensemble of DeepPot models evaluated together on one neighbour list.

Members of one ELT iteration share their architecture (same config, same data, different
seeds), so their parameters are stacked and evaluated in one batched pass
(:class:`~.stacked.StackedDeepPot`): neighbour list, displacements and Python dispatch are
paid once.
Per-model forces come from one backward pass by giving every model its own copy of the
displacements. Members with different network shapes are evaluated one after the other on
the same neighbour list (cut-off and ``sel`` must agree).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from ..errors import ModelFileError
from .deeppot import DeepPot, scatter_forces, virial_from_grad
from .stacked import StackedDeepPot


def _shapes(m: DeepPot) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()) + (m.descriptor.type_one_side, m.compressed)


class Ensemble:
    """M models -> energies [M, nf], forces [M, nf, nloc, 3], virials [M, nf, 3, 3] in one call."""

    def __init__(self, models: Sequence[DeepPot], paths: Sequence[str | None] | None = None):
        """``paths`` (optional, one per model): the model files, named in errors."""
        if not models:
            raise ModelFileError("an ensemble needs at least one model")
        where = list(paths) if paths is not None else [None] * len(models)
        self.models = [m.eval() for m in models]
        first = self.models[0]
        for k, m in enumerate(self.models[1:], 1):
            if list(m.type_map) != list(first.type_map):
                raise ModelFileError(f"ensemble member {k} has type_map {m.type_map}, member 0 ({where[0] or 'a loaded model'}) has {first.type_map}", path=where[k], key="type_map")
            if m.rcut != first.rcut or list(m.sel) != list(first.sel):
                raise ModelFileError(
                    f"ensemble member {k} has rcut {m.rcut}, sel {m.sel}; member 0 ({where[0] or 'a loaded model'}) has rcut {first.rcut}, sel {first.sel}: members must share the neighbour list",
                    path=where[k],
                    key="sel",
                )
        self.type_map = list(first.type_map)
        self.rcut = first.rcut
        self.sel = list(first.sel)
        self.stacked = len(self.models) > 1 and len({_shapes(m) for m in self.models}) == 1
        self.stack = StackedDeepPot(self.models) if self.stacked else None

    def __len__(self) -> int:
        return len(self.models)

    def evaluate(
        self,
        rij: torch.Tensor,
        nlist: torch.Tensor,
        atype: torch.Tensor,
        do_virial: bool = True,
        create_graph: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Evaluate every member on the same displacements.

        rij [nf, nloc, nnei, 3] Å, nlist [nf, nloc, nnei] (built with ``self.rcut``, ``self.sel``).
        Returns ``energy`` [M, nf] eV, ``atom_energy`` [M, nf, nloc], ``force`` [M, nf, nloc, 3]
        eV/Å, ``virial`` [M, nf, 3, 3] eV and ``rij`` [M, nf, nloc, nnei, 3], the per-member leaf
        the forces were taken against (``create_graph`` lets callers differentiate functions of
        the forces, e.g. a bias on the force deviation).
        """
        M = len(self.models)
        counts = self.models[0].section_counts(nlist)
        rij_m = rij.detach().to(torch.float64).unsqueeze(0).repeat(M, 1, 1, 1, 1).requires_grad_(True)  # [M, nf, nloc, nnei, 3]
        if self.stack is not None:
            atom_energy = self.stack.atomic_energy(rij_m, atype, counts)  # [M, nf, nloc]
        else:
            atom_energy = torch.stack([m.atomic_energy(rij_m[k], atype, counts) for k, m in enumerate(self.models)])
        e = atom_energy.sum(-1)  # [M, nf]
        grads = torch.autograd.grad([e.sum()], [rij_m], create_graph=create_graph, allow_unused=True)
        g = torch.zeros_like(rij_m) if grads[0] is None else grads[0]  # [M, nf, nloc, nnei, 3] = ∂E_m/∂rij
        out = {"energy": e, "atom_energy": atom_energy, "force": scatter_forces(g, nlist), "rij": rij_m}
        if do_virial:
            out["virial"] = -virial_from_grad(g, rij_m)  # [M, nf, 3, 3]
        return out
