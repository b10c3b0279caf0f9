"""The se_e2_a (DeepPot-SE) descriptor.

For a centre atom i with environment rows R̃ (normalised by per-type statistics, one row
per neighbour slot, ``nnei = sum(sel)`` slots) and embedding matrix G (row j = embedding
net of s_j, one net per neighbour type — or per (centre, neighbour) type pair when
``type_one_side`` is false):

    T = R̃ᵀ G / nnei            [4, M1]
    D = Tᵀ T<                   [M1, M2],  T< = first M2 = ``axis_neuron`` columns of T

D is invariant to translation, rotation and permutation of neighbours, and smooth.

Evaluation. An empty slot, or a listed neighbour at r ≥ rcut, has R̃ = 0 before
normalisation: its normalised row depends only on the centre type and the slot. So the
embedding nets run only on the slots an atom really uses; the rest are added from per-type
sums computed once (:meth:`DescriptorSeA._pad_suffix_sums`). Since atoms use different
numbers of slots, atoms are sorted by that number and cut into a few groups
(:func:`width_groups`), each padded only to its own widest atom: in liquid water this
evaluates ~11 % fewer embedding rows than padding every atom to the widest one.

Pair sharing. A pair i→j and its reverse j→i have the same distance. When i and j are of the
same type, both slots feed the same embedding net the same s_n (the statistics of a centre
type are the same in every slot of a section, as :mod:`.stats` makes them), so given the
neighbour list's reverse-pair slots (``partner``) the net runs once per such pair and both
slots take its row (:meth:`DescriptorSeA._mates`): in liquid water 27 % fewer rows, the
same energy, forces to rounding. Without ``partner`` (TorchScript's ``forward``) every slot
is evaluated.
"""


from typing import List, Optional, Sequence, Tuple

import weakref

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


# Cached padding sums of frozen descriptors, kept outside the modules: an attribute would be
# copied by deepcopy and torch.save and would stop torch.jit.script (it cannot type the cache).
_PADDING_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


_UNIFORM_CACHES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def padding_cache(descriptor: nn.Module) -> dict:
    """The padding-sum cache of one descriptor (empty until frozen inference fills it)."""
    return _PADDING_CACHES.setdefault(descriptor, {})


def width_groups(widths: List[int], max_groups: int, group_rows: int) -> List[Tuple[int, int, int]]:
    """Cut atoms sorted by slot width into at most ``max_groups`` runs [(start, end, width)].

    ``widths`` ascending; a run is evaluated up to its largest width, so it costs
    (end − start) × width rows, plus ``group_rows`` for the fixed cost of one more group.
    Dynamic programming over the distinct widths gives the cheapest cut (over blocks of
    them when there are more than 16: 0.06 % more rows than the optimum in liquid water, and a
    search that stays well under a millisecond, also in TorchScript).
    """
    values: List[int] = []
    ends: List[int] = []
    total = 0
    for i, w in enumerate(widths):
        total += w
        if len(values) > 0 and values[-1] == w:
            ends[-1] = i + 1
        else:
            values.append(w)
            ends.append(i + 1)
    n = len(widths)
    m = len(values)
    if m <= 1 or max_groups <= 1 or n * values[-1] - total < group_rows:  # no cut can pay for itself
        return [(0, n, values[-1] if m > 0 else 0)]
    if m > 16:  # many distinct widths: cut only between 16 blocks of them, keeping the O(G m²) search cheap
        stride = (m + 15) // 16
        keep = list(range(stride - 1, m - 1, stride)) + [m - 1]
        values = [values[i] for i in keep]
        ends = [ends[i] for i in keep]
        m = len(values)
    inf = 1 << 62
    # best[g][j]: cheapest cover of the first j distinct widths by g runs; back[g][j]: where the last run starts
    best = [[inf] * (m + 1) for _ in range(max_groups + 1)]
    back = [[0] * (m + 1) for _ in range(max_groups + 1)]
    best[0][0] = 0
    for g in range(1, max_groups + 1):
        for j in range(1, m + 1):
            stop = ends[j - 1]
            for i in range(j):
                prev = best[g - 1][i]
                if prev < inf:
                    cost = prev + (stop - (ends[i - 1] if i > 0 else 0)) * values[j - 1] + group_rows
                    if cost < best[g][j]:
                        best[g][j] = cost
                        back[g][j] = i
    g_best = 1
    for g in range(2, max_groups + 1):
        if best[g][m] < best[g_best][m]:
            g_best = g
    runs: List[Tuple[int, int, int]] = []
    j = m
    g = g_best
    while j > 0:
        i = back[g][j]
        runs.append((ends[i - 1] if i > 0 else 0, ends[j - 1], values[j - 1]))
        j = i
        g -= 1
    runs.reverse()
    return runs


class _GatherRows(torch.autograd.Function):
    """(g [R_u, M], idx_1 [R_1], idx_2 [R_2], …) -> (g[idx_1], g[idx_2], …).

    The backward accumulates every output's gradient into one [R_u, M] buffer; autograd
    would instead give each ``index_select`` its own zero-filled [R_u, M] gradient and sum
    them. Under ``create_graph`` it is made of differentiable ops (force training).
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, *rows: torch.Tensor):
        ctx.save_for_backward(*rows)
        ctx.shape = g.shape
        return tuple(g.index_select(0, r) for r in rows)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        rows = ctx.saved_tensors
        acc: Optional[torch.Tensor] = None
        for r, gr in zip(rows, grads):
            if gr is None:
                continue
            if acc is None:
                acc = torch.zeros(ctx.shape, dtype=gr.dtype, device=gr.device)
            acc = acc.index_add(0, r, gr) if torch.is_grad_enabled() else acc.index_add_(0, r, gr)
        return (acc,) + (None,) * len(rows)


def gather_rows(g: torch.Tensor, rows: List[torch.Tensor]) -> List[torch.Tensor]:
    """[g[r] for r in rows] for g [R_u, M]; one accumulating backward in eager mode (:class:`_GatherRows`)."""
    if torch.jit.is_scripting():
        out: List[torch.Tensor] = []
        for r in rows:
            out.append(g.index_select(0, r))
        return out
    return list(_GatherRows.apply(g, *rows))


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
        self.max_groups = 4  # width groups per neighbour section (see width_groups)
        self.group_rows = 128  # rows one more group must save to be worth its fixed cost
        self.register_buffer("davg", torch.zeros(ntypes, self.nnei, 4, dtype=dtype))
        self.register_buffer("dstd", torch.ones(ntypes, self.nnei, 4, dtype=dtype))
        # None: the nets evaluate; a list of compress.EmbeddingTable: set by DeepPot.compress()
        self.embedding_tables = None

    @property
    def dim_out(self) -> int:
        return self.m1 * self.m2

    def normalized_env(self, rij: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
        """rij [nf, nloc, nnei, 3] (Å) -> normalised R̃ [nf, nloc, nnei, 4]."""
        rr = environment_matrix(rij, self.rcut_smth, self.rcut)  # [nf, nloc, nnei, 4]
        return (rr - self.davg[atype]) / self.dstd[atype]

    def _pad_suffix_sums(self) -> List[torch.Tensor]:
        """Per embedding net k (neighbour section t): S_k [ntypes * (sel_t + 1), 4, M1] with
        S_k[ti * (sel_t + 1) + c] = Σ over slots c, c+1, …, sel_t − 1 of R̃_padᵀ G(s_pad).

        An empty slot (or a neighbour at r ≥ rcut) has R̃ = 0 before normalisation, so its
        normalised row is a constant of the centre type ti and the slot: the slots an atom
        leaves out beyond width c add exactly S_k[ti, c], evaluated once per type instead of
        per atom.
        """
        pad = -self.davg / self.dstd  # [ntypes, nnei, 4]
        uniform = self._uniform_sections()
        out: List[torch.Tensor] = []
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            rows = pad[:, self.sec[tj] : self.sec[tj + 1], :]  # [ntypes, sel_t, 4]
            if uniform[tj]:  # every slot the same row: S_k[ti, c] = (sel_t − c) · R̃_padᵀ G(s_pad)
                one = rows[:, :1, :]  # [ntypes, 1, 4]
                per = one.transpose(1, 2) * net(one[:, :, :1])  # [ntypes, 4, M1]
                left = torch.arange(self.sel[tj], -1, -1, dtype=pad.dtype, device=pad.device)  # [sel_t + 1] slots from c on
                out.append((left.view(1, -1, 1, 1) * per.unsqueeze(1)).reshape(-1, 4, self.m1))  # [ntypes*(sel_t+1), 4, M1]
            else:
                g = net(rows[:, :, :1])  # [ntypes, sel_t, M1]
                per_slot = rows.unsqueeze(-1) * g.unsqueeze(-2)  # [ntypes, sel_t, 4, M1]
                suffix = per_slot.flip(1).cumsum(1).flip(1)  # [ntypes, sel_t, 4, M1]
                zero = torch.zeros(self.ntypes, 1, 4, self.m1, dtype=pad.dtype, device=pad.device)
                out.append(torch.cat([suffix, zero], dim=1).reshape(-1, 4, self.m1))  # [ntypes*(sel_t+1), 4, M1]
        return out

    def _uniform_sections(self) -> List[bool]:
        """Per neighbour type t: whether every slot of section t has the same statistics for
        every centre type (as :mod:`.stats` makes them), so that the padding rows are all equal
        and their suffix sums are multiples of one row (all False in TorchScript)."""
        if torch.jit.is_scripting():
            return [False] * self.ntypes
        return self._uniform_sections_eager()

    @torch.jit.unused
    def _uniform_sections_eager(self) -> List[bool]:
        key = ("uniform", self.davg._version, self.dstd._version, self.davg.data_ptr(), self.dstd.data_ptr())
        cache = _UNIFORM_CACHES.setdefault(self, {})
        if key not in cache:
            flags: List[bool] = []
            for t in range(self.ntypes):
                a, b = self.sec[t], self.sec[t + 1]
                same = self.sel[t] > 0
                for stat in (self.davg, self.dstd):
                    same = same and bool((stat[:, a:b] == stat[:, a : a + 1]).all())
                flags.append(same)
            cache.clear()
            cache[key] = flags
        return cache[key]

    def _pad_suffix_sums_cached(self) -> List[torch.Tensor]:
        """:meth:`_pad_suffix_sums`, reused while the weights and statistics are unchanged.

        They depend on weights and statistics, not on positions: an inference step (MD)
        recomputing them would spend a noticeable share of its time there. Cached only when no
        gradient can flow into the weights (frozen weights or grad mode off), keyed on the
        tensors' version counters so an in-place update (``load_state_dict``, an optimiser
        step) invalidates it.
        """
        if torch.jit.is_scripting() or self.training:
            return self._pad_suffix_sums()
        return self._pad_suffix_sums_eager_cache()

    @torch.jit.unused
    def _pad_suffix_sums_eager_cache(self) -> List[torch.Tensor]:
        params = list(self.embeddings.parameters())
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._pad_suffix_sums()
        key = (self.davg._version, self.dstd._version, self.davg.data_ptr(), self.dstd.data_ptr()) + tuple(
            (p._version, p.data_ptr()) for p in params
        )
        cache = padding_cache(self)
        if key not in cache:
            cache.clear()
            with torch.no_grad():
                cache[key] = self._pad_suffix_sums()
        return cache[key]

    def _width_plan(self, width: torch.Tensor) -> Tuple[torch.Tensor, List[Tuple[int, int, int]]]:
        """Plan the width groups of one neighbour section.

        ``width`` [n]: slots an atom really uses (1 + its last slot with r < rcut). Atoms are
        sorted by width and cut into a few groups (:func:`width_groups`), each evaluated up to
        its widest atom. Returns (order [n] of the sorted atoms, the groups).
        """
        order = torch.argsort(width, stable=True)  # [n]
        sorted_widths: List[int] = width.index_select(0, order).tolist()
        return order, width_groups(sorted_widths, self.max_groups, self.group_rows)

    def _group_inputs(self, s_t: torch.Tensor, order: torch.Tensor, groups: List[Tuple[int, int, int]]) -> List[torch.Tensor]:
        """The embedding nets' input of every group of :meth:`_width_plan`: one [n_g * w_g, 1]
        per group, from s_t [n, c, 1] (the section's first c slots)."""
        if len(groups) == 1:  # one group: no reordering
            return [s_t[:, : groups[0][2]].reshape(-1, 1)]
        s_sorted = s_t.index_select(0, order)  # [n, c, 1]
        rows: List[torch.Tensor] = []
        for a, e, w in groups:
            rows.append(s_sorted[a:e, :w].reshape(-1, 1))  # [(e-a)*w, 1]
        return rows

    def _group_sums(self, gs: List[torch.Tensor], r_t: torch.Tensor, order: torch.Tensor, groups: List[Tuple[int, int, int]], centre: torch.Tensor, pad_sums: torch.Tensor, sel_t: int) -> torch.Tensor:
        """Σ_j R̃_jᵀ G_j over one section for n atoms [n, 4, M1], from the embeddings ``gs``
        (one [n_g * w_g, M1] per group) of :meth:`_group_inputs`' rows; r_t [n, c, 4];
        ``centre`` [n] the centre types. Every slot an atom's group leaves out is added
        exactly from ``pad_sums``.
        """
        n = r_t.shape[0]
        if len(groups) == 1:
            w = groups[0][2]
            pad = pad_sums.index_select(0, centre * (sel_t + 1) + w)  # [n, 4, M1]
            if w == 0:
                return pad
            return torch.matmul(r_t[:, :w].transpose(1, 2), gs[0].reshape(n, w, self.m1)) + pad  # [n, 4, M1]
        r_sorted = r_t.index_select(0, order)  # [n, c, 4]
        terms: List[torch.Tensor] = []
        widths: List[int] = []
        counts: List[int] = []
        for k in range(len(groups)):
            a, e, w = groups[k]
            widths.append(w)
            counts.append(e - a)
            if w > 0:
                terms.append(torch.matmul(r_sorted[a:e, :w].transpose(1, 2), gs[k].reshape(e - a, w, self.m1)))  # [n_g, 4, M1]
            else:
                terms.append(torch.zeros(e - a, 4, self.m1, dtype=r_t.dtype, device=r_t.device))
        w_sorted = torch.repeat_interleave(torch.tensor(widths, device=order.device), torch.tensor(counts, device=order.device))  # [n]
        out_sorted = torch.cat(terms) + pad_sums.index_select(0, centre.index_select(0, order) * (sel_t + 1) + w_sorted)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n, device=order.device)
        return out_sorted.index_select(0, inverse)  # [n, 4, M1]

    def _mates(self, partner: torch.Tensor, atype: torch.Tensor, counts: List[int], index: torch.Tensor, r: torch.Tensor) -> Optional[torch.Tensor]:
        """Kept slots whose embedding is that of another slot: [nf, nloc, n_keep] → the global
        kept position (f·nloc + atom)·n_keep + slot of the reverse pair's slot, else −1.

        partner [nf, nloc, nnei]: frame-local flat slot (atom·nnei + slot) of the reverse
        pair, −1 = none; ``index`` [n_keep]: the kept slots. A pair i→j and its reverse j→i
        have the same distance; when i and j are of the same type, both slots feed the same
        embedding net the same input s_n (provided the statistics are the same in every slot of
        that type's own section, as :mod:`.stats` makes them), so G is evaluated once. None
        when no slot qualifies. ``r`` [nf, nloc, nnei] (Å): the slots' lengths, from the
        displacements of the same neighbour list; a linked pair whose two lengths differ raises
        ValueError.
        """
        nf, nloc = partner.shape[0], partner.shape[1]
        n_keep = index.shape[0]
        kept = torch.full((self.nnei,), -1, dtype=torch.long, device=partner.device)  # full slot -> kept slot
        kept[index] = torch.arange(n_keep, device=partner.device)
        sec_type = torch.empty(n_keep, dtype=torch.long, device=partner.device)  # neighbour type of each kept slot
        uniform: List[bool] = []
        off = 0
        for t in range(self.ntypes):
            sec_type[off : off + counts[t]] = t
            off += counts[t]
            mean = self.davg[t, self.sec[t] : self.sec[t + 1], 0]
            std = self.dstd[t, self.sec[t] : self.sec[t + 1], 0]
            uniform.append(self.sel[t] > 0 and bool((mean == mean[0]).all()) and bool((std == std[0]).all()))
        if not any(uniform):
            return None
        p = partner.index_select(2, index)  # [nf, nloc, n_keep]
        pc = p.clamp(min=0)
        slot2 = kept[pc % self.nnei]  # [nf, nloc, n_keep]: the reverse pair's kept slot
        same = atype.view(1, nloc, 1) == sec_type.view(1, 1, n_keep)  # centre type == neighbour type
        ok = (p >= 0) & (slot2 >= 0) & same & torch.tensor(uniform, device=partner.device)[atype].view(1, nloc, 1)
        if not bool(ok.any()):
            return None
        r_self = r.index_select(2, index)  # [nf, nloc, n_keep]
        r_mate = torch.gather(r.reshape(nf, nloc * self.nnei), 1, pc.reshape(nf, nloc * n_keep)).reshape(nf, nloc, n_keep)
        if bool((ok & ((r_self - r_mate).abs() > 1e-9 * r_self + 1e-12)).any()):
            raise ValueError(
                "partner does not match rij: a pair i->j and its reverse j->i have different lengths; "
                "pass the partner array of the neighbour list these displacements were built from (frame_inputs)"
            )
        frame = torch.arange(nf, device=partner.device).view(nf, 1, 1)
        glob = (frame * nloc + torch.div(pc, self.nnei, rounding_mode="floor")) * n_keep + slot2
        return torch.where(ok, glob, torch.full_like(glob, -1))

    def _representatives(self, mate: torch.Tensor, rows: Optional[torch.Tensor], n_keep: int, offset: int) -> Optional[torch.Tensor]:
        """mate [n, c] (global kept positions of one section, or −1) -> [n, c]: for every slot the
        flat position (row·c + slot) in this section whose embedding it uses — itself, or its
        reverse pair's slot when that comes first. None when no slot borrows."""
        n, c = mate.shape[0], mate.shape[1]
        m = mate.clamp(min=0)
        g_row = torch.div(m, n_keep, rounding_mode="floor")  # global row of the reverse pair's atom
        q = m - g_row * n_keep - offset  # its slot within this section
        row2 = rows[g_row] if rows is not None else g_row
        pos2 = row2 * c + q
        own = torch.arange(n * c, device=mate.device).view(n, c)
        borrow = (mate >= 0) & (pos2 < own)
        if not bool(borrow.any()):
            return None
        return torch.where(borrow, pos2, own)

    def _shared_rows(self, s_t: torch.Tensor, rep: torch.Tensor, order: torch.Tensor, groups: List[Tuple[int, int, int]]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Embedding-net input with one row per distinct representative slot (``rep`` [n, c],
        from :meth:`_representatives`; s_t [n, c, 1]) -> (x [R_u, 1], per group the rows of
        the net's output [n_g * w_g] that give the group's embeddings, laid out as
        :meth:`_group_inputs` lays out its rows)."""
        n, c = rep.shape[0], rep.shape[1]
        atoms = order if len(groups) > 1 else torch.arange(n, device=rep.device)
        reps: List[torch.Tensor] = []
        sizes: List[int] = []
        flat_rep = rep.reshape(-1)
        for a, e, w in groups:
            pos = (atoms[a:e].view(-1, 1) * c + torch.arange(w, device=rep.device).view(1, -1)).reshape(-1)  # [n_g * w]
            reps.append(flat_rep.index_select(0, pos))
            sizes.append((e - a) * w)
        want = torch.cat(reps)  # [R]: representative of every row the groups evaluate
        need = torch.zeros(n * c, dtype=torch.bool, device=rep.device)
        need[want] = True
        unique = torch.nonzero(need).squeeze(1)  # [R_u]
        compact = torch.cumsum(need.long(), 0) - 1  # flat position -> row of ``unique``
        x = s_t.reshape(n * c, 1).index_select(0, unique)  # [R_u, 1]
        return x, list(torch.split(compact.index_select(0, want), sizes))

    def _section_sums(
        self,
        s_n: torch.Tensor,
        rr: torch.Tensor,
        inside: torch.Tensor,
        counts: List[int],
        centre: torch.Tensor,
        centre_type: int,
        pad: List[torch.Tensor],
        mate: Optional[torch.Tensor] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Σ over every slot of R̃_jᵀ G_j for n atoms [n, 4, M1], empty slots included.

        s_n [n, n_keep, 1], rr [n, n_keep, 4], inside [n, n_keep] (r < rcut) hold the first
        ``counts[t]`` slots of every section, section after section; ``centre`` [n] the
        atoms' types; ``centre_type`` ≥ 0 restricts to the nets serving that type. ``mate``
        [n, n_keep] (from :meth:`_mates`, rows global; ``rows`` maps a global row to this
        batch's row) lets a slot reuse the embedding of its reverse pair's slot.
        """
        out: Optional[torch.Tensor] = None
        s_secs = torch.split(s_n, counts, dim=1)
        r_secs = torch.split(rr, counts, dim=1)
        in_secs = torch.split(inside, counts, dim=1)
        m_secs: List[torch.Tensor] = []
        if mate is not None:
            m_secs = torch.split(mate, counts, dim=1)
        for k, net in enumerate(self.embeddings):
            tj, serves = net_types(k, self.ntypes, self.type_one_side)
            if serves < 0 or serves == centre_type:
                c = counts[tj]
                tabulated = not torch.jit.is_scripting() and self._tabulated()
                if c > 0 and tabulated:  # every kept slot through the table, in one fused pass
                    term = self._table_sums(k, s_secs[tj], r_secs[tj]) + pad[k].index_select(0, centre * (self.sel[tj] + 1) + c)
                elif c > 0:
                    slot = torch.arange(1, c + 1, device=rr.device)  # [c]
                    width = (in_secs[tj].long() * slot).amax(dim=1)  # [n]
                    order, groups = self._width_plan(width)
                    rep: Optional[torch.Tensor] = None
                    if len(m_secs) > 0:
                        rep = self._representatives(m_secs[tj], rows, sum(counts), sum(counts[:tj]))
                    gs: List[torch.Tensor] = []
                    if rep is not None:
                        x_u, take = self._shared_rows(s_secs[tj], rep, order, groups)
                        if torch.jit.is_scripting() or x_u.shape[0] == 0:
                            g_u = net(x_u) if x_u.shape[0] > 0 else x_u.expand(0, self.m1)  # [R_u, M1]
                            gs = gather_rows(g_u, take)  # [n_g * w_g, M1] per group
                        else:
                            gs = net.rows_of(x_u, take)  # fused at inference: no [R_u, M1] gradient buffer
                    else:
                        for x in self._group_inputs(s_secs[tj], order, groups):  # one net call per group: no split of one big output (its backward copies it)
                            gs.append(net(x) if x.shape[0] > 0 else x)  # [n_g * w_g, M1]
                    term = self._group_sums(gs, r_secs[tj], order, groups, centre, pad[k], self.sel[tj])
                else:
                    term = pad[k].index_select(0, centre * (self.sel[tj] + 1))
                out = term if out is None else out + term
        if out is None:  # no net serves these atoms (cannot happen for a complete model)
            return torch.zeros(rr.shape[0], 4, self.m1, dtype=rr.dtype, device=rr.device)
        return out

    @torch.jit.unused
    def _tabulated(self) -> bool:
        """Whether the embedding nets are replaced by their tables (:mod:`.compress`)."""
        if self.embedding_tables is None:
            return False
        if self.training:
            raise RuntimeError("a compressed model does not train: call decompress() (or load the model again) first")
        return True

    @torch.jit.unused
    def _table_sums(self, k: int, s_n: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """Σ_j R̃_jᵀ G_k(s_j) by embedding net k's table: s_n [n, c, 1], rr [n, c, 4] -> [n, 4, M1]."""
        return self.embedding_tables[k].contract(s_n, rr)

    def forward(self, rij: torch.Tensor, atype: torch.Tensor, counts: Optional[List[int]] = None, partner: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rij [nf, nloc, nnei, 3] (Å), atype [nloc] -> descriptor [nf, nloc, M1*M2].

        ``counts[t]`` (optional) is how many leading slots of neighbour section t hold a real
        neighbour in any atom of the batch; slots beyond are empty everywhere. Slots empty or
        beyond rcut are evaluated once per centre type (:meth:`_pad_suffix_sums`), not per atom.
        ``partner`` [nf, nloc, nnei] (optional, the neighbour list's reverse-pair slots) lets
        the two slots of a same-type pair share one embedding evaluation (:meth:`_mates`).
        """
        nf, nloc = rij.shape[0], rij.shape[1]
        if counts is None:
            counts = self.sel
        keep = [torch.arange(self.sec[t], self.sec[t] + counts[t], device=rij.device) for t in range(self.ntypes)]
        index = torch.cat(keep)  # [n_keep]
        r = torch.linalg.vector_norm(rij.detach(), dim=-1)  # [nf, nloc, nnei]
        mate: Optional[torch.Tensor] = None
        if partner is not None and (torch.jit.is_scripting() or not self._tabulated()):  # tables evaluate every slot
            mate = self._mates(partner, atype, counts, index, r)  # [nf, nloc, n_keep] or None
        if sum(counts) != self.nnei:
            rij = rij.index_select(2, index)  # [nf, nloc, n_keep, 3]
            r = r.index_select(2, index)  # [nf, nloc, n_keep]
            davg = self.davg.index_select(1, index)[atype]  # [nloc, n_keep, 4]
            dstd = self.dstd.index_select(1, index)[atype]
        else:
            davg = self.davg[atype]
            dstd = self.dstd[atype]
        n_keep = rij.shape[2]
        s_n, rr = normalized_rows(rij, davg, dstd, self.rcut_smth, self.rcut)  # [nf, nloc, n_keep, 1], [.., 4]
        # [nf, nloc, n_keep]: r < rcut as in smooth_switch; a NaN counts as inside, so it reaches the energy
        inside = torch.logical_not(r >= self.rcut)
        pad = self._pad_suffix_sums_cached()
        if self.type_one_side:
            centre = atype.repeat(nf)  # [nf*nloc]
            mate_rows: Optional[torch.Tensor] = None
            if mate is not None:
                mate_rows = mate.reshape(nf * nloc, n_keep)
            t = self._section_sums(
                s_n.reshape(nf * nloc, n_keep, 1), rr.reshape(nf * nloc, n_keep, 4), inside.reshape(nf * nloc, n_keep), counts, centre, -1, pad, mate_rows
            )
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
                in_i = inside.index_select(1, idx).reshape(n_i, n_keep)
                centre = torch.full((n_i,), ti, dtype=torch.long, device=rr.device)
                mate_i: Optional[torch.Tensor] = None
                rows: Optional[torch.Tensor] = None
                if mate is not None:
                    mate_i = mate.index_select(1, idx).reshape(n_i, n_keep)
                    local = torch.full((nloc,), -1, dtype=torch.long, device=rr.device)  # atom -> its row among type ti
                    local[idx] = torch.arange(idx.numel(), device=rr.device)
                    rows = (torch.arange(nf, device=rr.device).view(nf, 1) * idx.numel() + local.view(1, nloc)).reshape(-1)  # global row -> row here
                t_i = self._section_sums(s_i, rr_i, in_i, counts, centre, ti, pad, mate_i, rows).reshape(nf, idx.numel(), 4, self.m1)
                t = t.index_copy(1, idx, t_i)
        t = t / self.nnei  # [nf, nloc, 4, M1]
        d = torch.matmul(t.transpose(2, 3), t[:, :, :, : self.m2])  # [nf, nloc, M1, M2]
        return d.reshape(nf, nloc, self.m1 * self.m2)
