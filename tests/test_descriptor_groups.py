"""The descriptor's width groups and padding sums against a brute-force evaluation.

The descriptor evaluates the embedding nets only on slots an atom really uses (grouping atoms
of similar neighbour counts) and adds every other slot from per-type padding sums. These
tests compare it with an oracle that evaluates every slot of every atom, with slot-dependent
statistics and a neighbour beyond rcut inside the list, for energies, forces, virial and the
parameter gradients of force training (a second derivative).
"""

import itertools
import random

import numpy as np
import pytest
import torch

from conftest import random_system, randomize_stats, tiny_model_config
from pipeline.model import descriptor as descriptor_module
from pipeline.model.deeppot import DeepPot, virial_from_grad
from pipeline.model.serialize import freeze_model
from pipeline.model.descriptor import net_types, normalized_rows, padding_cache, width_groups
from pipeline.model.inputs import frame_inputs


def brute_force_atomic_energy(model: DeepPot, rij: torch.Tensor, atype: torch.Tensor) -> torch.Tensor:
    """Every slot of every atom through its embedding net; no skipping, no grouping."""
    d = model.descriptor
    nf, nloc, nnei, _ = rij.shape
    s_n, rr = normalized_rows(rij, d.davg[atype], d.dstd[atype], d.rcut_smth, d.rcut)  # [nf, nloc, nnei, 1|4]
    t = torch.zeros(nf, nloc, 4, d.m1, dtype=rr.dtype)
    for k, net in enumerate(d.embeddings):
        tj, serves = net_types(k, d.ntypes, d.type_one_side)
        sl = slice(d.sec[tj], d.sec[tj + 1])
        g = net(s_n[:, :, sl])  # [nf, nloc, sel_t, M1]
        term = torch.einsum("fisa,fism->fiam", rr[:, :, sl], g)  # [nf, nloc, 4, M1]
        if serves >= 0:
            term = term * (atype == serves).to(term.dtype)[None, :, None, None]
        t = t + term
    t = t / d.nnei
    desc = torch.einsum("fiam,fian->fimn", t, t[..., : d.m2]).reshape(nf, nloc, -1)
    return model.fitting(desc, atype)


def slot_dependent_stats(model: DeepPot, seed: int = 5) -> DeepPot:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d = model.descriptor
        d.davg[:, :, 0] += 0.05 * torch.rand(d.ntypes, d.nnei, generator=g)
        d.dstd.mul_(1.0 + 0.2 * torch.rand(d.ntypes, d.nnei, 4, generator=g))
    return model


def inputs_with_far_neighbour(model: DeepPot, n: int, seed: int):
    """rij, nlist, atype of two frames of a random dense system. In frame 1, one listed
    neighbour of atom 0 is moved beyond rcut (it stays in the list), and atoms 1-10 lose every
    neighbour of type 0 (those slots now hold a point beyond rcut)."""
    pos, cell, atype = random_system(n, seed=seed, cell_scale=6.0)
    moved = pos + np.random.default_rng(seed).normal(scale=0.05, size=pos.shape)
    rij, nlist, _, _ = frame_inputs(np.stack([pos, moved]), np.stack([cell, cell]), (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    rij = rij.clone()
    listed = torch.nonzero(nlist[1, 0] >= 0).squeeze(1)
    j = int(listed[len(listed) // 2])  # a slot in the middle of atom 0's list
    rij[1, 0, j] *= 1.3 * model.rcut / float(rij[1, 0, j].norm())  # now beyond rcut, still listed
    first = slice(0, model.sel[0])
    rij[1, 1:11, first] = 2.0 * model.rcut  # no neighbour of type 0 within rcut (nlist unchanged)
    return rij, nlist, torch.from_numpy(atype)


@pytest.fixture
def count_groups(monkeypatch):
    """Record the groups each call of width_groups chose."""
    seen = []
    original = descriptor_module.width_groups

    def recording(widths, max_groups, group_rows):
        out = original(widths, max_groups, group_rows)
        seen.append(out)
        return out

    monkeypatch.setattr(descriptor_module, "width_groups", recording)
    return seen


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("max_groups", [1, 4])
@pytest.mark.parametrize("per_slot_stats", [True, False], ids=["stats per slot", "stats per section"])
def test_grouped_evaluation_equals_brute_force(type_one_side, max_groups, per_slot_stats, count_groups):
    """Grouped evaluation with the padding slots summed once per type equals evaluating every
    slot: with statistics that differ from slot to slot (suffix sums) and, as the data gives
    them, the same in every slot of a section (multiples of one padding row)."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side, sel=(30, 30))))
    if per_slot_stats:
        model = slot_dependent_stats(model)
    assert model.descriptor._uniform_sections() == [not per_slot_stats] * 2
    model.descriptor.max_groups, model.descriptor.group_rows = max_groups, 0  # group whenever it saves a row
    rij, nlist, atype = inputs_with_far_neighbour(model, 30, seed=9)
    out = model.forward_rij(rij, nlist, atype, True, True, True)
    if max_groups > 1:
        assert max(len(g) for g in count_groups) > 1, "the test must exercise several groups"
        assert any(len(g) > 1 and g[0][2] == 0 for g in count_groups), "and a group of atoms with no neighbour in a section"
    ref_rij = rij.clone().requires_grad_(True)
    ref_e = brute_force_atomic_energy(model, ref_rij, atype)  # [nf, nloc]
    (ref_g,) = torch.autograd.grad(ref_e.sum(), ref_rij, create_graph=True)
    torch.testing.assert_close(out["atom_energy"], ref_e, rtol=0, atol=1e-12)
    # F_i = Σ_slots ∂E/∂r_ij − Σ_{slots holding i} ∂E/∂r_ki, frame by frame
    received = torch.stack([
        torch.zeros_like(out["force"][f]).index_add_(0, nlist[f].clamp(min=0).reshape(-1), (ref_g[f] * (nlist[f] >= 0).unsqueeze(-1)).reshape(-1, 3))
        for f in range(rij.shape[0])
    ])
    ref_force = ref_g.sum(2) - received  # [nf, nloc, 3]
    assert ref_force.abs().max() > 1e-3
    torch.testing.assert_close(out["force"], ref_force, rtol=0, atol=1e-10)
    ref_virial = -virial_from_grad(ref_g.unsqueeze(0), rij.unsqueeze(0))[0]  # [nf, 3, 3]
    torch.testing.assert_close(out["virial"], ref_virial, rtol=0, atol=1e-10)
    # force training: the parameter gradients of a force loss (a second derivative) agree
    params = [p for p in model.parameters() if p.requires_grad]
    loss = (out["force"] ** 2).sum()
    ref_loss = (ref_force**2).sum()
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    ref_grads = torch.autograd.grad(ref_loss, params, allow_unused=True)
    for p, a, b in zip(params, grads, ref_grads):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_frozen_inference_with_groups_equals_brute_force(count_groups):
    """Eval mode with frozen weights caches the padding sums; grouping still exact."""
    model = slot_dependent_stats(randomize_stats(DeepPot(tiny_model_config(type_one_side=True, sel=(30, 30))))).eval().requires_grad_(False)
    model.descriptor.max_groups, model.descriptor.group_rows = 4, 0
    rij, nlist, atype = inputs_with_far_neighbour(model, 30, seed=10)
    for _ in range(2):  # second call uses the cache
        out = model.forward_rij(rij, nlist, atype, True, True, False)
    assert max(len(g) for g in count_groups) > 1
    assert padding_cache(model.descriptor)
    ref = brute_force_atomic_energy(model, rij, atype)
    torch.testing.assert_close(out["atom_energy"], ref, rtol=0, atol=1e-12)
    with torch.no_grad():  # statistics changed in place: the cached padding sums must follow
        model.descriptor.davg[:, :, 0] += 0.03
    moved = model.forward_rij(rij, nlist, atype, True, True, False)["atom_energy"]
    torch.testing.assert_close(moved, brute_force_atomic_energy(model, rij, atype), rtol=0, atol=1e-12)
    assert (moved - ref).abs().max() > 1e-6


def test_torchscript_with_groups_equals_eager(tmp_path, request):
    model = slot_dependent_stats(randomize_stats(DeepPot(tiny_model_config(type_one_side=False, sel=(30, 30)))))
    model.descriptor.max_groups, model.descriptor.group_rows = 4, 0
    scripted = torch.jit.load(str(freeze_model(model, tmp_path / "frozen.pth")))
    assert scripted.descriptor.group_rows == 0
    rij, nlist, atype = inputs_with_far_neighbour(model, 30, seed=11)
    count_groups = request.getfixturevalue("count_groups")  # after scripting: the recorder is not scriptable
    eager = model.forward_rij(rij, nlist, atype, True, True, False)
    assert max(len(g) for g in count_groups) > 1
    frozen = scripted.forward_rij(rij, nlist, atype, True, True, False)
    for key in ("energy", "force", "virial", "atom_energy"):
        torch.testing.assert_close(frozen[key], eager[key], rtol=0, atol=1e-12)


def test_nan_displacement_is_not_hidden_by_grouping():
    """A NaN beyond the other atoms' widths must still reach the energy (bad input is never silently dropped)."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True, sel=(30, 30))))
    model.descriptor.max_groups, model.descriptor.group_rows = 4, 0
    rij, nlist, atype = inputs_with_far_neighbour(model, 30, seed=9)
    rij, nlist = rij[:1].clone(), nlist[:1]  # one frame
    listed = nlist[0] >= 0  # [nloc, nnei]
    last = int(torch.nonzero(listed.any(0)).max())  # the last slot any atom uses
    holders = torch.nonzero(listed[:, last]).squeeze(1)
    rij[0, holders[1:], last] = 2.0 * model.rcut  # only one atom keeps a neighbour within rcut there
    rij[0, holders[0], last] = float("nan")  # ... and it is NaN: the slot must not be skipped
    out = model.forward_rij(rij, nlist, atype, True, False, False)
    assert torch.isnan(out["energy"][0])


def _brute_best(widths, max_groups, group_rows):
    n = len(widths)
    best = None
    cuts_allowed = [i for i in range(1, n) if widths[i] != widths[i - 1]]
    for g in range(0, max_groups):
        for cuts in itertools.combinations(cuts_allowed, g):
            bounds = [0, *cuts, n]
            cost = sum((bounds[i + 1] - bounds[i]) * widths[bounds[i + 1] - 1] + group_rows for i in range(len(bounds) - 1))
            best = cost if best is None else min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_width_groups_is_optimal_and_covers_every_atom(seed):
    rnd = random.Random(seed)
    n = rnd.randint(1, 12)
    widths = sorted(rnd.randint(0, 9) for _ in range(n))
    max_groups, group_rows = rnd.randint(1, 4), rnd.choice([0, 1, 5, 40])
    groups = width_groups(widths, max_groups, group_rows)
    assert 1 <= len(groups) <= max_groups
    assert groups[0][0] == 0 and groups[-1][1] == n
    for (a, e, w), nxt in zip(groups, groups[1:] + [None]):
        assert a < e and w == max(widths[a:e]) and (nxt is None or nxt[0] == e)
    cost = sum((e - a) * w + group_rows for a, e, w in groups)
    assert cost == _brute_best(widths, max_groups, group_rows)


def test_width_groups_single_group_for_uniform_or_costly_groups():
    assert width_groups([3, 3, 3], 4, 0) == [(0, 3, 3)]
    assert width_groups([1, 2, 3, 30], 4, 10_000) == [(0, 4, 30)]
    assert width_groups([1, 1, 1, 30], 4, 0) == [(0, 3, 1), (3, 4, 30)]
    assert np.sum([e - a for a, e, _ in width_groups(list(range(50)), 4, 3)]) == 50


def test_width_groups_many_distinct_widths_stays_valid_and_cheap():
    rnd = random.Random(3)
    widths = sorted(rnd.randint(0, 300) for _ in range(2000))
    groups = width_groups(widths, 4, 128)
    assert 2 <= len(groups) <= 4 and groups[0][0] == 0 and groups[-1][1] == len(widths)
    for (a, e, w), nxt in zip(groups, groups[1:] + [None]):
        assert w == max(widths[a:e]) and (nxt is None or nxt[0] == e)
    rows = sum((e - a) * w for a, e, w in groups)
    assert rows < 0.7 * len(widths) * widths[-1]  # most of the padding is gone


def test_freeze_after_frozen_inference(tmp_path):
    """The padding cache lives outside the module: scripting, deepcopy and saving never see it."""
    import copy

    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True))).eval().requires_grad_(False)
    rij, nlist, atype = inputs_with_far_neighbour(model, 12, seed=3)
    eager = model.forward_rij(rij, nlist, atype, True, True, False)
    assert padding_cache(model.descriptor)
    assert not padding_cache(copy.deepcopy(model).descriptor)
    scripted = torch.jit.load(str(freeze_model(model, tmp_path / "frozen.pth")))
    torch.testing.assert_close(scripted.forward_rij(rij, nlist, atype, True, True, False)["energy"], eager["energy"], rtol=0, atol=1e-12)
