"""Physics of the se_e2_a model: derivatives, invariances, smoothness, precision."""

import copy

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from conftest import random_system, randomize_stats, run_model, tiny_model_config
from pipeline.model.deeppot import DeepPot
from pipeline.model.descriptor import padding_cache


def model_for(type_one_side=False, precision="float64", **kw):
    return randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side, precision=precision, **kw)))


@pytest.mark.parametrize("type_one_side", [False, True])
@pytest.mark.parametrize("pbc", [(True, True, True), (False, False, False), (True, True, False)])
def test_forces_are_minus_energy_gradient(type_one_side, pbc):
    model = model_for(type_one_side)
    pos, cell, atype = random_system(10, seed=1)
    out = run_model(model, pos, cell, atype, pbc)
    h = 1e-5
    fd = np.zeros_like(pos)
    for i in range(len(pos)):
        for a in range(3):
            p1, p2 = pos.copy(), pos.copy()
            p1[i, a] += h
            p2[i, a] -= h
            fd[i, a] = -(run_model(model, p1, cell, atype, pbc)["energy"] - run_model(model, p2, cell, atype, pbc)["energy"]) / (2 * h)
    assert np.abs(out["force"]).max() > 1e-3  # forces are not trivially zero
    np.testing.assert_allclose(out["force"], fd, atol=1e-8)


def test_virial_is_minus_strain_derivative():
    model = model_for()
    pos, cell, atype = random_system(10, seed=2)
    out = run_model(model, pos, cell, atype)
    h = 1e-5
    fd = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            eps = np.zeros((3, 3))
            eps[a, b] = h
            ep = run_model(model, pos @ (np.eye(3) + eps), cell @ (np.eye(3) + eps), atype)["energy"]
            em = run_model(model, pos @ (np.eye(3) - eps), cell @ (np.eye(3) - eps), atype)["energy"]
            fd[a, b] = -(ep - em) / (2 * h)
    assert np.abs(out["virial"]).max() > 1e-3
    np.testing.assert_allclose(out["virial"], fd, atol=1e-8)
    np.testing.assert_allclose(out["virial"], out["virial"].T, atol=1e-10)  # rotational invariance


def test_rotation_translation_permutation_invariance():
    model = model_for()
    pos, cell, atype = random_system(12, seed=3)
    ref = run_model(model, pos, cell, atype)
    rot = Rotation.from_euler("xyz", [0.3, -1.1, 2.0]).as_matrix()
    out = run_model(model, pos @ rot.T, cell @ rot.T, atype)
    assert abs(out["energy"] - ref["energy"]) < 1e-10
    np.testing.assert_allclose(out["force"], ref["force"] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(out["virial"], rot @ ref["virial"] @ rot.T, atol=1e-10)
    shifted = run_model(model, pos + np.array([0.37, -1.2, 2.9]), cell, atype)
    assert abs(shifted["energy"] - ref["energy"]) < 1e-10
    np.testing.assert_allclose(shifted["force"], ref["force"], atol=1e-10)
    perm = np.random.default_rng(0).permutation(len(pos))
    permuted = run_model(model, pos[perm], cell, atype[perm])
    assert abs(permuted["energy"] - ref["energy"]) < 1e-10
    np.testing.assert_allclose(permuted["force"], ref["force"][perm], atol=1e-10)
    np.testing.assert_allclose(permuted["atom_energy"], ref["atom_energy"][perm], atol=1e-10)


def test_free_molecule_rotation_invariance():
    model = model_for()
    pos, _, atype = random_system(8, seed=4, cell_scale=4.0, triclinic=False)
    rot = Rotation.from_euler("zyx", [1.0, 0.2, -0.7]).as_matrix()
    a = run_model(model, pos, np.zeros((3, 3)), atype, (False,) * 3)
    b = run_model(model, pos @ rot.T, np.zeros((3, 3)), atype, (False,) * 3)
    assert abs(a["energy"] - b["energy"]) < 1e-10
    np.testing.assert_allclose(b["force"], a["force"] @ rot.T, atol=1e-10)
    np.testing.assert_allclose(a["force"].sum(0), 0.0, atol=1e-10)  # no net force on a free cluster


def test_replicated_cell_gives_same_energy_per_atom():
    model = model_for()
    pos, cell, atype = random_system(10, seed=5)
    one = run_model(model, pos, cell, atype)
    reps = [pos + np.array([i, j, k]) @ cell for i in range(2) for j in range(1) for k in range(2)]
    big = run_model(model, np.concatenate(reps), np.diag([2, 1, 2]) @ cell, np.tile(atype, 4))
    assert abs(big["energy"] / 40 - one["energy"] / 10) < 1e-10
    np.testing.assert_allclose(big["force"][:10], one["force"], atol=1e-10)
    np.testing.assert_allclose(big["virial"], 4 * one["virial"], atol=1e-9)


@pytest.mark.parametrize("boundary", ["rcut_smth", "rcut"])
def test_energy_and_forces_continuous_when_neighbour_crosses(boundary):
    """Move one atom of a pair across rcut_smth or rcut: E and F change by O(step) only."""
    model = model_for()
    r0 = 1.5 if boundary == "rcut_smth" else 4.0
    cell = np.zeros((3, 3))
    atype = np.array([0, 1, 0])
    base = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.2, 0.3]])
    eps = 1e-7
    res = []
    for r in (r0 - eps, r0 + eps):
        p = base.copy()
        p[1, 0] = r
        res.append(run_model(model, p, cell, atype, (False,) * 3))
    de = abs(res[0]["energy"] - res[1]["energy"])
    df = np.abs(res[0]["force"] - res[1]["force"]).max()
    assert de < 1e-6 and df < 1e-5, (de, df)
    if boundary == "rcut":
        # beyond the cut-off the far atom feels nothing
        p = base.copy()
        p[1, 0] = 4.0 + 1e-3
        far = run_model(model, p, cell, atype, (False,) * 3)
        assert np.all(far["force"][1] == 0.0)


@pytest.mark.parametrize("r0", [1.5, 4.0])
def test_energy_curvature_continuous_at_switch_boundaries(r0):
    """One-sided second derivatives of E(r) agree at rcut_smth and rcut (C² model).

    A C¹ switch (e.g. a cosine) fails this with a relative jump of order 1.
    """
    model = model_for()
    cell, atype = np.zeros((3, 3)), np.array([0, 1])

    def energy(r):
        return run_model(model, np.array([[0.0, 0.0, 0.0], [r, 0.0, 0.0]]), cell, atype, (False,) * 3)["energy"]

    h = 2e-3
    below = (energy(r0) - 2 * energy(r0 - h) + energy(r0 - 2 * h)) / h**2
    above = (energy(r0 + 2 * h) - 2 * energy(r0 + h) + energy(r0)) / h**2
    scale = abs(energy(r0 - 0.2) - 2 * energy(r0 - 0.25) + energy(r0 - 0.3)) / 0.05**2
    assert scale > 1e-6
    assert abs(below - above) < 0.2 * scale, (below, above, scale)


@pytest.mark.parametrize("type_one_side", [False, True])
def test_skipping_empty_slots_is_exact(type_one_side):
    """The descriptor's shortcut for slots empty in every atom equals the full evaluation."""
    model = model_for(type_one_side, sel=(40, 40))
    pos, cell, atype = random_system(12, seed=6)
    fast = run_model(model, pos, cell, atype)
    full = run_model(model, pos, cell, atype, counts_full=True)
    counts = model.section_counts(torch.from_numpy(
        __import__("pipeline.model.inputs", fromlist=["x"]).frame_inputs(pos[None], cell[None], (True,) * 3, atype, model.rcut, model.sel, model.type_map)[1].numpy()
    ))
    assert sum(counts) < model.descriptor.nnei  # the shortcut was actually taken
    np.testing.assert_allclose(fast["atom_energy"], full["atom_energy"], atol=1e-12)


def test_float32_model_close_to_float64():
    m64 = model_for(precision="float64")
    m32 = DeepPot(tiny_model_config(precision="float32"))
    m32.load_state_dict({k: v.to(torch.float32) for k, v in m64.state_dict().items()})
    pos, cell, atype = random_system(10, seed=7)
    a, b = run_model(m64, pos, cell, atype), run_model(m32, pos, cell, atype)
    assert m32.descriptor.davg.dtype == torch.float32
    assert abs(a["energy"] - b["energy"]) < 1e-4 * max(1.0, abs(a["energy"]))
    np.testing.assert_allclose(a["force"], b["force"], atol=1e-4)
    assert a["energy"] != b["energy"]  # really computed in another precision


def test_neighbour_overflow_is_reported():
    from pipeline.errors import NeighborOverflowError

    model = model_for(sel=(2, 2))
    pos, cell, atype = random_system(12, seed=8)
    with pytest.raises(NeighborOverflowError, match="neighbours of type .* within rcut, but sel"):
        run_model(model, pos, cell, atype)


def test_inference_padding_cache_is_exact_and_follows_weight_updates():
    """Frozen weights in eval mode reuse the padding sums; an in-place weight update or a
    load_state_dict invalidates them, and the result always equals the uncached computation."""
    model = model_for(type_one_side=True).eval().requires_grad_(False)
    pos, cell, atype = random_system(10, seed=2)

    def uncached(m):  # a copy starts with an empty cache: the same evaluation path, computed afresh
        return run_model(copy.deepcopy(m), pos, cell, atype, (True,) * 3)

    cached = run_model(model, pos, cell, atype, (True,) * 3)
    assert padding_cache(model.descriptor), "frozen eval-mode inference should use the cache"
    fresh = uncached(model)
    assert cached["energy"] == fresh["energy"]
    np.testing.assert_array_equal(cached["force"], fresh["force"])
    with torch.no_grad():
        model.descriptor.embeddings[0].layers[0].bias.add_(0.3)
    moved = run_model(model, pos, cell, atype, (True,) * 3)
    assert moved["energy"] == uncached(model)["energy"] != cached["energy"]
    other = model_for(type_one_side=True, seed=11).requires_grad_(False)  # frozen like model: same evaluation path, same bits
    model.load_state_dict(other.state_dict())
    assert run_model(model, pos, cell, atype, (True,) * 3)["energy"] == run_model(other.eval(), pos, cell, atype, (True,) * 3)["energy"]
