"""The fused embedding kernel (pipeline/model/embedding_kernel.*) against the layer-by-layer nets.

Inference with frozen weights, and training steps, evaluate the embedding nets in C++: G(s) and dG/ds carried
forward in row blocks, tanh from an inline exponential. These tests check it builds where a
compiler exists, that its values and derivatives equal the layer path's (which the physics
tests check against finite differences and symmetries) for every shortcut and timestep
layout and across block edges, finite differences of its own, NaN propagation, saturation,
independence of the thread count, exact second derivatives, whole-model energies, forces
and virials with and without pair sharing, and the fallback when it cannot be built. For
training (inside ``parameter_gradients_only``): every parameter gradient of an energy, force
and virial loss equals autograd's second derivative through the layers, gradients independent
of the thread count, and the training loop using it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import random_system, randomize_stats, tiny_model_config
from pipeline.model import embedding_kernel as ek
from pipeline.model.deeppot import DeepPot
from pipeline.model.inputs import frame_inputs
from pipeline.model.network import MLP


@pytest.fixture(scope="module")
def kernel():
    """The compiled op; skip without a C++ compiler; a compiler present but no kernel fails."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (c++ or $CXX): the fused kernel cannot be built here")
    if not ek.enabled_by_environment():
        pytest.skip("DPELT_FUSED_KERNEL=0 disables the fused kernel")
    op = ek.load_kernel()
    assert op is not None, f"the fused embedding kernel did not build: {ek.kernel_error()}"
    return op


def frozen_net(neuron, resnet_dt, seed=0):
    net = MLP(1, neuron, resnet_dt=resnet_dt, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return net.requires_grad_(False).eval()


def layer_path(net, x):
    """G and dG/ds by autograd through the layers (the reference)."""
    xx = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        g = net.forward_layers(xx)
        cols = [torch.autograd.grad(g[:, k].sum(), xx, retain_graph=True)[0][:, 0] for k in range(g.shape[1])]
    return g.detach(), torch.stack(cols, dim=1)


LAYOUTS = [([25, 50, 100], False), ([25, 50, 100], True), ([4, 8, 8, 16], True), ([6], False), ([1, 1, 2], True), ([3, 5], False)]


@pytest.mark.parametrize("neuron,resnet_dt", LAYOUTS)
@pytest.mark.parametrize("rows", [0, 1, 255, 256, 257, 1000])  # block edges at 256
def test_values_and_tangents_equal_layer_path(kernel, neuron, resnet_dt, rows):
    net = frozen_net(neuron, resnet_dt, seed=len(neuron) + rows)
    if resnet_dt:  # timesteps far from their initial 0.1, so a wrong one shows
        for layer in net.layers:
            if layer.idt is not None:
                layer.idt.copy_(torch.linspace(-0.7, 1.3, layer.idt.numel(), dtype=torch.float64))
    x = 4 * torch.rand(rows, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) - 1.5
    w, b, st, sc = ek.packed_layers(net)
    g, gp = kernel(x.reshape(-1).contiguous(), w, b, st, sc, True, ek.BLOCK_ROWS)
    g_only, none = kernel(x.reshape(-1).contiguous(), w, b, st, sc, False, ek.BLOCK_ROWS)
    g_ref, gp_ref = layer_path(net, x)
    assert g.shape == (rows, neuron[-1]) and none.numel() == 0
    torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(gp, gp_ref, rtol=0, atol=1e-13)
    assert torch.equal(g, g_only)  # the tangent does not change the values


def test_tangent_matches_finite_differences(kernel):
    net = frozen_net([25, 50, 100], True, seed=3)
    x = torch.linspace(-1.0, 3.0, 300, dtype=torch.float64)
    w, b, st, sc = ek.packed_layers(net)
    _, gp = kernel(x, w, b, st, sc, True, 64)
    h = 1e-5
    gplus, _ = kernel(x + h, w, b, st, sc, False, 64)
    gminus, _ = kernel(x - h, w, b, st, sc, False, 64)
    torch.testing.assert_close(gp, (gplus - gminus) / (2 * h), rtol=1e-7, atol=1e-8)


def test_saturation_and_nan(kernel):
    """|z| large: tanh is exactly ±1 (no overflow to NaN); a NaN input stays NaN (the
    descriptor relies on it to let a broken displacement reach the energy)."""
    net = frozen_net([4, 8], False, seed=2)
    x = torch.tensor([-1e6, -800.0, -30.0, 0.0, 30.0, 800.0, 1e6, float("nan")], dtype=torch.float64)
    w, b, st, sc = ek.packed_layers(net)
    g, gp = kernel(x, w, b, st, sc, True, 4)
    g_ref, gp_ref = layer_path(net, x[:-1, None])
    torch.testing.assert_close(g[:-1], g_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(gp[:-1], gp_ref, rtol=0, atol=1e-13)
    assert torch.isfinite(g[:-1]).all() and torch.isnan(g[-1]).all() and torch.isnan(gp[-1]).all()


def test_every_nan_stays_nan(kernel):
    """NaNs with payload bits (quiet and signalling): the exponent trick must not make them finite."""
    bits = np.array([0x7FF8000000000001, 0x7FF0000000000001, 0xFFF8000000000FFF, 0x7FF8000000000000], dtype=np.uint64)
    x = torch.from_numpy(bits.view(np.float64).copy())
    assert torch.isnan(x).all()
    for neuron in ([4, 8], [6]):
        net = frozen_net(neuron, False, seed=3)
        g, gp = kernel(x, *ek.packed_layers(net), True, 4)
        assert torch.isnan(g).all() and torch.isnan(gp).all(), neuron


def with_1_and_2_threads(run):
    """[run() with 1 thread, run() with 2 threads], the thread count restored afterwards."""
    before = torch.get_num_threads()
    try:
        out = []
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(run())
    finally:
        torch.set_num_threads(before)
    return out


def test_independent_of_thread_count(kernel):
    net = frozen_net([25, 50, 100], True, seed=4)
    x = torch.rand(3000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    w, b, st, sc = ek.packed_layers(net)
    out = with_1_and_2_threads(lambda: kernel(x, w, b, st, sc, True, ek.BLOCK_ROWS))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_gathered_row_dot(kernel):
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(37, 13, generator=g, dtype=torch.float64)
    tan = torch.randn(11, 13, generator=g, dtype=torch.float64)
    rows = torch.randint(0, 11, (37,), generator=g)
    torch.testing.assert_close(torch.ops.dpelt.gathered_row_dot(grad, tan, rows), (grad * tan[rows]).sum(1), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(torch.ops.dpelt.gathered_row_dot(tan, tan, torch.empty(0, dtype=torch.long)), (tan * tan).sum(1), rtol=1e-14, atol=1e-14)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.dpelt.gathered_row_dot(grad, tan, rows + 11)


def test_mlp_uses_the_kernel_only_at_inference(kernel, monkeypatch):
    calls = []
    original = ek.fused_embedding
    monkeypatch.setattr(ek, "fused_embedding", lambda mlp, x: calls.append(x.shape) or original(mlp, x))
    net = MLP(1, [4, 8], resnet_dt=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(5, 1, dtype=torch.float64)
    net(x)  # weights receive gradients: training path
    assert calls == []
    with torch.no_grad():
        net(x)
    assert len(calls) == 1
    net.requires_grad_(False)
    net(x)  # frozen but in training mode: still the layer path
    assert len(calls) == 1
    net.eval()
    net(x)
    assert len(calls) == 2
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "0")
    net(x)
    assert len(calls) == 2
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "1")
    torch.jit.script(net)(x)  # TorchScript never sees the kernel
    assert len(calls) == 2


def spy_fused(monkeypatch):
    """Record calls of the two fused entry points: (gathered, plain)."""
    gathered, plain = [], []
    rows_of, single = ek.fused_embedding_rows, ek.fused_embedding
    monkeypatch.setattr(ek, "fused_embedding_rows", lambda mlp, x, rows: gathered.append(len(rows)) or rows_of(mlp, x, rows))
    monkeypatch.setattr(ek, "fused_embedding", lambda mlp, x: plain.append(x.shape) or single(mlp, x))
    return gathered, plain


def test_not_used_while_any_parameter_may_want_a_gradient(kernel):
    """Frozen weights but trainable biases (or a net in training mode with grad on, as a
    frozen descriptor is during training): the layer path, so no gradient is lost."""
    net = MLP(1, [4, 8], resnet_dt=True, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(6, 1, dtype=torch.float64, requires_grad=True)
    for layer in net.layers:
        layer.weight.requires_grad_(False)
    assert not ek.applicable(net, x)
    net(x).sum().backward()
    assert all(layer.bias.grad is not None and float(layer.bias.grad.abs().sum()) > 0 for layer in net.layers)
    net.eval()
    assert not ek.applicable(net, x)  # eval mode, but the biases want gradients
    for layer in net.layers:
        layer.bias.grad = None
    net(x).sum().backward()
    assert all(layer.bias.grad is not None and float(layer.bias.grad.abs().sum()) > 0 for layer in net.layers)
    net.train()
    net.requires_grad_(False)
    assert not ek.applicable(net, x)  # training mode, grad on
    net.eval()
    assert ek.applicable(net, x)
    net.train()
    with torch.no_grad():
        assert ek.applicable(net, x)


def test_predict_uses_the_kernel_and_restores_the_model(kernel, monkeypatch):
    """``dpelt test`` / ``dpelt ensemble-test`` get a model whose weights require gradients:
    predict freezes it for the evaluation and gives it back unchanged."""
    from pipeline.data.frames import make_frames
    from pipeline.evaluate import predict

    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=True))).train()
    pos, cell, atype = random_system(12, seed=3, cell_scale=5.0)
    ds = make_frames(pos[None], cell[None], atype, ["A", "B"], energy=np.zeros(1), force=np.zeros((1, 12, 3)))
    gathered, plain = spy_fused(monkeypatch)
    out = predict(model, ds)
    assert gathered or plain
    assert model.training and all(p.requires_grad for p in model.parameters())
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "0")
    ref = predict(model, ds)
    np.testing.assert_allclose(out["force"], ref["force"], rtol=0, atol=1e-12)


def frozen_model(type_one_side: bool, resnet_dt: bool = False) -> DeepPot:
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side, sel=(60, 60), neuron=[8, 16, 32], resnet_dt=resnet_dt)))
    return model.requires_grad_(False).eval()


def model_outputs(model, pos, cell, atype, use_kernel: bool, pairs: bool, monkeypatch):
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "1" if use_kernel else "0")
    fi = frame_inputs(pos[None], cell[None], (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    out = model.forward_rij(fi.rij, fi.nlist, torch.from_numpy(atype), True, True, False, fi.partner if pairs else None)
    return {k: out[k].detach() for k in ("energy", "atom_energy", "force", "virial")}


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("resnet_dt", [True, False])
def test_model_energy_forces_virial_equal_layer_path(kernel, monkeypatch, type_one_side, pairs, resnet_dt):
    model = frozen_model(type_one_side, resnet_dt)
    pos, cell, atype = random_system(40, seed=7, cell_scale=7.0)
    gathered, plain = spy_fused(monkeypatch)
    fused = model_outputs(model, pos, cell, atype, True, pairs, monkeypatch)
    assert bool(gathered) == pairs  # shared rows go through the gathered kernel
    assert pairs or plain  # the others through the plain one: never a silent layer path
    layers = model_outputs(model, pos, cell, atype, False, pairs, monkeypatch)
    for key in fused:
        scale = max(1.0, float(layers[key].abs().max()))
        assert float((fused[key] - layers[key]).abs().max()) <= 1e-12 * scale, key


def test_model_forces_match_finite_differences_with_kernel(kernel, monkeypatch):
    model = frozen_model(True, True)
    pos, cell, atype = random_system(16, seed=8, cell_scale=5.5)
    forces = model_outputs(model, pos, cell, atype, True, True, monkeypatch)["force"][0].numpy()
    h = 1e-5
    for i, d in [(0, 0), (3, 1), (9, 2), (15, 0)]:
        e = []
        for sign in (1, -1):
            p = pos.copy()
            p[i, d] += sign * h
            e.append(float(model_outputs(model, p, cell, atype, True, True, monkeypatch)["energy"][0]))
        assert abs(-(e[0] - e[1]) / (2 * h) - forces[i, d]) < 1e-7 * max(1.0, abs(forces[i, d]))


@pytest.mark.parametrize("pairs", [True, False])
def test_second_derivative_through_frozen_model_is_exact(kernel, monkeypatch, pairs):
    """create_graph through a fused net (a Hessian-vector product of a frozen model) is
    recomputed layer by layer: equal to the layer path's."""
    model = frozen_model(True)
    pos, cell, atype = random_system(20, seed=9, cell_scale=6.0)
    fi = frame_inputs(pos[None], cell[None], (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    v = torch.from_numpy(np.random.default_rng(0).normal(size=fi.rij.shape))

    def hvp(flag):
        monkeypatch.setenv("DPELT_FUSED_KERNEL", flag)
        rij = fi.rij.clone().requires_grad_(True)
        e = model.atomic_energy(rij, torch.from_numpy(atype), None, fi.partner if pairs else None).sum()
        (g,) = torch.autograd.grad(e, rij, create_graph=True)
        (h,) = torch.autograd.grad((g * v).sum(), rij)
        return h

    gathered, plain = spy_fused(monkeypatch)
    a = hvp("1")
    assert gathered if pairs else plain
    b = hvp("0")
    assert float(a.abs().max()) > 0
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def training_model(type_one_side: bool, resnet_dt: bool) -> DeepPot:
    """A model in training mode (weights take gradients); timesteps far from 0.1 so a wrong
    timestep gradient shows; layers [8, 16, 32] have every shortcut (none, (x, x), x) but one."""
    model = randomize_stats(DeepPot(tiny_model_config(type_one_side=type_one_side, sel=(60, 60), neuron=[8, 8, 16], resnet_dt=resnet_dt)))
    with torch.no_grad():
        for net in model.descriptor.embeddings:
            for layer in net.layers:
                if layer.idt is not None:
                    layer.idt.copy_(torch.linspace(-0.6, 1.1, layer.idt.numel(), dtype=torch.float64))
    return model.train()


def training_step_gradients(model, fi, atype, kernel_on: bool, pairs: bool, pe: float, pf: float, pv: float):
    """One training loss (energy, forces, virial with the given weights) and its parameter
    gradients, with the training kernel or autograd through the layers."""
    import contextlib

    target_f = torch.from_numpy(np.random.default_rng(1).normal(size=(1, len(atype), 3)))
    target_v = torch.from_numpy(np.random.default_rng(2).normal(size=(1, 3, 3)))
    with ek.parameter_gradients_only() if kernel_on else contextlib.nullcontext():
        out = model.forward_rij(fi.rij, fi.nlist, torch.from_numpy(atype), True, True, True, fi.partner if pairs else None)
    loss = pe * (out["energy"] - 1.0).pow(2).sum() + pf * (out["force"] - target_f).pow(2).sum() + pv * (out["virial"] - target_v).pow(2).sum()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return out, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@pytest.mark.parametrize("type_one_side", [True, False])
@pytest.mark.parametrize("pairs", [True, False])
@pytest.mark.parametrize("resnet_dt", [True, False])
@pytest.mark.parametrize("weights", [(1.0, 1.0, 0.1), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)], ids=["e+f+v", "energy only", "forces only"])
def test_training_kernel_gives_autograds_parameter_gradients(kernel, monkeypatch, type_one_side, pairs, resnet_dt, weights):
    """A training step inside parameter_gradients_only: the embedding nets run through the
    kernel (forward with tangents, parameter gradients from both cotangents) and every
    parameter gradient of an energy + force + virial loss equals autograd's through the
    layers (its second derivative), as do the energy, forces and virial."""
    model = training_model(type_one_side, resnet_dt)
    pos, cell, atype = random_system(40, seed=11, cell_scale=7.0)
    fi = frame_inputs(pos[None], cell[None], (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    calls = []
    original = ek.training_embedding
    monkeypatch.setattr(ek, "training_embedding", lambda mlp, x: calls.append(x.shape[0]) or original(mlp, x))
    out_k, grads_k = training_step_gradients(model, fi, atype, True, pairs, *weights)
    assert calls, "the training kernel was not used"
    n_calls = len(calls)
    out_l, grads_l = training_step_gradients(model, fi, atype, False, pairs, *weights)
    assert len(calls) == n_calls  # outside the context: the layer path
    for key in ("energy", "force", "virial"):
        scale = max(1.0, float(out_l[key].abs().max()))
        assert float((out_k[key] - out_l[key]).abs().max()) <= 1e-12 * scale, key
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, gk, gl in zip(names, grads_k, grads_l):
        scale = float(gl.abs().max())
        if name.startswith("descriptor.") and weights != (1.0, 0.0, 0.0):
            assert scale > 0, name  # the force term reaches every embedding parameter
        assert float((gk - gl).abs().max()) <= 1e-10 * max(scale, 1e-300) + 1e-300, name


def mlp_training_gradients(net, x, kernel_on: bool, create_graph_loss: bool = False):
    """E = Σ G ⊙ V; the loss Σ G ⊙ U + Σ w · dE/ds (dE/ds with create_graph, as forces), and its
    parameter gradients, with the training kernel or through the layers."""
    import contextlib

    g = torch.Generator().manual_seed(21)
    m = net.dim_out
    u, v, w = torch.randn(x.shape[0], m, generator=g, dtype=torch.float64), torch.randn(x.shape[0], m, generator=g, dtype=torch.float64), torch.randn(x.shape[0], 1, generator=g, dtype=torch.float64)
    xx = x.clone().requires_grad_(True)
    with ek.parameter_gradients_only() if kernel_on else contextlib.nullcontext():
        G = net(xx)
    (ds,) = torch.autograd.grad((G * v).sum(), xx, create_graph=True)
    loss = (G * u).sum() + (ds * w).sum()
    params = [p for p in net.parameters()]
    return ds.detach(), torch.autograd.grad(loss, params, create_graph=create_graph_loss)


@pytest.mark.parametrize("neuron,resnet_dt", LAYOUTS + [([2, 4, 4, 3], True), ([5], True), ([1], True)])
@pytest.mark.parametrize("rows", [1, 200, 700])
def test_training_kernel_every_layout(kernel, neuron, resnet_dt, rows):
    """Single-layer nets, a shortcut on layer 0, every shortcut kind with and without timesteps,
    one block and several: dE/ds and every parameter gradient equal autograd's."""
    net = MLP(1, neuron, resnet_dt=resnet_dt, generator=torch.Generator().manual_seed(len(neuron)), dtype=torch.float64)
    with torch.no_grad():
        for layer in net.layers:
            if layer.idt is not None:
                layer.idt.copy_(torch.linspace(-0.7, 1.3, layer.idt.numel(), dtype=torch.float64))
    x = 4 * torch.rand(rows, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64) - 1.5
    ds_k, grads_k = mlp_training_gradients(net, x, True)
    ds_l, grads_l = mlp_training_gradients(net, x, False)
    torch.testing.assert_close(ds_k, ds_l, rtol=0, atol=1e-12)
    for a, b in zip(grads_k, grads_l):
        assert float((a - b).abs().max()) <= 1e-11 * max(1.0, float(b.abs().max()))


def test_training_kernel_first_order_forces_and_refusals(kernel):
    """Inside the context: forces without create_graph are right (the first-order dE/ds); a
    loss differentiated with create_graph through dG/ds is refused, not silently zero; a
    parameter changed in place before the backward is an error, as on the layer path."""
    model = training_model(True, True)
    pos, cell, atype = random_system(30, seed=12, cell_scale=6.5)
    fi = frame_inputs(pos[None], cell[None], (True,) * 3, atype, model.rcut, model.sel, model.type_map)
    at = torch.from_numpy(atype)
    with ek.parameter_gradients_only():
        inside = model.forward_rij(fi.rij, fi.nlist, at, True, True, False, fi.partner)
    outside = model.forward_rij(fi.rij, fi.nlist, at, True, True, False, fi.partner)
    torch.testing.assert_close(inside["force"], outside["force"], rtol=0, atol=1e-12)
    torch.testing.assert_close(inside["virial"], outside["virial"], rtol=0, atol=1e-12)
    net = MLP(1, [4, 8], resnet_dt=True, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(20, 1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="parameter_gradients_only"):
        mlp_training_gradients(net, x, True, create_graph_loss=True)
    xx = x.clone().requires_grad_(True)
    with ek.parameter_gradients_only():
        G = net(xx)
    with torch.no_grad():
        net.layers[1].weight.add_(0.1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(G.sum(), list(net.parameters()))


def test_training_kernel_backward_independent_of_thread_count_and_block(kernel):
    """The parameter gradients are summed in an order fixed by the number of rows: the same bits
    with 1 or 2 threads, for one block (where MKL could thread a lone product) and many (more
    than the 64 chunks of blocks); other block sizes agree to rounding."""
    net = frozen_net([25, 50, 100], True, seed=12)
    g = torch.Generator().manual_seed(13)
    w, b, st, sc = ek.packed_layers(net)
    for rows in (1, 200, 256, 257, 3000, 20000):
        x = torch.rand(rows, generator=g, dtype=torch.float64)
        gg_, ggp_ = torch.randn(rows, 100, generator=g, dtype=torch.float64), torch.randn(rows, 100, generator=g, dtype=torch.float64)
        out = with_1_and_2_threads(lambda: torch.ops.dpelt.embedding_net_backward(x, w, b, st, sc, gg_, ggp_, ek.BLOCK_ROWS))
        assert all(torch.equal(a, c) for a, c in zip(out[0], out[1])), rows
    x = torch.rand(3000, generator=g, dtype=torch.float64)
    gg, ggp = torch.randn(3000, 100, generator=g, dtype=torch.float64), torch.randn(3000, 100, generator=g, dtype=torch.float64)
    out = with_1_and_2_threads(lambda: torch.ops.dpelt.embedding_net_backward(x, w, b, st, sc, gg, ggp, ek.BLOCK_ROWS))
    other = torch.ops.dpelt.embedding_net_backward(x, w, b, st, sc, gg, ggp, 97)
    for a, c in zip(out[0], other):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    empty = torch.ops.dpelt.embedding_net_backward(x, w, b, st, sc, gg, ggp.new_empty(0), ek.BLOCK_ROWS)
    zero = torch.ops.dpelt.embedding_net_backward(x, w, b, st, sc, gg, torch.zeros_like(ggp), ek.BLOCK_ROWS)
    assert all(torch.equal(a, c) for a, c in zip(empty, zero))  # no tangent cotangent = a zero one


def test_training_kernel_only_inside_the_context_and_never_for_float32(kernel):
    net = MLP(1, [4, 8], resnet_dt=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = torch.rand(5, 1, dtype=torch.float64)
    assert not ek.training_applicable(net, x)
    with ek.parameter_gradients_only():
        assert ek.training_applicable(net, x)
        with torch.no_grad():
            assert not ek.training_applicable(net, x)
        net32 = MLP(1, [4, 8], resnet_dt=False, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        assert not ek.training_applicable(net32, x.float())
    assert not ek.training_applicable(net, x)


def test_training_loop_uses_the_kernel_and_trains_as_the_layer_path(kernel, monkeypatch, tmp_path):
    """``train`` runs its steps' embedding nets through the training kernel, and 20 steps
    (energy, forces, virial) end where the layer path ends, to rounding."""
    from test_train import tiny_config

    from pipeline.data.netcdf import write_frames
    from pipeline.examples import emt_bulk_frames
    from pipeline.model.serialize import read_model_file
    from pipeline.train.loop import train

    write_frames(tmp_path / "train.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(300, 900), frames_per_temperature=4, seed=1))
    write_frames(tmp_path / "valid.nc", emt_bulk_frames("Cu", repeat=(2, 2, 2), temperatures_K=(600,), frames_per_temperature=2, seed=2))
    calls = []
    original = ek.training_embedding
    monkeypatch.setattr(ek, "training_embedding", lambda mlp, x: calls.append(x.shape[0]) or original(mlp, x))
    fused = train(tiny_config(tmp_path, steps=20), tmp_path / "fused", log=lambda s: None)
    assert len(calls) >= 20
    n_calls = len(calls)
    monkeypatch.setattr(ek, "training_applicable", lambda mlp, x: False)
    layers = train(tiny_config(tmp_path, steps=20), tmp_path / "layers", log=lambda s: None)
    assert len(calls) == n_calls  # the layer path
    a, b = read_model_file(fused)["state_dict"], read_model_file(layers)["state_dict"]
    for key in a:
        scale = max(1.0, float(b[key].abs().max()))
        assert float((a[key] - b[key]).abs().max()) <= 1e-9 * scale, key
def test_build_failure_falls_back_with_one_warning(monkeypatch):
    """No compiler: one RuntimeWarning naming the reason, then the layer path (same values)."""
    net = frozen_net([4, 8], False)
    x = torch.rand(7, 1, dtype=torch.float64)
    reference = net.forward_layers(x)
    monkeypatch.setattr(ek, "_state", {"tried": False, "op": None, "error": None})

    def broken():
        raise OSError("c++: command not found")

    monkeypatch.setattr(ek, "_build", broken)
    monkeypatch.setenv("DPELT_FUSED_KERNEL", "1")
    with pytest.warns(RuntimeWarning, match="could not be built.*c\\+\\+: command not found"):
        out = net(x)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        net(x)  # warned once only
    assert ek.kernel_error() and "command not found" in ek.kernel_error()


def test_build_in_a_fresh_directory_ignores_a_stale_torch_lock(kernel, tmp_path):
    """A build killed mid-way leaves torch's lock file behind, and torch would wait for it
    forever; dpelt removes it under its own flock (released when a process dies). A fresh
    process builds the kernel in an empty extensions directory holding such a lock."""
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path), DPELT_FUSED_KERNEL="1")
    code = "from pipeline.model import embedding_kernel as ek; print(ek.build_directory())"
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(tmp_path))
    os.makedirs(where)
    open(os.path.join(where, "lock"), "w").close()
    code = "from pipeline.model import embedding_kernel as ek; import sys; sys.exit(0 if ek.load_kernel() is not None else 1)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert any(name.endswith(".so") for name in os.listdir(where))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True, timeout=600)


PROBE = (
    "import warnings, torch\n"
    "warnings.simplefilter('always')\n"
    "from pipeline.model import embedding_kernel as ek\n"
    "from pipeline.model.network import MLP\n"
    "net = MLP(1, [4, 8], resnet_dt=False, generator=torch.Generator().manual_seed(0), dtype=torch.float64).requires_grad_(False).eval()\n"
    "x = torch.rand(5, 1, dtype=torch.float64)\n"
    "assert torch.allclose(net(x), net.forward_layers(x), rtol=0, atol=1e-14)\n"
    "print('KERNEL', ek.load_kernel() is not None, ek.kernel_error())\n"
)


def test_without_a_compiler_falls_back_once_and_remembers_nothing(kernel, tmp_path):
    """A fresh cache and no compiler: one warning naming the reason, the layer path, no build."""
    done = run_python(PROBE, TORCH_EXTENSIONS_DIR=str(tmp_path), CXX="/nonexistent/c++", DPELT_FUSED_KERNEL="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KERNEL False" in done.stdout and "no C++ compiler" in done.stdout
    assert done.stderr.count("could not be built") == 1
    assert not any(p.suffix == ".so" or p.name == ek.FAILED for p in tmp_path.rglob("*"))  # a compiler installed later is used


def test_a_built_kernel_loads_without_compiler_or_ninja(kernel):
    """Once built (the ``kernel`` fixture did), a process needs neither compiler nor ninja."""
    done = run_python(PROBE, CXX="/nonexistent/c++", PATH="/nonexistent", DPELT_FUSED_KERNEL="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KERNEL True" in done.stdout, done.stdout + done.stderr[-2000:]


def test_a_failed_build_is_not_retried_by_every_process(kernel, tmp_path):
    """A build that failed leaves its reason in the build directory: later processes fall
    back at once and the warning says which file to delete to retry."""
    code = "from pipeline.model import embedding_kernel as ek; print(ek.build_directory())"
    where = run_python(code, TORCH_EXTENSIONS_DIR=str(tmp_path)).stdout.strip()
    os.makedirs(where)
    with open(os.path.join(where, ek.FAILED), "w") as fh:
        fh.write("RuntimeError: embedding_kernel.cpp:1: error: something broke\n")
    done = run_python(PROBE, TORCH_EXTENSIONS_DIR=str(tmp_path), DPELT_FUSED_KERNEL="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "KERNEL False" in done.stdout and "something broke" in done.stdout and ek.FAILED in done.stderr


def test_only_compile_errors_are_remembered(tmp_path, monkeypatch):
    """A compile error is kept in build-failed.txt (later processes fall back at once); a
    transient failure (disk full, a killed compiler) is not, so the next process retries."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv("CXX", sys.executable)  # "a compiler" on PATH; load() itself is replaced
    outcomes = {"compile": RuntimeError("Error building extension:\nembedding_kernel.cpp:7:1: error: 'x' was not declared\nninja: build stopped"), "disk": OSError(28, "No space left on device")}
    for name, exc in outcomes.items():
        where = tmp_path / name

        def failing(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(cpp, "load", failing)
        with pytest.raises(type(exc)):
            ek._load_or_build(where)
        marker = where / ek.FAILED
        assert marker.exists() == (name == "compile")
        if name == "compile":
            assert "error: 'x' was not declared" in marker.read_text()
            with pytest.raises(RuntimeError, match="delete .*build-failed.txt to retry"):
                ek._load_or_build(where)  # not compiled again


def test_a_truncated_library_is_rebuilt(tmp_path, monkeypatch):
    """A .so cut short by a killed build does not load: it is removed and built again."""
    import torch.utils.cpp_extension as cpp

    where = tmp_path / "b"
    where.mkdir()
    (where / f"{ek.LIBRARY}.so").write_bytes(b"\x7fELF truncated")
    (where / "lock").write_text("")  # and torch's lock file of the killed build
    calls = []
    monkeypatch.setenv("CXX", sys.executable)
    monkeypatch.setattr(cpp, "load", lambda *a, **k: calls.append(k["build_directory"]))
    ek._load_or_build(where)
    assert calls == [str(where)]
    assert not (where / f"{ek.LIBRARY}.so").exists() and not (where / "lock").exists()
