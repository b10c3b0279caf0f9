"""Dense networks of Deep Potential: embedding and fitting nets with ResNet shortcuts.

A layer maps x (width n_in) to y = tanh(x W + b) (width n_out). With shortcuts on, a layer
with n_out == n_in returns x + y, and one with n_out == 2 n_in returns (x, x) + y; with
``resnet_dt`` the residual is scaled by a trainable per-neuron timestep: x + y·dt.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
from torch import nn

from . import embedding_kernel


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


class _TanhResidual(torch.autograd.Function):
    """A layer's activation and shortcut in one node, from u = 2(x W + b):

        out = shortcut(x) + idt ⊙ tanh(u/2),   tanh(u/2) = 2σ(u) − 1

    (shortcut 0: none, 1: x, 2: (x, x); idt None: 1). The matmul stays a built-in ``addmm``
    (whose ``alpha = beta = 2`` gives u at no cost), so autograd still skips weight
    gradients nobody asked for. Writing tanh through σ(u) and folding the shortcut and
    timestep into one ``add``/``addcmul`` saves element-wise passes over the embedding nets'
    [rows, M1] tensors: inference (energy and forces) of the 192-atom water model runs
    ~5-9 % faster than with the separate nodes. Its second derivative, though, costs autograd
    more passes than theirs, so :class:`DenseLayer` uses it only when the weights get no
    gradient (inference, MD, stacked ensembles).

    σ(u) is returned as a second output and saved as such, so a second derivative (training
    on forces differentiates the force graph) sees its dependence on u. The backward is
    built from differentiable ops (``sigmoid_backward`` has its own derivative).
    """

    # Classic ``forward(ctx, ...)`` form: a separate ``setup_context`` makes every ``apply``
    # bind arguments through ``inspect.signature`` (~50 µs a call, ~1 ms per MD step here).

    @staticmethod
    def forward(ctx, u: torch.Tensor, x: torch.Tensor, idt: Optional[torch.Tensor], shortcut: int):
        s = torch.sigmoid(u)  # [..., n_out]
        if idt is None:  # out = shortcut(x) + 2σ − 1
            if shortcut == 2:
                out = torch.cat([x, x], dim=-1).add_(s, alpha=2.0)
            elif shortcut == 1:
                out = torch.add(x, s, alpha=2.0)
            else:
                out = torch.add(s, s)
            out.sub_(1.0)
        elif shortcut == 2:  # out = shortcut(x) − idt + σ·2idt
            out = torch.cat([x, x], dim=-1).sub_(idt).addcmul_(s, 2.0 * idt)
        elif shortcut == 1:
            out = torch.sub(x, idt).addcmul_(s, 2.0 * idt)
        else:
            out = torch.addcmul(-idt, s, 2.0 * idt)
        ctx.set_materialize_grads(False)
        ctx.shortcut = shortcut
        ctx.n_in = x.shape[-1]
        ctx.save_for_backward(s, idt)
        return out, s

    @staticmethod
    def backward(ctx, g: Optional[torch.Tensor], g_s: Optional[torch.Tensor]):
        s, idt = ctx.saved_tensors
        gu: Optional[torch.Tensor] = None
        gx: Optional[torch.Tensor] = None
        gidt: Optional[torch.Tensor] = None
        if g is not None:
            if idt is None:
                gu = torch.ops.aten.sigmoid_backward(g, s).mul_(2.0)  # d out/du = 2σ(1 − σ)
            else:
                gu = torch.ops.aten.sigmoid_backward(g * (2.0 * idt), s)
                if ctx.needs_input_grad[2]:
                    gidt = (g * (2.0 * s - 1.0)).sum_to_size(idt.shape)
            if ctx.needs_input_grad[1]:
                if ctx.shortcut == 1:
                    gx = g
                elif ctx.shortcut == 2:
                    n = ctx.n_in
                    gx = g[..., :n] + g[..., n:]
        if g_s is not None:
            gsu = torch.ops.aten.sigmoid_backward(g_s, s)
            gu = gsu if gu is None else gu + gsu
        return gu, gx, gidt, None


def tanh_residual(u: torch.Tensor, x: torch.Tensor, idt: Optional[torch.Tensor], shortcut: int) -> torch.Tensor:
    """shortcut(x) + idt ⊙ tanh(u/2) for u = 2(x W + b) [..., n_out], x [..., n_in].

    shortcut 0: none, 1: x (n_out = n_in), 2: (x, x) (n_out = 2 n_in); idt None means 1.
    One custom autograd node in eager mode, plain ops in TorchScript.
    """
    if torch.jit.is_scripting():
        return tanh_then_residual(u * 0.5, x, idt, shortcut)
    return _TanhResidual.apply(u, x, idt, shortcut)[0]


def tanh_then_residual(z: torch.Tensor, x: torch.Tensor, idt: Optional[torch.Tensor], shortcut: int) -> torch.Tensor:
    """shortcut(x) + idt ⊙ tanh(z), z = x W + b, as separate nodes (tanh, scaling, shortcut)."""
    y = tanh(z)
    if idt is not None:
        y = y * idt
    if shortcut == 1:
        y = y + x
    elif shortcut == 2:
        y = add_twice(y, x)
    return y


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
        """x [..., n_in] -> [..., n_out].

        Two equivalent evaluations: while the weights can receive gradients (training) a tanh
        node and separate shortcut ops, whose second derivative autograd evaluates with fewer
        passes over memory; otherwise (inference, MD, frozen or stacked models) the fused
        :func:`tanh_residual` node, which saves element-wise passes in the forward.
        """
        x2 = x.reshape(-1, x.shape[-1])  # [N, n_in]
        shape = x.shape[:-1] + (self.weight.shape[1],)
        if not self.activation:
            return torch.addmm(self.bias, x2, self.weight).reshape(shape)
        if torch.jit.is_scripting() or (torch.is_grad_enabled() and self.weight.requires_grad):
            return tanh_then_residual(torch.addmm(self.bias, x2, self.weight), x2, self.idt, self.shortcut).reshape(shape)
        u = torch.addmm(self.bias, x2, self.weight, beta=2.0, alpha=2.0)  # [N, n_out] = 2(x W + b)
        return tanh_residual(u, x2, self.idt, self.shortcut).reshape(shape)


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
        """x [..., n_in] -> [..., dim_out]; an embedding net at inference runs fused (:mod:`.embedding_kernel`)."""
        if not torch.jit.is_scripting() and x.shape[-1] == 1:
            if self._fusable(x):
                return self._fused(x)
            if self._trainable_fused(x):
                return self._training_fused(x)
        return self.forward_layers(x)

    def forward_layers(self, x: torch.Tensor) -> torch.Tensor:
        """Layer after layer, as autograd and TorchScript see it."""
        for layer in self.layers:
            x = layer(x)
        return x

    @torch.jit.unused
    def _fusable(self, x: torch.Tensor) -> bool:
        return embedding_kernel.applicable(self, x)

    @torch.jit.unused
    def _fused(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_kernel.fused_embedding(self, x)

    @torch.jit.unused
    def _trainable_fused(self, x: torch.Tensor) -> bool:
        return embedding_kernel.training_applicable(self, x)

    @torch.jit.unused
    def _training_fused(self, x: torch.Tensor) -> torch.Tensor:
        return embedding_kernel.training_embedding(self, x.reshape(-1, 1)).reshape(x.shape[:-1] + (self.dim_out,))

    @torch.jit.unused
    def rows_of(self, x: torch.Tensor, rows: List[torch.Tensor]) -> List[torch.Tensor]:
        """[self(x)[r] for r in rows], x [R, 1]: fused when possible, one accumulating backward otherwise."""
        if self._fusable(x):
            return embedding_kernel.fused_embedding_rows(self, x, rows)
        from .descriptor import gather_rows

        return gather_rows(self(x), rows)
