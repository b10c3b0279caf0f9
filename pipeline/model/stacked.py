"""M same-shaped DeepPot models evaluated as one, parameters stacked on a leading model axis.

An ensemble's members share architecture, neighbour list and displacements; only weights
and data statistics differ. Stacking every weight as [M, n_in, n_out] turns each layer of
all members into one batched matmul (``torch.baddbmm``), so the per-operation cost that
dominates small systems (Python dispatch, autograd bookkeeping, allocation) is paid once
instead of M times. The computation is the one of :class:`~.descriptor.DescriptorSeA` and
:class:`~.fitting.EnergyFitting`, with a model axis in front of every tensor; tests compare
it with member-by-member evaluation.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .compress import StackedTable
from .deeppot import DeepPot
from .descriptor import net_types, normalized_rows
from .network import MLP, tanh_residual


class StackedMLP:
    """M copies of one :class:`MLP` shape; x [M, ..., n_in] -> [M, ..., n_out]."""

    def __init__(self, mlps: Sequence[MLP]):
        self.layers = []
        for k, first in enumerate(mlps[0].layers):
            members = [m.layers[k] for m in mlps]
            weight = torch.stack([m.weight.detach() for m in members])  # [M, n_in, n_out]
            bias = torch.stack([m.bias.detach() for m in members]).unsqueeze(1)  # [M, 1, n_out]
            idt = torch.stack([m.idt.detach() for m in members]).unsqueeze(1) if first.idt is not None else None  # [M, 1, n_out]
            self.layers.append((weight, bias, idt, first.shortcut, first.activation))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [M, N, n_in]
        for weight, bias, idt, shortcut, activation in self.layers:
            if activation:
                u = torch.baddbmm(bias, x, weight, beta=2.0, alpha=2.0)  # [M, N, n_out] = 2(x W + b)
                x = tanh_residual(u, x, idt, shortcut)
            else:
                x = torch.baddbmm(bias, x, weight)  # [M, N, n_out]
        return x.reshape(lead + (x.shape[-1],))

    def contract(self, x: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """x [M, n, c, 1], rr [M, n, c, 4] -> Σ_j rr_jᵀ G(x_j) [M, n, 4, M1]."""
        return torch.matmul(rr.transpose(2, 3), self(x))


class StackedDeepPot:
    """Atomic energies of M same-shaped models on per-member displacements in one pass."""

    def __init__(self, models: Sequence[DeepPot]):
        first = models[0]
        desc = first.descriptor
        self.M = len(models)
        self.ntypes = desc.ntypes
        self.sel = list(desc.sel)
        self.sec = list(desc.sec)
        self.nnei = desc.nnei
        self.rcut, self.rcut_smth = desc.rcut, desc.rcut_smth
        self.m1, self.m2 = desc.m1, desc.m2
        self.type_one_side = desc.type_one_side
        self.dtype = desc.davg.dtype
        self.davg = torch.stack([m.descriptor.davg for m in models])  # [M, ntypes, nnei, 4]
        self.dstd = torch.stack([m.descriptor.dstd for m in models])  # [M, ntypes, nnei, 4]
        if all(m.compressed for m in models):  # the members' tables (pipeline.model.compress)
            self.embeddings = [StackedTable([m.descriptor.embedding_tables[k] for m in models]) for k in range(len(desc.embeddings))]
        elif any(m.compressed for m in models):
            raise ValueError("stacking compressed with uncompressed models: compress all members or none")
        else:
            self.embeddings = [StackedMLP([m.descriptor.embeddings[k] for m in models]) for k in range(len(desc.embeddings))]
        self.fittings = [StackedMLP([m.fitting.nets[t] for m in models]) for t in range(self.ntypes)]
        self.bias_atom_e = torch.stack([m.fitting.bias_atom_e for m in models])  # [M, ntypes]
        self._pad_cache: dict = {}

    def _section_sums(self, s_n: torch.Tensor, rr: torch.Tensor, counts: List[int], centre_type: int) -> torch.Tensor:
        """s_n [M, n, n_keep, 1], rr [M, n, n_keep, 4] -> Σ_j R̃_jᵀ G_j [M, n, 4, M1]."""
        out = torch.zeros(rr.shape[0], rr.shape[1], 4, self.m1, dtype=rr.dtype)
        s_secs = torch.split(s_n, counts, dim=2)
        r_secs = torch.split(rr, counts, dim=2)
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            if (serves < 0 or serves == centre_type) and counts[tj] > 0:
                out = out + net.contract(s_secs[tj], r_secs[tj])  # [M, n, 4, M1]
        return out

    def _padding_sums(self, counts: List[int]) -> torch.Tensor:
        """Σ over slots empty in every atom of R̃_padᵀ G(s_pad) per centre type: [M, ntypes, 4, M1]."""
        pad = -self.davg / self.dstd  # [M, ntypes, nnei, 4]
        per_type = [torch.zeros(self.M, 4, self.m1, dtype=pad.dtype) for _ in range(self.ntypes)]
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            lo, hi = self.sec[tj] + counts[tj], self.sec[tj + 1]
            if hi > lo:
                rows = pad[:, :, lo:hi, :]  # [M, ntypes, n_pad, 4]
                t = torch.matmul(rows.transpose(2, 3), net(rows[..., :1]))  # [M, ntypes, 4, M1]
                for ti in range(self.ntypes):
                    if serves < 0 or ti == serves:
                        per_type[ti] = per_type[ti] + t[:, ti]
        return torch.stack(per_type, dim=1)

    def descriptor(self, rij: torch.Tensor, atype: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """rij [M, nf, nloc, nnei, 3] Å -> descriptors [M, nf, nloc, M1*M2]."""
        M, nf, nloc = rij.shape[0], rij.shape[1], rij.shape[2]
        full = sum(counts) == self.nnei
        if full:
            davg, dstd = self.davg[:, atype], self.dstd[:, atype]  # [M, nloc, nnei, 4]
        else:
            index = torch.cat([torch.arange(self.sec[t], self.sec[t] + counts[t]) for t in range(self.ntypes)])
            rij = rij.index_select(3, index)  # [M, nf, nloc, n_keep, 3]
            davg = self.davg.index_select(2, index)[:, atype]  # [M, nloc, n_keep, 4]
            dstd = self.dstd.index_select(2, index)[:, atype]
        davg, dstd = davg.unsqueeze(1), dstd.unsqueeze(1)  # [M, 1, nloc, n_keep, 4]
        n_keep = rij.shape[3]
        s_n, rr = normalized_rows(rij, davg, dstd, self.rcut_smth, self.rcut)  # [M, nf, nloc, n_keep, 1], [.., 4]
        if self.type_one_side:
            t = self._section_sums(s_n.reshape(M, nf * nloc, n_keep, 1), rr.reshape(M, nf * nloc, n_keep, 4), counts, -1)
            t = t.reshape(M, nf, nloc, 4, self.m1)
        else:
            t = torch.zeros(M, nf, nloc, 4, self.m1, dtype=rr.dtype)
            for ti in range(self.ntypes):
                idx = torch.nonzero(atype == ti).squeeze(1)
                if idx.numel() == 0:
                    continue
                n_i = nf * idx.numel()
                s_i = s_n.index_select(2, idx).reshape(M, n_i, n_keep, 1)
                rr_i = rr.index_select(2, idx).reshape(M, n_i, n_keep, 4)
                t_i = self._section_sums(s_i, rr_i, counts, ti).reshape(M, nf, idx.numel(), 4, self.m1)
                t = t.index_copy(2, idx, t_i)
        if not full:
            key = tuple(counts)
            if key not in self._pad_cache:  # weights are frozen copies: depends on counts only
                self._pad_cache[key] = self._padding_sums(counts)
            t = t + self._pad_cache[key][:, atype].unsqueeze(1)  # [M, nf, nloc, 4, M1]
        t = t / self.nnei
        d = torch.matmul(t.transpose(3, 4), t[..., : self.m2])  # [M, nf, nloc, M1, M2]
        return d.reshape(M, nf, nloc, self.m1 * self.m2)

    def atomic_energy(self, rij: torch.Tensor, atype: torch.Tensor, counts: Optional[List[int]] = None) -> torch.Tensor:
        """rij [M, nf, nloc, nnei, 3] Å (member m sees rij[m]) -> atomic energies [M, nf, nloc] eV (float64)."""
        if counts is None:
            counts = self.sel
        d = self.descriptor(rij.to(self.dtype), atype, counts)  # [M, nf, nloc, M1*M2]
        M, nf, nloc = d.shape[0], d.shape[1], d.shape[2]
        out = torch.zeros(M, nf, nloc, dtype=d.dtype)
        for t, net in enumerate(self.fittings):
            idx = torch.nonzero(atype == t).squeeze(1)
            if idx.numel() > 0:
                e_t = net(d.index_select(2, idx)).squeeze(-1) + self.bias_atom_e[:, t].view(M, 1, 1)  # [M, nf, n_t]
                out = out.index_copy(2, idx, e_t)
        return out.to(torch.float64)
