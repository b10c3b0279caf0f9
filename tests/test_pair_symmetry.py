"""Same-type pairs embedded once.

The neighbour list links every slot i→j to the slot of the reverse pair j→i (``partner``).
When i and j have the same type, both slots feed the same embedding net the same input, so
the descriptor evaluates it once. These tests check the links against a brute-force pair
search, and the shared evaluation against the separate one: energies, forces, virial,
force-training gradients, TorchScript, several frames, cells shorter than rcut, statistics
that forbid sharing.
"""

import itertools

import numpy as np
import pytest
import torch

from conftest import random_system, randomize_stats, tiny_model_config
from pipeline.model import descriptor as descriptor_module
from pipeline.model.deeppot import DeepPot
from pipeline.model.inputs import frame_inputs
from pipeline.model.neighbor import build_neighbor_list

RCUT = 4.0


def brute_force_pairs(pos: np.ndarray, cell: np.ndarray, rcut: float) -> set:
    """Every ordered (i, j, image shift) within rcut, by trying all shifts up to ±3."""
    out = set()
    for s in itertools.product(range(-3, 4), repeat=3):
        d = pos[None, :, :] + np.asarray(s) @ cell - pos[:, None, :]  # [i, j, 3]
        for i, j in zip(*np.nonzero(np.linalg.norm(d, axis=-1) < rcut)):
            if i != j or any(s):
                out.add((int(i), int(j), s))
    return out


@pytest.mark.parametrize("n, scale", [(14, 5.0), (6, 3.0)])  # 3.0: the cell is shorter than rcut (self images)
def test_partner_is_the_reverse_pair(n, scale):
    pos, cell, atype = random_system(n, seed=2, cell_scale=scale)
    nl = build_neighbor_list(pos, cell, (True,) * 3, atype, RCUT, (120, 120))
    assert nl.max_overflow == 0
    natoms, nnei = nl.nlist.shape
    flat, partner = nl.nlist.reshape(-1), nl.partner.reshape(-1)
    real = flat >= 0
    assert (partner[real] >= 0).all() and (partner[~real] == -1).all()
    p = partner[real]
    assert np.array_equal(partner[p], np.flatnonzero(real))  # a pairing: the partner's partner is the slot
    centre = np.repeat(np.arange(natoms), nnei)
    assert np.array_equal(flat[p], centre[real])  # the partner slot lists the centre atom
    shift = nl.shift.reshape(-1, 3)
    assert np.array_equal(shift[p], -shift[real])
    rij = nl.rij.reshape(-1, 3)
    assert np.array_equal(rij[p], -rij[real])  # exactly negated: the same distance to the last bit
    listed = {(int(c), int(j), tuple(int(x) for x in s)) for c, j, s in zip(centre[real], flat[real], shift[real])}
    assert listed == brute_force_pairs(pos, cell, RCUT)


def test_partner_after_overflow():
    pos, cell, atype = random_system(16, seed=3, cell_scale=5.0)
    nl = build_neighbor_list(pos, cell, (True,) * 3, atype, RCUT, (3, 3))  # most neighbours dropped
    assert nl.max_overflow > 0
    real, partner = nl.nlist.reshape(-1) >= 0, nl.partner.reshape(-1)
    linked = partner >= 0
    assert 0 < linked.sum() < real.sum()  # some reverse pairs were dropped: those slots have no partner
    assert not (linked & ~real).any()
    p = partner[linked]
    assert np.array_equal(partner[p], np.flatnonzero(linked))
    rij = nl.rij.reshape(-1, 3)
    assert np.array_equal(rij[p], -rij[linked])


@pytest.fixture
def shared_rows(monkeypatch):
    """Record (rows evaluated, rows laid out, width groups) of every shared evaluation."""
    seen = []
    original = descriptor_module.DescriptorSeA._shared_rows

    def recording(self, s_t, rep, order, groups):
        x, take = original(self, s_t, rep, order, groups)
        seen.append((int(x.shape[0]), sum(int(t.numel()) for t in take), len(take)))
        return x, take

    monkeypatch.setattr(descriptor_module.DescriptorSeA, "_shared_rows", recording)
    return seen


def two_frames(model: DeepPot, n: int = 24, scale: float = 6.0, seed: int = 4):
    pos, cell, atype = random_system(n, seed=seed, cell_scale=scale)
    moved = pos + np.random.default_rng(seed).normal(scale=0.1, size=pos.shape)
    fi = frame_inputs(np.stack([pos, moved]), np.stack([cell, cell]), (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    return fi.rij, fi.nlist, torch.from_numpy(atype), fi.partner


def assert_same(a: dict, b: dict):
    for key, tol in (("energy", 1e-12), ("atom_energy", 1e-12), ("force", 1e-11), ("virial", 1e-11)):
        scale = max(1.0, float(a[key].abs().max()))
        assert float((a[key] - b[key]).abs().max()) <= tol * scale, key


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("n, scale", [(24, 6.0), (8, 3.2)])
@pytest.mark.parametrize("group_rows", [128, 1])  # 1: several width groups share one evaluation
def test_shared_equals_separate(type_one_side, n, scale, group_rows, shared_rows):
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side, sel=(90, 90))))
    model.descriptor.group_rows = group_rows
    rij, nlist, atype, partner = two_frames(model, n, scale)
    separate = model.forward_rij(rij, nlist, atype, True, True, False)
    assert not shared_rows
    shared = model.forward_rij(rij, nlist, atype, True, True, False, partner)
    assert shared_rows and all(evaluated < laid_out for evaluated, laid_out, _ in shared_rows)
    evaluated, laid_out, _ = map(sum, zip(*shared_rows))
    assert evaluated < 0.85 * laid_out  # about half the pairs are same-type; each is evaluated once
    if group_rows == 1:
        assert max(groups for _, _, groups in shared_rows) > 1
    assert_same(separate, shared)


def test_force_training_gradients_equal(shared_rows):
    """Force training differentiates the force graph: the shared rows' gradients must add up."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True)))
    model.descriptor.group_rows = 1  # several width groups
    rij, nlist, atype, partner = two_frames(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(p):
        out = model.forward_rij(rij, nlist, atype, True, True, True, p)
        loss = out["energy"].pow(2).sum() + out["force"].pow(2).sum() + out["virial"].pow(2).sum()
        return torch.autograd.grad(loss, params)

    for a, b in zip(grads(None), grads(partner)):
        assert float((a - b).abs().max()) <= 1e-10 * max(1.0, float(a.abs().max()))
    assert shared_rows


def test_torchscript_shares_too():
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True))).requires_grad_(False)
    model.descriptor.group_rows = 1
    rij, nlist, atype, partner = two_frames(model)
    scripted = torch.jit.script(model)
    assert_same(model.forward_rij(rij, nlist, atype, True, True, False), scripted.forward_rij(rij, nlist, atype, True, True, False, partner))


def test_no_sharing_when_statistics_differ_between_slots(shared_rows):
    """Slot-dependent statistics give the two slots of a pair different inputs: no sharing
    at all; then sharing only in the section whose statistics are uniform."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True)))
    rij, nlist, atype, partner = two_frames(model)
    d = model.descriptor
    with torch.no_grad():
        for t in range(d.ntypes):
            d.davg[t, d.sec[t] : d.sec[t + 1], 0] += 0.01 * torch.arange(d.sel[t], dtype=d.davg.dtype)
    assert d._mates(partner, atype, d.sel, torch.arange(d.nnei), torch.linalg.vector_norm(rij, dim=-1)) is None
    assert_same(model.forward_rij(rij, nlist, atype, True, True, False), model.forward_rij(rij, nlist, atype, True, True, False, partner))
    assert not shared_rows
    with torch.no_grad():
        d.davg[0, d.sec[0] : d.sec[1], 0] = d.davg[0, d.sec[0], 0]  # type 0's own section uniform again
    mates = d._mates(partner, atype, d.sel, torch.arange(d.nnei), torch.linalg.vector_norm(rij, dim=-1))
    shared_centres = atype[torch.nonzero((mates >= 0).any(-1))[:, 1]]
    assert len(shared_centres) and (shared_centres == 0).all()
    assert_same(model.forward_rij(rij, nlist, atype, True, True, False), model.forward_rij(rij, nlist, atype, True, True, False, partner))
    assert len(shared_rows) == 1


def test_partner_from_another_list_is_refused():
    """Displacements moved after the list was built (one direction only) no longer match their
    reverse pair: sharing would silently use the wrong embedding, so it is an error."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True)))
    rij, nlist, atype, partner = two_frames(model)
    moved = rij.clone()
    same = (partner[0, 0] >= 0) & (nlist[0, 0] >= 0) & (atype[nlist[0, 0].clamp(min=0)] == atype[0])
    slot = int(torch.nonzero(same)[0])
    moved[0, 0, slot] *= 1.01
    with pytest.raises(ValueError, match="partner does not match rij"):
        model.forward_rij(moved, nlist, atype, True, True, False, partner)
    model.forward_rij(moved, nlist, atype, True, True, False)  # without partner: fine
