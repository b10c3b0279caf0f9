"""Compressed inference: the embedding nets tabulated as quintic Hermite splines.

An embedding net maps one scalar, the normalised s_n = (s(r) − davg)/dstd of a neighbour
slot, to a row G [M1]. For inference it is replaced by a piecewise polynomial on a uniform
grid x_k = x0 + k·h of that input: on [x_k, x_k+1], with t = (x − x_k)/h,

    G(x) = Σ_{p=0..5} c_kp t^p

the quintic Hermite interpolant matching the net's value, first and second derivative at
both nodes (computed exactly, by forward-mode differentiation through the layers:
:func:`net_derivatives`). So the table is C² at the nodes, as the net is smooth, and its
error is O(h⁶ |G⁽⁶⁾|): with h = 0.01 it equals the nets to ~1e-12 relative.

Range. The grid starts one step below the input of an empty slot (s = 0, i.e. r ≥ rcut, the
smallest input a centre type gives this net; empty slots fall on node 1) and ends at the input of s = 1/r_min (r_min = :data:`TABLE_RMIN` Å, the default
closest approach of exploration's guards). Extrapolation rule: a row outside the table (two
atoms closer than r_min, a NaN) is evaluated by the net itself, exactly, so the table never
gives a value the net would not; it only costs speed.

The table is built from the statistics and weights in memory by :meth:`DeepPot.compress
<pipeline.model.deeppot.DeepPot.compress>`; it is never saved and never trained (a compressed
model in training mode refuses to run). Forces and virial come from dG/dx of the same
polynomial (the C++ op ``tabulated_embedding`` gives G and dG/dx in one pass); a second
derivative (``create_graph``, the exploration bias) is taken through :meth:`EmbeddingTable.reference`,
the same polynomial in torch ops.
"""

from __future__ import annotations

import logging
import math
from typing import List, Sequence, Tuple

import torch

from . import embedding_kernel
from .env_mat import smooth_switch

TABLE_STEP = 0.01  # grid step in the normalised input (dimensionless)
TABLE_RMIN = 0.5  # Å: the table covers distances from this to rcut; closer pairs use the net

log = logging.getLogger("dpelt.model")


def net_derivatives(mlp: torch.nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [R] -> (G, dG/dx, d²G/dx²), each [R, M1], exactly, for an embedding net of tanh layers.

    Forward mode through every layer: with z = x W + b, y = tanh(z),
    y' = (1 − y²) z',  y'' = (1 − y²) z'' − 2 y (1 − y²) z'²; the shortcut and timestep are linear.
    """
    h = x.reshape(-1, 1)  # [R, 1]
    d1 = torch.ones_like(h)
    d2 = torch.zeros_like(h)
    for layer in mlp.layers:
        w, b = layer.weight.detach(), layer.bias.detach()
        z, z1, z2 = h @ w + b, d1 @ w, d2 @ w  # [R, n_out]
        y = torch.tanh(z)
        dy = 1.0 - y * y
        y1, y2 = dy * z1, dy * z2 - 2.0 * y * dy * z1 * z1
        if layer.idt is not None:
            a = layer.idt.detach()
            y, y1, y2 = y * a, y1 * a, y2 * a
        if layer.shortcut == 1:
            y, y1, y2 = y + h, y1 + d1, y2 + d2
        elif layer.shortcut == 2:
            y, y1, y2 = y + torch.cat([h, h], 1), y1 + torch.cat([d1, d1], 1), y2 + torch.cat([d2, d2], 1)
        h, d1, d2 = y, y1, y2
    return h, d1, d2


def hermite_coefficients(f: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, h: float) -> torch.Tensor:
    """Node values f, slopes d1, curvatures d2 [n + 1, M] -> coefficients [n, 6, M] of the
    quintic on each interval, in t = (x − x_k)/h, matching all three at both ends."""
    f0, f1 = f[:-1], f[1:]
    s0, s1 = d1[:-1] * h, d1[1:] * h
    a0, a1 = d2[:-1] * h * h, d2[1:] * h * h
    F = f1 - f0 - s0 - 0.5 * a0  # what is left of the value at t = 1
    D = s1 - s0 - a0  # of the slope
    A = a1 - a0  # of the curvature
    c3 = 10.0 * F - 4.0 * D + 0.5 * A
    c4 = -15.0 * F + 7.0 * D - A
    c5 = 6.0 * F - 3.0 * D + 0.5 * A
    return torch.stack([f0, s0, 0.5 * a0, c3, c4, c5], dim=1).contiguous()


class _TabulatedRows(torch.autograd.Function):
    """x [R] (every row inside the table) -> G [R, M1] by the C++ op; backward (dE/dG · dG/dx).sum(-1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: "EmbeddingTable"):
        g, gp = torch.ops.dpelt.tabulated_embedding(x.contiguous(), table.coeffs, table.x0, table.h, bool(ctx.needs_input_grad[0]))
        ctx.table = table
        ctx.save_for_backward(x, gp)
        return g

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the same polynomial in torch ops, differentiable again
            with torch.enable_grad():  # through the saved x, so the result stays connected to the graph
                (gx,) = torch.autograd.grad(ctx.table.polynomial(x), x, grad, create_graph=True)
            return gx, None
        return torch.ops.dpelt.gathered_row_dot(grad.contiguous(), gp, _NO_ROWS), None


_NO_ROWS = torch.empty(0, dtype=torch.long)


class _TabulatedContraction(torch.autograd.Function):
    """(x [n, c] inside the table, rr [n, c, 4], table) -> T = Σ_j rr_jᵀ G(x_j) [n, 4, M1] by the
    C++ op ``tabulated_contraction``: G is evaluated row by row in cache, never stored."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rr: torch.Tensor, table: "EmbeddingTable"):
        ctx.table = table
        ctx.save_for_backward(x, rr)
        return torch.ops.dpelt.tabulated_contraction(x, rr, table.coeffs, table.x0, table.h)

    @staticmethod
    def backward(ctx, dT: torch.Tensor):
        x, rr = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the reference contraction in torch ops
            with torch.enable_grad():
                t = torch.matmul(rr.transpose(1, 2), ctx.table.polynomial(x.reshape(-1)).reshape(x.shape + (-1,)))
                dx, drr = torch.autograd.grad(t, (x, rr), dT, create_graph=True, allow_unused=True)
            return dx, drr, None
        dx, drr = torch.ops.dpelt.tabulated_contraction_backward(x, rr, ctx.table.coeffs, ctx.table.x0, ctx.table.h, dT)
        return dx, drr, None


class EmbeddingTable:
    """One embedding net tabulated on [x0, x0 + n·h]; rows outside go to the net (``net``)."""

    def __init__(self, net: torch.nn.Module, x_lo: float, x_hi: float, step: float = TABLE_STEP):
        if not (math.isfinite(x_lo) and math.isfinite(x_hi) and x_hi > x_lo and step > 0):
            raise ValueError(f"cannot tabulate an embedding net on [{x_lo}, {x_hi}] with step {step}")
        self.net = net
        self.h = float(step)
        # one interval of margin below: an empty slot's input, computed elsewhere, may round below x_lo
        n = int(math.ceil((x_hi - x_lo) / self.h)) + 1
        self.x0 = float(x_lo) - self.h
        self.x1 = self.x0 + n * self.h
        nodes = self.x0 + self.h * torch.arange(n + 1, dtype=torch.float64)  # [n + 1]
        with torch.no_grad():
            f, d1, d2 = net_derivatives(net, nodes.to(net.layers[0].weight.dtype))
            self.coeffs = hermite_coefficients(f.double(), d1.double(), d2.double(), self.h)  # [n, 6, M1]
        self.use_kernel = embedding_kernel.load_kernel() is not None

    @property
    def intervals(self) -> int:
        return int(self.coeffs.shape[0])

    def polynomial(self, x: torch.Tensor) -> torch.Tensor:
        """x [R] inside the table -> G [R, M1]: the reference evaluation in torch ops
        (differentiable in x to any order; the interval index is a constant)."""
        u = (x - self.x0) / self.h
        k = u.detach().floor().clamp(0, self.intervals - 1)
        t = (u - k).unsqueeze(-1)  # [R, 1]
        c = self.coeffs.index_select(0, k.long())  # [R, 6, M1]
        g = c[:, 5]
        for p in range(4, -1, -1):
            g = g * t + c[:, p]
        return g

    def _inside(self, x: torch.Tensor) -> torch.Tensor:
        """x [R] -> rows the table covers (NaN is outside, so it reaches the net and the energy)."""
        return (x >= self.x0) & (x <= self.x1)

    def contract(self, x: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """Σ_j rr_jᵀ G(x_j): x [n, c, 1], rr [n, c, 4] -> [n, 4, M1]; in one C++ pass when every
        row is inside the table, else G by rows (the extrapolation rule) and a matmul."""
        xf = x.reshape(x.shape[0], x.shape[1])
        if self.use_kernel and x.dtype == torch.float64 and rr.dtype == torch.float64 and bool(self._inside(xf).all()):
            return _TabulatedContraction.apply(xf.contiguous(), rr.contiguous(), self)
        return torch.matmul(rr.transpose(1, 2), self(x))

    def __call__(self, x: torch.Tensor, reference: bool = False) -> torch.Tensor:
        """x [..., 1] -> G [..., M1]; ``reference`` evaluates the table in torch ops (:meth:`polynomial`)."""
        xf = x.reshape(-1).to(torch.float64)
        shape = x.shape[:-1] + (self.coeffs.shape[2],)
        fast = self.use_kernel and not reference
        inside = self._inside(xf)
        if bool(inside.all()):
            g = _TabulatedRows.apply(xf, self) if fast else self.polynomial(xf)
            return g.to(x.dtype).reshape(shape)
        rows_in = torch.nonzero(inside).squeeze(1)
        rows_out = torch.nonzero(~inside).squeeze(1)
        x_in = xf.index_select(0, rows_in)
        g_in = _TabulatedRows.apply(x_in, self) if fast else self.polynomial(x_in)  # [R_in, M1]
        g_out = self.net.forward_layers(x.reshape(-1, 1).index_select(0, rows_out)).to(torch.float64)  # [R_out, M1]: the extrapolation rule
        g = torch.zeros(xf.shape[0], g_in.shape[1], dtype=torch.float64).index_copy(0, rows_in, g_in).index_copy(0, rows_out, g_out)
        return g.to(x.dtype).reshape(shape)


def input_range(davg: torch.Tensor, dstd: torch.Tensor, rcut_smth: float, rcut: float, rmin: float) -> Tuple[float, float]:
    """The embedding input range of one net from the statistics of its slots.

    davg, dstd [..., 4] (the rows of the centre types and slots the net serves): from
    s = 0 (empty slot, r ≥ rcut) to s(rmin) = sw(rmin)/rmin (Å⁻¹), s decreasing in r.
    """
    if not 0 < rmin < rcut:
        raise ValueError(f"table rmin {rmin} Å must lie in (0, rcut = {rcut} Å)")
    s_max = float(smooth_switch(torch.tensor(rmin, dtype=torch.float64), rcut_smth, rcut)) / rmin
    mean, std = davg[..., 0].reshape(-1).double(), dstd[..., 0].reshape(-1).double()
    lo = float(((0.0 - mean) / std).min())
    hi = float(((s_max - mean) / std).max())
    return lo, hi


def tabulate_descriptor(descriptor, step: float = TABLE_STEP, rmin: float = TABLE_RMIN) -> List[EmbeddingTable]:
    """One :class:`EmbeddingTable` per embedding net of a :class:`~.descriptor.DescriptorSeA`."""
    from .descriptor import net_types

    tables: List[EmbeddingTable] = []
    for k, net in enumerate(descriptor.embeddings):
        tj, serves = net_types(k, descriptor.ntypes, descriptor.type_one_side)
        a, b = descriptor.sec[tj], descriptor.sec[tj + 1]
        centres = slice(None) if serves < 0 else slice(serves, serves + 1)
        lo, hi = input_range(descriptor.davg[centres, a:b], descriptor.dstd[centres, a:b], descriptor.rcut_smth, descriptor.rcut, rmin)
        tables.append(EmbeddingTable(net, lo, hi, step))
    return tables


class StackedTable:
    """M members' tables of one embedding net: x [M, ..., 1] -> G [M, ..., M1] (one op per member)."""

    def __init__(self, tables: Sequence[EmbeddingTable]):
        self.tables = list(tables)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([t(x[m]) for m, t in enumerate(self.tables)])

    def contract(self, x: torch.Tensor, rr: torch.Tensor) -> torch.Tensor:
        """x [M, n, c, 1], rr [M, n, c, 4] -> Σ_j rr_jᵀ G_m(x_j) [M, n, 4, M1]."""
        return torch.stack([t.contract(x[m], rr[m]) for m, t in enumerate(self.tables)])


def describe(tables: Sequence[EmbeddingTable]) -> str:
    """One line for the log: size and evaluation of a model's tables."""
    n = sum(t.intervals for t in tables)
    mb = sum(t.coeffs.numel() for t in tables) * 8 / 1e6
    how = "C++ op" if all(t.use_kernel for t in tables) else f"torch ops (C++ kernel unavailable: {embedding_kernel.kernel_error()})"
    return f"{len(tables)} embedding nets tabulated: {n} quintic intervals of step {tables[0].h if tables else TABLE_STEP}, {mb:.1f} MB, evaluated by {how}"

