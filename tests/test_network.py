"""The fused activation + shortcut node of the dense layers: values and first and second
derivatives (training on forces differentiates the force graph) against plain torch ops."""

from __future__ import annotations

import pytest
import torch

from pipeline.model.network import MLP, tanh_residual


def plain(u, x, idt, shortcut):
    y = torch.tanh(u / 2)
    if idt is not None:
        y = y * idt
    if shortcut == 1:
        y = y + x
    elif shortcut == 2:
        y = y + torch.cat([x, x], dim=-1)
    return y


CASES = [(0, False), (1, False), (1, True), (2, False), (2, True)]


@pytest.mark.parametrize("shortcut,with_dt", CASES)
def test_tanh_residual_value_gradient_and_second_derivative(shortcut, with_dt):
    g = torch.Generator().manual_seed(3)
    n_in = 3
    n_out = {0: 4, 1: 3, 2: 6}[shortcut]
    u = (3 * torch.randn(5, n_out, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(5, n_in, generator=g, dtype=torch.float64, requires_grad=True)
    idt = (0.1 + torch.rand(n_out, generator=g, dtype=torch.float64)).requires_grad_(True) if with_dt else None
    inputs = (u, x, idt) if with_dt else (u, x)

    def f(*a):
        return tanh_residual(a[0], a[1], a[2] if with_dt else None, shortcut)

    torch.testing.assert_close(f(*inputs), plain(u, x, idt, shortcut), rtol=0, atol=1e-15)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_force_training_gradients_equal_plain_ops():
    """d/dθ of a loss on dE/dx through an MLP: the fused node against plain tanh ops."""
    g = torch.Generator().manual_seed(0)
    net = MLP(1, [4, 8, 16], resnet_dt=True, generator=g, dtype=torch.float64)
    fit = MLP(16, [16, 16], resnet_dt=True, generator=g, dtype=torch.float64, n_out=1)
    x = torch.randn(7, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = list(net.parameters()) + list(fit.parameters())

    def loss_grads(fused: bool):
        xx = x.clone().requires_grad_(True)
        h = xx
        for layer in list(net.layers) + list(fit.layers):
            if fused:
                h = layer(h)
            else:
                z = h @ layer.weight + layer.bias
                h = plain(2 * z, h, layer.idt, layer.shortcut) if layer.activation else z
        e = h.sum()
        (f,) = torch.autograd.grad(e, xx, create_graph=True)
        loss = 0.3 * e**2 + (f**2).sum()
        return torch.autograd.grad(loss, params)

    for a, b in zip(loss_grads(True), loss_grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_inference_and_training_paths_agree():
    """DenseLayer evaluates the fused node when its weights get no gradient and separate
    tanh/shortcut nodes otherwise: same values and input gradients either way."""
    g = torch.Generator().manual_seed(5)
    net = MLP(1, [4, 8, 16], resnet_dt=True, generator=g, dtype=torch.float64)
    x = torch.randn(9, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def value_and_grad():
        xx = x.clone().requires_grad_(True)
        y = net(xx)
        (gx,) = torch.autograd.grad((y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum(), xx)
        return y.detach(), gx

    y_train, g_train = value_and_grad()
    net.requires_grad_(False)
    y_infer, g_infer = value_and_grad()
    torch.testing.assert_close(y_infer, y_train, rtol=0, atol=1e-14)
    torch.testing.assert_close(g_infer, g_train, rtol=1e-12, atol=1e-14)
