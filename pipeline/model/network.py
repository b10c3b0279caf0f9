"""Dense networks of Deep Potential: embedding and fitting nets with ResNet shortcuts.

A layer maps x (width n_in) to y = tanh(x W + b) (width n_out). With shortcuts on, a layer
with n_out == n_in returns x + y, and one with n_out == 2 n_in returns (x, x) + y; with
``resnet_dt`` the residual is scaled by a trainable per-neuron timestep: x + y·dt.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from torch import nn


class _Tanh(torch.autograd.Function):
    """tanh(x) = 1 − 2/(exp(2x) + 1), computed in place on one buffer.

    This torch build evaluates float64 ``tanh`` with a scalar routine; the exponential form
    runs about twice as fast (absolute error ~1e-16). The backward is ATen's
    ``tanh_backward`` (grad·(1 − y²)), itself twice differentiable, so force training works.
    """

    # Classic ``forward(ctx, ...)`` form: a separate ``setup_context`` makes every ``apply``
    # bind arguments through ``inspect.signature`` (~50 µs a call, ~1 ms per MD step here).

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.mul(x, 2.0)
        y.exp_().add_(1.0).reciprocal_().mul_(-2.0).add_(1.0)  # exp overflow gives exactly ±1
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)


class _AddTwice(torch.autograd.Function):
    """y + (x, x): the residual of a layer that doubles the width, in one pass.

    The backward gives x the sum of the two halves of the gradient (two contiguous halves,
    not a strided reduction); it is made of differentiable ops, so training can take
    second derivatives through it.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[-1]
        # cat then in-place add: contiguous passes, ~2.5x faster than a broadcast add over a
        # [..., 2, n] view; x + y == y + x bit for bit
        return torch.cat([x, x], dim=-1).add_(y)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = ctx.n
        return grad, grad[..., :n] + grad[..., n:]


def add_twice(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y + cat([x, x], -1) (the custom one-pass version in eager mode)."""
    if torch.jit.is_scripting():
        return y + torch.cat([x, x], dim=-1)
    return _AddTwice.apply(y, x)


def tanh(x: torch.Tensor) -> torch.Tensor:
    """Hyperbolic tangent; the fast exponential form in eager mode, ``torch.tanh`` in TorchScript."""
    if torch.jit.is_scripting():
        return torch.tanh(x)
    return _Tanh.apply(x)


class DenseLayer(nn.Module):
    """One tanh layer, optionally residual (see module docstring)."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        resnet: bool,
        resnet_dt: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
        activation: bool = True,
        bias_std: float = 1.0,
    ):
        super().__init__()
        std = 1.0 / math.sqrt(n_in + n_out)
        self.weight = nn.Parameter(torch.randn(n_in, n_out, generator=generator, dtype=dtype) * std)
        bias = torch.randn(n_out, generator=generator, dtype=dtype) * bias_std
        self.bias = nn.Parameter(bias if activation else torch.zeros_like(bias))  # output layer starts unbiased
        self.activation = activation
        self.shortcut = 0
        if resnet and activation and n_out == n_in:
            self.shortcut = 1
        elif resnet and activation and n_out == 2 * n_in:
            self.shortcut = 2
        self.use_dt = bool(resnet_dt and self.shortcut)
        idt = 0.1 + 0.001 * torch.randn(n_out, generator=generator, dtype=dtype)
        self.idt = nn.Parameter(idt) if self.use_dt else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(x.shape[:-1] + (self.weight.shape[1],))
        if not self.activation:
            return y
        y = tanh(y)
        idt = self.idt
        if idt is not None:
            y = y * idt
        if self.shortcut == 1:
            y = y + x
        elif self.shortcut == 2:
            y = add_twice(y, x)
        return y


class MLP(nn.Module):
    """A stack of :class:`DenseLayer` (tanh, shortcuts as DeePMD), optional linear output layer."""

    def __init__(
        self,
        n_in: int,
        neuron: Sequence[int],
        resnet_dt: bool,
        generator: torch.Generator,
        dtype: torch.dtype,
        n_out: int = 0,
    ):
        super().__init__()
        layers: List[nn.Module] = []
        width = n_in
        for n in neuron:
            layers.append(DenseLayer(width, n, resnet=True, resnet_dt=resnet_dt, generator=generator, dtype=dtype))
            width = n
        if n_out:
            layers.append(DenseLayer(width, n_out, resnet=False, resnet_dt=False, generator=generator, dtype=dtype, activation=False))
        self.layers = nn.ModuleList(layers)
        self.dim_out = n_out or width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
