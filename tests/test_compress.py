"""Compressed inference (pipeline.model.compress): tabulated embedding nets equal the nets.

Tolerances (docs/compression.md): energies 1e-9 eV/atom, forces 1e-8 eV/Å, virials 1e-8 eV
against the nets, on random frames of a model with randomised statistics; the measured
differences are ~1e-12 (the spline's error at step 0.01 is far below both).
"""

import copy

import numpy as np
import pytest
import torch

from conftest import random_system, randomize_stats, run_model, tiny_model_config
from pipeline.model import compress as cmp
from pipeline.model.deeppot import DeepPot
from pipeline.model.ensemble import Ensemble
from pipeline.model.inputs import frame_inputs


def model_for(type_one_side=False, seed=0):
    return randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side)), seed=seed).eval()


def compressed(model, **kw):
    return copy.deepcopy(model).requires_grad_(False).compress(**kw)


def test_net_derivatives_are_exact():
    """The node data of the table: G', G'' of the forward-mode recursion against autograd."""
    net = model_for().descriptor.embeddings[1]
    x = torch.linspace(-3.0, 6.0, 37, dtype=torch.float64).requires_grad_(True)
    g, d1, d2 = cmp.net_derivatives(net, x)
    ref = net.forward_layers(x.view(-1, 1))
    np.testing.assert_allclose(g.detach(), ref.detach(), rtol=0, atol=1e-14)
    cols = range(ref.shape[1])
    grad1 = torch.stack([torch.autograd.grad(ref[:, m].sum(), x, create_graph=True)[0] for m in cols], 1)
    grad2 = torch.stack([torch.autograd.grad(grad1[:, m].sum(), x, retain_graph=True)[0] for m in cols], 1)
    np.testing.assert_allclose(d1.detach(), grad1.detach(), rtol=0, atol=1e-13)
    np.testing.assert_allclose(d2.detach(), grad2.detach(), rtol=0, atol=1e-12)


def test_table_matches_net_and_is_c2_at_nodes():
    net = model_for().descriptor.embeddings[0]
    table = cmp.EmbeddingTable(net, -2.0, 8.0, step=0.01)
    x = torch.rand(5000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 10.0 - 2.0
    exact = net.forward_layers(x.view(-1, 1)).detach()
    for reference in (False, True):
        g = table(x.view(-1, 1), reference=reference).detach()
        assert float((g - exact).abs().max()) < 1e-11
    # value, slope and curvature continuous across interior nodes: the two neighbouring pieces agree
    k = torch.arange(1, table.intervals - 1)
    c_left, c_right = table.coeffs[k - 1], table.coeffs[k]  # [K, 6, M1]
    p = torch.arange(6, dtype=torch.float64).view(1, 6, 1)
    for order in range(3):  # derivatives of Σ c_p t^p at t = 1 (left piece) and t = 0 (right piece)
        fall = torch.ones_like(p)
        for j in range(order):
            fall = fall * (p - j)
        left = (fall * c_left).sum(1)
        right = c_right[:, order] * float(np.prod(range(1, order + 1)))
        np.testing.assert_allclose(left, right, rtol=0, atol=1e-9 * (1 + float(right.abs().max())))


def test_rows_outside_the_table_use_the_net():
    """The extrapolation rule: rows below x0 or above x1 (and NaN) are the net's own values."""
    net = model_for().descriptor.embeddings[0]
    table = cmp.EmbeddingTable(net, 0.0, 1.0, step=0.01)
    x = torch.tensor([-0.5, 0.3, 1.7, 25.0, float("nan")], dtype=torch.float64).view(-1, 1).requires_grad_(True)
    g = table(x)
    exact = net.forward_layers(x)
    np.testing.assert_allclose(g[:4].detach(), exact[:4].detach(), rtol=0, atol=1e-11)
    assert torch.isnan(g[4]).all()
    (dg,) = torch.autograd.grad(g[:4].sum(), x)
    (de,) = torch.autograd.grad(exact[:4].sum(), x)
    np.testing.assert_allclose(dg[:4], de[:4], rtol=0, atol=1e-9)


@pytest.mark.parametrize("type_one_side", [False, True])
def test_compressed_model_equals_nets_on_random_frames(type_one_side):
    model = model_for(type_one_side)
    fast = compressed(model)
    assert fast.compressed and not model.compressed
    for seed in range(3):
        pos, cell, atype = random_system(14, seed=seed)
        ref, tab = run_model(model, pos, cell, atype), run_model(fast, pos, cell, atype)
        assert abs(tab["energy"] - ref["energy"]) / len(pos) < 1e-9
        np.testing.assert_allclose(tab["force"], ref["force"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(tab["virial"], ref["virial"], rtol=0, atol=1e-8)
        np.testing.assert_allclose(tab["atom_energy"], ref["atom_energy"], rtol=0, atol=1e-9)
        assert np.abs(ref["force"]).max() > 1e-3


def test_compressed_forces_are_minus_energy_gradient():
    fast = compressed(model_for())
    pos, cell, atype = random_system(10, seed=5)
    out = run_model(fast, pos, cell, atype)
    h = 1e-5
    fd = np.zeros_like(pos)
    for i in range(len(pos)):
        for a in range(3):
            p1, p2 = pos.copy(), pos.copy()
            p1[i, a] += h
            p2[i, a] -= h
            fd[i, a] = -(run_model(fast, p1, cell, atype)["energy"] - run_model(fast, p2, cell, atype)["energy"]) / (2 * h)
    np.testing.assert_allclose(out["force"], fd, atol=1e-8)


def test_smooth_at_table_nodes_and_at_rcut():
    """A pair pulled apart across many table nodes and through rcut: energy and force smooth.

    The force along the path must equal −dE/dr by finite differences everywhere (a jump of value
    or slope at a node would show as a spike), and vanish with its derivative at rcut."""
    model = model_for()
    fast = compressed(model, step=0.05)  # coarse: many nodes along the path
    cell = np.eye(3) * 20.0
    atype = np.array([0, 1])
    r = np.linspace(1.0, model.rcut + 0.2, 401)
    e = np.array([run_model(fast, np.array([[5.0, 5, 5], [5 + x, 5, 5]]), cell, atype)["energy"] for x in r])
    f = np.array([run_model(fast, np.array([[5.0, 5, 5], [5 + x, 5, 5]]), cell, atype)["force"][1, 0] for x in r])
    f_ref = np.array([run_model(model, np.array([[5.0, 5, 5], [5 + x, 5, 5]]), cell, atype)["force"][1, 0] for x in r])
    np.testing.assert_allclose(f, f_ref, rtol=0, atol=1e-7)
    dr = r[1] - r[0]
    fd = -(e[2:] - e[:-2]) / (2 * dr)
    assert np.abs(f[1:-1] - fd).max() < 1e-4  # central differences of a C² curve
    beyond = r >= model.rcut
    assert np.abs(e[beyond] - e[-1]).max() == 0.0 and np.abs(f[beyond]).max() == 0.0
    near = np.abs(f[(r > model.rcut - 0.1) & (r < model.rcut)])  # the switch takes the force to 0 with its slope
    assert np.all(np.diff(near) < 0) and near[-1] < 1e-5


def test_ensemble_of_compressed_members_with_create_graph():
    """The stacked ensemble path with tables equals the nets, including a gradient of a function
    of the forces (create_graph: the exploration bias)."""
    members = [model_for(seed=s) for s in range(3)]
    pos, cell, atype = random_system(12, seed=7)
    rij, nlist, _, _ = frame_inputs(pos[None], cell[None], (True,) * 3, atype, members[0].rcut, members[0].sel, members[0].type_map)
    ta = torch.from_numpy(atype)
    outs = []
    for ens in (Ensemble(members), Ensemble([compressed(m) for m in members])):
        assert ens.stack is not None
        out = ens.evaluate(rij, nlist, ta, create_graph=True)
        (g,) = torch.autograd.grad((out["force"] ** 2).sum(), out["rij"])
        outs.append((out, g))
    (a, ga), (b, gb) = outs
    for key in ("energy", "force", "virial"):
        np.testing.assert_allclose(b[key].detach(), a[key].detach(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(gb, ga, rtol=0, atol=1e-6)


def test_compressed_model_refuses_to_train_and_decompresses():
    fast = compressed(model_for())
    pos, cell, atype = random_system(8, seed=1)
    fast.train()
    with pytest.raises(RuntimeError, match="does not train"):
        run_model(fast, pos, cell, atype)
    fast.eval().decompress()
    assert not fast.compressed
    run_model(fast.train(), pos, cell, atype)


def test_table_range_covers_empty_slot_and_rmin():
    model = model_for()
    d = model.descriptor
    tables = cmp.tabulate_descriptor(d, rmin=0.5)
    for k, t in enumerate(tables):
        tj = k % d.ntypes
        ti = k // d.ntypes
        mean, std = float(d.davg[ti, d.sec[tj], 0]), float(d.dstd[ti, d.sec[tj], 0])
        assert t.x0 + t.h == pytest.approx(-mean / std, abs=1e-12)  # node 1 is the empty slot
        assert t.x1 >= (2.0 - mean) / std  # s = 1/0.5 Å inside
    with pytest.raises(ValueError, match="rmin"):
        cmp.tabulate_descriptor(d, rmin=d.rcut + 0.1)


def test_dpelt_test_compressed_by_default_no_compress_switch(tmp_path):
    """`dpelt test` evaluates through the tables unless --no-compress; the JSON says which,
    and both give the same errors within the tolerance."""
    import json

    from pipeline.cli import main
    from pipeline.data.frames import make_frames
    from pipeline.data.netcdf import write_frames
    from pipeline.model.serialize import save_model

    model = model_for()
    save_model(model, model.config, tmp_path / "m.pt")
    frames = [random_system(10, seed=s) for s in range(3)]
    pos = np.stack([f[0] for f in frames])
    cell = np.stack([f[1] for f in frames])
    atype = frames[0][2]
    rng = np.random.default_rng(0)
    ds = make_frames(pos, cell, atype, model.type_map, energy=rng.normal(size=3), force=rng.normal(size=pos.shape), virial=rng.normal(size=(3, 3, 3)))
    write_frames(tmp_path / "d.nc", [ds])
    results = []
    for extra in ([], ["--no-compress"]):
        assert main(["test", "-m", str(tmp_path / "m.pt"), "-s", str(tmp_path / "d.nc"), "-o", str(tmp_path / "t.json"), "--threads", "1"] + extra) == 0
        results.append(json.loads((tmp_path / "t.json").read_text()))
    assert results[0]["compressed"] is True and results[1]["compressed"] is False
    for key in ("energy_rmse_per_atom", "force_rmse", "virial_rmse_per_atom"):
        assert abs(results[0]["overall"][key] - results[1]["overall"][key]) < 1e-9
