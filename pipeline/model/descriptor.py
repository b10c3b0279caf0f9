"""The se_e2_a (DeepPot-SE) descriptor.

For a centre atom i with environment rows R̃ (normalised by per-type statistics, one row
per neighbour slot, ``nnei = sum(sel)`` slots) and embedding matrix G (row j = embedding
net of s_j, one net per neighbour type — or per (centre, neighbour) type pair when
``type_one_side`` is false):

    T = R̃ᵀ G / nnei            [4, M1]
    D = Tᵀ T<                   [M1, M2],  T< = first M2 = ``axis_neuron`` columns of T

D is invariant to translation, rotation and permutation of neighbours, and smooth.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from .env_mat import environment_matrix, smooth_switch
from .network import MLP


def normalized_rows(rij: torch.Tensor, davg: torch.Tensor, dstd: torch.Tensor, rcut_smth: float, rcut: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """rij [..., n, 3] (Å); davg, dstd broadcastable to [..., n, 4] -> (s_n [..., n, 1], R̃ [..., n, 4]).

    The normalised environment rows, with s_n (the embedding nets' input) returned apart.
    """
    r = torch.linalg.vector_norm(rij, dim=-1, keepdim=True)  # [..., n, 1]
    s = smooth_switch(r, rcut_smth, rcut) / r  # [..., n, 1]
    s_n = (s - davg[..., :1]) / dstd[..., :1]  # [..., n, 1]
    a_n = (s * rij / r - davg[..., 1:]) / dstd[..., 1:]  # [..., n, 3]
    return s_n, torch.cat([s_n, a_n], dim=-1)


def net_types(k: int, ntypes: int, type_one_side: bool) -> Tuple[int, int]:
    """Embedding net k -> (neighbour type it embeds, centre type it serves; -1 = every centre type)."""
    if type_one_side:
        return k, -1
    return k % ntypes, k // ntypes


class DescriptorSeA(nn.Module):
    """se_e2_a descriptor; buffers ``davg``/``dstd`` [ntypes, nnei, 4] normalise R̃ per centre type."""

    def __init__(
        self,
        ntypes: int,
        sel: Sequence[int],
        rcut: float,
        rcut_smth: float,
        neuron: Sequence[int],
        axis_neuron: int,
        resnet_dt: bool,
        type_one_side: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.ntypes = ntypes
        self.sel: List[int] = [int(s) for s in sel]
        self.sec: List[int] = [0]
        for s in self.sel:
            self.sec.append(self.sec[-1] + s)
        self.nnei = self.sec[-1]
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.m1 = int(neuron[-1])
        self.m2 = int(axis_neuron)
        self.type_one_side = bool(type_one_side)
        n_nets = ntypes if type_one_side else ntypes * ntypes
        self.embeddings = nn.ModuleList([MLP(1, neuron, resnet_dt, generator, dtype) for _ in range(n_nets)])
        self.register_buffer("davg", torch.zeros(ntypes, self.nnei, 4, dtype=dtype))
        self.register_buffer("dstd", torch.ones(ntypes, self.nnei, 4, dtype=dtype))

    @property
    def dim_out(self) -> int:
        return self.m1 * self.m2

    def normalized_env(self, rij: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """rij [nf, nloc, nnei, 3] (Å) -> normalised R̃ [nf, nloc, nnei, 4]."""
        rr = environment_matrix(rij, self.rcut_smth, self.rcut)  # [nf, nloc, nnei, 4]
        return (rr - self.davg[atype]) / self.dstd[atype]

    def _section_sums(self, s_n: torch.Tensor, rr: torch.Tensor, counts: List[int], centre_type: int) -> torch.Tensor:
        """Σ_j R̃_jᵀ G_j over the first ``counts[t]`` slots of every neighbour section.

        s_n [n, nnei, 1] and rr [n, nnei, 4] hold only those slots, section after section.
        Returns [n, 4, M1].
        """
        out: Optional[torch.Tensor] = None
        s_secs = torch.split(s_n, counts, dim=1)
        r_secs = torch.split(rr, counts, dim=1)
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            if (serves < 0 or serves == centre_type) and counts[tj] > 0:
                g_t = net(s_secs[tj])  # [n, c_t, M1]
                term = torch.matmul(r_secs[tj].transpose(1, 2), g_t)  # [n, 4, M1]
                out = term if out is None else out + term
        if out is None:  # no neighbour at all
            return torch.zeros(rr.shape[0], 4, self.m1, dtype=rr.dtype, device=rr.device)
        return out

    def _padding_sums(self, counts: List[int]) -> torch.Tensor:
        """Σ over the empty slots beyond ``counts`` of R̃_padᵀ G(s_pad), per centre type: [ntypes, 4, M1].

        An empty slot has R̃ = 0 before normalisation, so its normalised row is a constant of
        the centre type and slot: evaluating it once per type replaces evaluating it per atom.
        """
        pad = -self.davg / self.dstd  # [ntypes, nnei, 4]
        per_type: List[torch.Tensor] = [torch.zeros(4, self.m1, dtype=pad.dtype, device=pad.device) for _ in range(self.ntypes)]
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            lo, hi = self.sec[tj] + counts[tj], self.sec[tj + 1]
            if hi > lo:
                rows = pad[:, lo:hi, :]  # [ntypes, n_pad, 4]
                g = net(rows[:, :, :1])  # [ntypes, n_pad, M1]
                t = torch.matmul(rows.transpose(1, 2), g)  # [ntypes, 4, M1]
                for ti in range(self.ntypes):
                    if serves < 0 or ti == serves:
                        per_type[ti] = per_type[ti] + t[ti]
        out = torch.stack(per_type)  # [ntypes, 4, M1]
        return out

    def _padding_sums_cached(self, counts: List[int]) -> torch.Tensor:
        """:meth:`_padding_sums`, reused while the weights and statistics are unchanged.

        The padding sums depend on ``counts``, weights and statistics, not on positions: an
        inference step (MD) recomputing them would spend ~20 % of its time here. Cached only
        when no gradient can flow into the weights (frozen weights or grad mode off), keyed on
        the tensors' version counters so an in-place update (``load_state_dict``, an optimiser
        step) invalidates it.
        """
        if torch.jit.is_scripting() or self.training:
            return self._padding_sums(counts)
        return self._padding_sums_eager_cache(counts)

    @torch.jit.unused
    def _padding_sums_eager_cache(self, counts: List[int]) -> torch.Tensor:
        params = list(self.embeddings.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._padding_sums(counts)
        key = (tuple(counts), self.davg._version, self.dstd._version, self.davg.data_ptr(), self.dstd.data_ptr()) + tuple(
            (p._version, p.data_ptr()) for p in params
        )
        cache = self.__dict__.setdefault("_pad_cache", {})
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            with torch.no_grad():
                cache[key] = self._padding_sums(counts)
        return cache[key]

    def forward(self, rij: torch.Tensor, atype: torch.Tensor, counts: Optional[List[int]] = None) -> torch.Tensor:
        """rij [nf, nloc, nnei, 3] (Å), atype [nloc] -> descriptor [nf, nloc, M1*M2].

        ``counts[t]`` (optional) is how many leading slots of neighbour section t hold a real
        neighbour in any atom of the batch; slots beyond are empty everywhere and are
        accounted for exactly by :meth:`_padding_sums` instead of per atom.
        """
        nf, nloc = rij.shape[0], rij.shape[1]
        if counts is None:
            counts = self.sel
        keep = [torch.arange(self.sec[t], self.sec[t] + counts[t], device=rij.device) for t in range(self.ntypes)]
        full = sum(counts) == self.nnei
        if not full:
            index = torch.cat(keep)
            rij = rij.index_select(2, index)  # [nf, nloc, n_keep, 3]
            davg = self.davg.index_select(1, index)[atype]  # [nloc, n_keep, 4]
            dstd = self.dstd.index_select(1, index)[atype]
        else:
            davg = self.davg[atype]
            dstd = self.dstd[atype]
        n_keep = rij.shape[2]
        s_n, rr = normalized_rows(rij, davg, dstd, self.rcut_smth, self.rcut)  # [nf, nloc, n_keep, 1], [.., 4]
        if self.type_one_side:
            t = self._section_sums(s_n.reshape(nf * nloc, n_keep, 1), rr.reshape(nf * nloc, n_keep, 4), counts, -1)
            t = t.reshape(nf, nloc, 4, self.m1)
        else:
            t = torch.zeros(nf, nloc, 4, self.m1, dtype=rr.dtype, device=rr.device)
            for ti in range(self.ntypes):
                idx = torch.nonzero(atype == ti).squeeze(1)
                if idx.numel() == 0:
                    continue
                n_i = nf * idx.numel()
                s_i = s_n.index_select(1, idx).reshape(n_i, n_keep, 1)
                rr_i = rr.index_select(1, idx).reshape(n_i, n_keep, 4)  # [nf*n_i, n_keep, 4]
                t_i = self._section_sums(s_i, rr_i, counts, ti).reshape(nf, idx.numel(), 4, self.m1)
                t = t.index_copy(1, idx, t_i)
        if not full:
            t = t + self._padding_sums_cached(counts)[atype]  # [nf, nloc, 4, M1]
        t = t / self.nnei  # [nf, nloc, 4, M1]
        d = torch.matmul(t.transpose(2, 3), t[:, :, :, : self.m2])  # [nf, nloc, M1, M2]
        return d.reshape(nf, nloc, self.m1 * self.m2)
