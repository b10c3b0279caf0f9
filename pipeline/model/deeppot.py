"""DeepPot: se_e2_a descriptor + energy fitting; forces and virial by autograd.

The model works on displacements ``rij`` [nf, nloc, nnei, 3] (Å) in the padded,
type-sectioned neighbour layout of :mod:`pipeline.model.neighbor`. The energy depends on
positions only through rij, so one gradient g = ∂E/∂rij gives

    F_i = Σ_j g_ij − Σ_{k: i ∈ N(k)} g_ki       (eV/Å)
    Ξ   = −Σ_ij g_ij ⊗ r_ij                      (eV; Ξ_ab = −Σ g_a r_b)

for periodic (any triclinic cell, via image shifts) and free systems alike.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .compress import TABLE_RMIN, TABLE_STEP, describe, log, tabulate_descriptor
from .config import ModelConfig
from .descriptor import DescriptorSeA
from .fitting import EnergyFitting


def scatter_forces(g: torch.Tensor, nlist: torch.Tensor) -> torch.Tensor:
    """Atomic forces (eV/Å) from g = ∂E/∂rij.

    g [B, nf, nloc, nnei, 3] (B models or 1), nlist [nf, nloc, nnei] -> [B, nf, nloc, 3]:
    F_i = Σ_j g_ij − Σ_k g_ki (empty slots carry zero gradient).
    """
    B, nf, nloc = g.shape[0], g.shape[1], g.shape[2]
    offset = (torch.arange(nf, device=nlist.device) * nloc).view(nf, 1, 1)
    index = (nlist.clamp(min=0) + offset).reshape(1, -1, 1).expand(B, -1, 3)  # [B, nf*nloc*nnei, 3]
    # scatter_add, not index_add: under use_deterministic_algorithms index_add takes a
    # sorting path ~8x slower on CPU; scatter_add accumulates in index order (deterministic).
    force = g.sum(3).reshape(B, nf * nloc, 3).scatter_add(1, index, -g.reshape(B, -1, 3))
    return force.reshape(B, nf, nloc, 3)


def virial_from_grad(g: torch.Tensor, rij: torch.Tensor) -> torch.Tensor:
    """Σ_ij g_ij ⊗ r_ij per model and frame (eV; the virial is its negative).

    g, rij [B, nf, nloc, nnei, 3] -> [B, nf, 3, 3], entry [a, b] = Σ g_a r_b. One batched
    matmul over all pairs (an einsum here takes a ~4x slower path).
    """
    B, nf = g.shape[0], g.shape[1]
    out = torch.bmm(g.reshape(B * nf, -1, 3).transpose(1, 2), rij.reshape(B * nf, -1, 3))  # [B*nf, 3, 3]
    return out.reshape(B, nf, 3, 3)


class DeepPot(nn.Module):
    """A Deep Potential energy model (se_e2_a). ``sel`` must be concrete (not "auto")."""

    def __init__(self, config: ModelConfig, sel: Optional[List[int]] = None, seed: int = 0):
        super().__init__()
        d, f = config.descriptor, config.fitting_net
        if sel is None:
            if isinstance(d.sel, str):
                raise ValueError("sel is 'auto': resolve it from data before building the model")
            sel = list(d.sel)
        dtype = config.dtype
        self.config = config
        gen = torch.Generator().manual_seed(int(d.seed if d.seed is not None else seed))
        self.type_map: List[str] = list(config.type_map)
        self.ntypes = len(self.type_map)
        self.rcut = float(d.rcut)
        self.sel: List[int] = [int(s) for s in sel]
        self.sel_offsets: List[int] = [0]
        for s in self.sel:
            self.sel_offsets.append(self.sel_offsets[-1] + s)
        self.descriptor = DescriptorSeA(
            self.ntypes, self.sel, d.rcut, d.rcut_smth, d.neuron, d.axis_neuron, d.resnet_dt, d.type_one_side, gen, dtype
        )
        gen_fit = torch.Generator().manual_seed(int(f.seed if f.seed is not None else seed + 1))
        self.fitting = EnergyFitting(self.ntypes, self.descriptor.dim_out, f.neuron, f.resnet_dt, gen_fit, dtype)
        self.dtype_name = "float32" if dtype == torch.float32 else "float64"
        if not d.trainable:
            self.descriptor.embeddings.requires_grad_(False)
        if not f.trainable:
            self.fitting.nets.requires_grad_(False)

    @torch.jit.unused
    def compress(self, step: float = TABLE_STEP, rmin: float = TABLE_RMIN) -> "DeepPot":
        """Tabulate the embedding nets for inference (:mod:`.compress`) and switch to eval mode;
        logged. ``step``: grid step of the normalised input; ``rmin`` (Å): closer pairs fall
        back to the nets. Tables follow the weights and statistics of now: call again after
        changing them. Returns the model."""
        self.eval()
        self.descriptor.embedding_tables = tabulate_descriptor(self.descriptor, step, rmin)
        log.info("model compressed: %s; pairs closer than %g Å use the nets", describe(self.descriptor.embedding_tables), rmin)
        return self

    @torch.jit.unused
    def decompress(self) -> "DeepPot":
        """Back to evaluating the embedding nets (logged). Returns the model."""
        if self.descriptor.embedding_tables is not None:
            log.info("model decompressed: the embedding nets evaluate again")
        self.descriptor.embedding_tables = None
        return self

    @property
    def compressed(self) -> bool:
        """Whether the embedding nets are tabulated (:meth:`compress`)."""
        return self.descriptor.embedding_tables is not None

    @property
    def model_dtype(self) -> torch.dtype:
        return self.descriptor.davg.dtype

    @torch.jit.export
    def section_counts(self, nlist: torch.Tensor) -> List[int]:
        """Per neighbour type, the largest number of occupied slots of any atom in ``nlist``."""
        occupied = (nlist >= 0).sum(dim=(0, 1))  # [nnei]: atoms using each slot
        counts: List[int] = []
        for t in range(self.ntypes):
            used = torch.nonzero(occupied[self.sel_offsets[t] : self.sel_offsets[t + 1]])
            counts.append(int(used.max().item()) + 1 if used.numel() > 0 else 0)
        return counts

    @torch.jit.export
    def atomic_energy(self, rij: torch.Tensor, atype: torch.Tensor, counts: Optional[List[int]] = None, partner: Optional[torch.Tensor] = None) -> torch.Tensor:
        """rij [nf, nloc, nnei, 3] Å, atype [nloc] -> atomic energies [nf, nloc] (eV, float64).

        ``counts`` (from :meth:`section_counts`) lets the descriptor skip slots empty in every
        atom; ``partner`` (the neighbour list's reverse-pair slots) lets it embed each
        same-type pair once.
        """
        rij = rij.to(self.descriptor.davg.dtype)
        d = self.descriptor(rij, atype, counts, partner)  # [nf, nloc, M1*M2]
        return self.fitting(d, atype).to(torch.float64)  # [nf, nloc]

    @torch.jit.export
    def forward_rij(
        self,
        rij: torch.Tensor,
        nlist: torch.Tensor,
        atype: torch.Tensor,
        do_force: bool = True,
        do_virial: bool = True,
        create_graph: bool = False,
        partner: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Energy, atomic energies, forces and virial from displacements.

        rij [nf, nloc, nnei, 3] Å (empty slots beyond rcut), nlist [nf, nloc, nnei] (-1 = empty),
        atype [nloc]. ``create_graph`` keeps the force graph for force-matching training.
        ``partner`` [nf, nloc, nnei] (optional; ``frame_inputs`` and training batches give it):
        for each slot i→j the frame-local flat slot (atom·nnei + slot) of j→i, −1 = none; the
        same-type pairs then share one embedding evaluation (~25 % fewer rows; the same energy,
        forces to rounding). It must come from the neighbour list ``rij`` was built from (a
        linked pair whose two lengths differ raises ValueError).
        Returns ``energy`` [nf] eV, ``atom_energy`` [nf, nloc] eV, ``force`` [nf, nloc, 3] eV/Å,
        ``virial`` [nf, 3, 3] eV.
        """
        if do_force and not rij.requires_grad:
            rij = rij.detach().requires_grad_(True)
        atom_energy = self.atomic_energy(rij, atype, self.section_counts(nlist), partner)  # [nf, nloc]
        energy = atom_energy.sum(1)  # [nf]
        out: Dict[str, torch.Tensor] = {"energy": energy, "atom_energy": atom_energy}
        if do_force:
            g0: Optional[torch.Tensor] = None
            if energy.requires_grad:  # not so for a system without atoms
                g0 = torch.autograd.grad([energy.sum()], [rij], create_graph=create_graph, allow_unused=True)[0]
            g = torch.zeros_like(rij) if g0 is None else g0  # None: no atom has a neighbour
            g = g.to(torch.float64)  # [nf, nloc, nnei, 3] = ∂E/∂rij
            out["force"] = scatter_forces(g.unsqueeze(0), nlist)[0]  # [nf, nloc, 3]
            if do_virial:
                out["virial"] = -virial_from_grad(g.unsqueeze(0), rij.to(torch.float64).unsqueeze(0))[0]  # [nf, 3, 3]
        return out

    @torch.jit.export
    def displacements(self, coord: torch.Tensor, nlist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """coord [nf, nloc, 3], nlist [nf, nloc, nnei], shift [nf, nloc, nnei, 3] (Cartesian image
        shift, Å) -> rij [nf, nloc, nnei, 3] with empty slots moved beyond rcut."""
        nf, nloc, nnei = nlist.shape[0], nlist.shape[1], nlist.shape[2]
        idx = nlist.clamp(min=0).reshape(nf, nloc * nnei, 1).expand(nf, nloc * nnei, 3)
        neigh = torch.gather(coord, 1, idx).reshape(nf, nloc, nnei, 3)
        rij = neigh + shift - coord.unsqueeze(2)
        far = torch.zeros_like(rij)
        far[..., 0] = 2.0 * self.rcut + 1.0
        return torch.where((nlist >= 0).unsqueeze(-1), rij, far)

    def forward(self, coord: torch.Tensor, atype: torch.Tensor, nlist: torch.Tensor, shift: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Frozen-model entry: coord [nf, nloc, 3] Å, atype [nloc], nlist [nf, nloc, nnei],
        shift [nf, nloc, nnei, 3] Å -> energy, atom_energy, force, virial (float64)."""
        rij = self.displacements(coord, nlist, shift).detach()
        return self.forward_rij(rij, nlist, atype, True, True, False, None)
