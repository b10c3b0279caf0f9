"""Fused embedding nets: G(s) and dG/ds in one C++ pass (``embedding_kernel.cpp``), and the weights' gradients for training.

Inference (energy and forces with frozen weights) spends about a third of its time in the
embedding nets, most of it in element-wise passes over [rows, M1] arrays that leave the
cache. The net's input is a scalar per row, so forces need only the [rows, M1] derivative
dG/ds; the kernel carries it forward beside G (the same GEMM per layer) in row blocks
that stay in the L2 cache, one block per thread. The backward is then a row-wise dot
product, ``(dE/dG · dG/ds).sum(-1)``.

The kernel is compiled with ``torch.utils.cpp_extension`` on first use (~20 s, once per
machine and source version, cached in :func:`build_directory`). Without a C++ compiler it is
skipped with one warning and the nets run layer by layer (the same values to rounding,
slower). ``DPELT_FUSED_KERNEL=0`` turns it off. TorchScript never uses it; a second derivative
through a fused inference net (``create_graph``) is recomputed layer by layer, so it stays exact.

Training steps (inside :func:`parameter_gradients_only`) use it as well: the forward gives G
and dG/ds, forces take dE/ds = dE/dG · dG/ds, and ``embedding_net_backward`` gives the weights'
gradients of the loss from the cotangents of both (:class:`_TrainingEmbedding`), instead of
autograd differentiating the nets' backward pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

SOURCE = Path(__file__).with_name("embedding_kernel.cpp")
BLOCK_ROWS = 256  # rows per block: [2 * 256, 100] float64 = 400 kB, inside a 1 MiB L2 cache

_lock = threading.Lock()
_state: dict = {"tried": False, "op": None, "error": None}


def enabled_by_environment() -> bool:
    """False when ``DPELT_FUSED_KERNEL`` is 0/false/no/off."""
    return os.environ.get("DPELT_FUSED_KERNEL", "1").strip().lower() not in ("0", "false", "no", "off")


def load_kernel() -> Optional[Callable]:
    """The compiled ``torch.ops.dpelt.embedding_net``, building it on first call; None when
    disabled or when it cannot be built (one warning says why)."""
    if not enabled_by_environment():
        return None
    if _state["tried"]:
        return _state["op"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["op"] = _build()
            except Exception as exc:  # no compiler, no ninja, headers missing: fall back, say so once
                _state["error"] = _reason(exc)
                warnings.warn(
                    f"dpelt: the fused embedding kernel could not be built ({_state['error']}); inference runs "
                    "layer by layer (energy and forces ~15 % slower). Install a C++ compiler (g++) to enable it, or set "
                    "DPELT_FUSED_KERNEL=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            _state["tried"] = True
    return _state["op"]


def _reason(exc: Exception) -> str:
    """One line for a failed build: the compiler's first error line, else the message's last."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0] if errors else (lines or [''])[-1]}"


def kernel_error() -> Optional[str]:
    """Why the kernel could not be built (None when it was built or not tried)."""
    return _state["error"]


def build_directory() -> Path:
    """Where the kernel is built: one directory per source, torch version, Python, CPU
    capability and compiler flags, under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join([torch.__version__, sys.version, _capability()] + _cflags()).encode()).hexdigest()[:12]
    return Path(root) / f"dpelt_embedding_{_capability()}_{key}"


@contextlib.contextmanager
def _ninja_on_path():
    """PATH with the ``ninja`` of the Python package ``ninja`` (a dependency), which a venv
    not activated (``.venv/bin/python …``) does not have on PATH; restored afterwards."""
    old = os.environ.get("PATH", "")
    try:
        import ninja

        if shutil.which("ninja") is None:
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except ImportError:
        pass
    try:
        yield
    finally:
        os.environ["PATH"] = old


LIBRARY = "dpelt_embedding_kernel"
FAILED = "build-failed.txt"  # in the build directory: why the last build failed


def _build() -> Callable:
    if hasattr(torch.ops, "dpelt") and hasattr(torch.ops.dpelt, "embedding_net"):
        return torch.ops.dpelt.embedding_net
    _load_or_build(build_directory())
    return torch.ops.dpelt.embedding_net


def _cflags() -> List[str]:
    # OpenMP: ATen's parallel_for is compiled into the kernel; no trapping math lets GCC
    # vectorise tanh_exp's clamps (values are unchanged)
    return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"] + _vector_flags()


def _load_or_build(where: Path) -> None:
    """Load the kernel library built in ``where``, building it first when there is none.

    Builders hold an exclusive flock on ``where/dpelt.lock`` (Snakemake starts jobs in
    parallel: one builds, the others wait), loaders a shared one, so nobody loads a library
    being linked. An flock dies with its process; torch's own ``lock`` file does not, so one
    left by a killed build is removed under the exclusive flock. A compile error is written
    to ``build-failed.txt`` so that later processes do not compile again; other failures
    (disk full, a killed compiler) are not remembered.
    """
    import fcntl

    built = where / f"{LIBRARY}.so"
    if built.exists():  # built before: no compiler, ninja or writable cache needed
        try:
            lock = open(where / "dpelt.lock", "a")
        except OSError:  # a read-only cache: nobody builds there
            lock = None
        try:
            if lock is not None:
                fcntl.flock(lock, fcntl.LOCK_SH)
            torch.ops.load_library(str(built))
            return
        except (OSError, RuntimeError):  # a truncated file from a killed build: build again
            pass
        finally:
            if lock is not None:
                lock.close()
    _raise_if_failed_before(where)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(shlex.split(compiler)[0] if compiler.strip() else "c++") is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH")
    from torch.utils.cpp_extension import load

    where.mkdir(parents=True, exist_ok=True)
    with open(where / "dpelt.lock", "a") as lock, _ninja_on_path():
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"dpelt: waiting for another process to build the fused embedding kernel in {where}", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
            _raise_if_failed_before(where)
            if built.exists():  # the other process built it
                try:
                    torch.ops.load_library(str(built))
                    return
                except (OSError, RuntimeError):
                    pass
        built.unlink(missing_ok=True)
        (where / "lock").unlink(missing_ok=True)
        try:
            load(
                name=LIBRARY,
                sources=[str(SOURCE)],
                extra_cflags=_cflags(),
                extra_ldflags=["-fopenmp"],
                build_directory=str(where),
                is_python_module=False,
                verbose=False,
            )
        except Exception as exc:
            reason = _reason(exc)
            if "error:" in reason:  # the compiler refused the source: the same next time
                try:
                    (where / FAILED).write_text(reason + "\n")
                except OSError:
                    pass
            raise


def _raise_if_failed_before(where: Path) -> None:
    failed = where / FAILED
    if failed.exists():
        raise RuntimeError(f"{failed.read_text().strip() or 'failed'} (an earlier build in {where}; delete {failed} to retry)")


def _capability() -> str:
    """The vector instruction set the kernel is built for: the one torch uses on this CPU."""
    cap = torch.backends.cpu.get_cpu_capability().lower()
    return cap if cap in ("avx2", "avx512") else "default"


def _vector_flags() -> List[str]:
    """Compiler flags for :func:`_capability` (the build is cached per capability, so a node
    without AVX2 never loads an AVX2 build)."""
    return {"avx2": ["-mavx2", "-mfma"], "avx512": ["-mavx2", "-mfma", "-mavx512f", "-mprefer-vector-width=512"]}.get(_capability(), [])


def packed_layers(mlp: torch.nn.Module, params: Optional[List[torch.Tensor]] = None) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[int]]:
    """(weights, biases, timesteps — empty when none —, shortcuts) of an MLP's layers, detached;
    taken from ``params`` (in :func:`_layer_parameters` order, e.g. saved tensors) when given."""
    tensors = iter(_layer_parameters(mlp) if params is None else params)
    weights, biases, steps, shortcuts = [], [], [], []
    for layer in mlp.layers:
        weights.append(next(tensors).detach().contiguous())
        biases.append(next(tensors).detach().contiguous())
        steps.append(next(tensors).detach().contiguous() if layer.idt is not None else layer.weight.new_empty(0))
        shortcuts.append(int(layer.shortcut))
    return weights, biases, steps, shortcuts


def applicable(mlp: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`fused_embedding` can evaluate ``mlp`` on ``x``: a float64 CPU net of tanh
    layers with one input, in eval mode with no parameter requiring a gradient (or grad mode
    off), and the kernel available."""
    layers = mlp.layers
    if x.shape[-1] != 1 or x.dtype != torch.float64 or x.device.type != "cpu" or len(layers) == 0:
        return False
    if torch.is_grad_enabled() and (mlp.training or any(p.requires_grad for p in mlp.parameters())):
        return False  # training: parameters may want gradients, or a force loss a second derivative
    for layer in layers:
        if not layer.activation or layer.weight.dtype != torch.float64:
            return False
    return load_kernel() is not None


def _evaluate(mlp: torch.nn.Module, x: torch.Tensor, tangent: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The kernel on x [..., 1]: (G [R, M1], dG/ds [R, M1] or empty when not ``tangent``)."""
    g, gp = load_kernel()(x.reshape(-1).contiguous(), *packed_layers(mlp), tangent, BLOCK_ROWS)
    return g, gp


class _FusedEmbedding(torch.autograd.Function):
    """x [..., 1] -> G [..., M1] by the kernel; backward (dE/dG · dG/ds).sum(-1)."""

    # Classic ``forward(ctx, ...)`` form: a separate ``setup_context`` binds arguments through
    # ``inspect.signature`` on every call.

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: torch.nn.Module):
        g, gp = _evaluate(mlp, x, bool(ctx.needs_input_grad[0]))
        ctx.mlp = mlp
        ctx.save_for_backward(x, gp)
        return g.reshape(x.shape[:-1] + (g.shape[-1],))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: recompute layer by layer so higher derivatives are exact
            with torch.enable_grad():
                g = ctx.mlp.forward_layers(x)
                (gx,) = torch.autograd.grad(g, x, grad, create_graph=True)
            return gx, None
        gx = torch.ops.dpelt.gathered_row_dot(grad.reshape(gp.shape), gp, _NO_ROWS)  # [R]
        return gx.reshape(x.shape), None


class _FusedGatheredEmbedding(torch.autograd.Function):
    """(x [R, 1], mlp, rows_1 [N_1], rows_2 [N_2], …) -> (G[rows_1], G[rows_2], …), G = mlp(x).

    The embedding of shared rows (:meth:`DescriptorSeA._shared_rows`): evaluated once per
    distinct row, used by several slots. The backward needs no [R, M1] gradient buffer:
    dE/dx[r] = Σ over the uses i of r of dE/dG_i · dG/ds[r], a dot product per use scattered
    into R scalars.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: torch.nn.Module, *rows: torch.Tensor):
        g, gp = _evaluate(mlp, x, bool(ctx.needs_input_grad[0]))
        ctx.mlp = mlp
        ctx.save_for_backward(x, gp, *rows)
        return tuple(g.index_select(0, r) for r in rows)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        x, gp, *rows = ctx.saved_tensors
        none = (None,) * (1 + len(rows))
        if torch.is_grad_enabled():  # create_graph: recompute layer by layer so higher derivatives are exact
            with torch.enable_grad():
                g = ctx.mlp.forward_layers(x)
                outs = [g.index_select(0, r) for r, gr in zip(rows, grads) if gr is not None]
                used = [gr for gr in grads if gr is not None]
                (gx,) = torch.autograd.grad(outs, x, used, create_graph=True)
            return (gx,) + none
        gx = torch.zeros(x.shape[0], dtype=x.dtype)  # [R]
        for r, gr in zip(rows, grads):
            if gr is not None and r.numel() > 0:
                gx.index_add_(0, r, torch.ops.dpelt.gathered_row_dot(gr, gp, r))
        return (gx.reshape(x.shape),) + none


_NO_ROWS = torch.empty(0, dtype=torch.long)


_training = threading.local()


@contextlib.contextmanager
def parameter_gradients_only():
    """Inside: embedding nets whose weights take gradients run through the training kernel
    (:class:`_TrainingEmbedding`), for a caller that differentiates the energy once with
    respect to positions (forces, ``create_graph``) and then the loss only with respect to
    the parameters, as a training step does. Second derivatives with respect to positions
    (a Hessian) are not available inside; outside, autograd runs layer by layer as usual.
    """
    before = getattr(_training, "on", False)
    _training.on = True
    try:
        yield
    finally:
        _training.on = before


def training_applicable(mlp: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`training_embedding` applies: inside :func:`parameter_gradients_only`,
    grad mode on, a float64 CPU net of tanh layers with one input, and the kernel available."""
    if not getattr(_training, "on", False) or not torch.is_grad_enabled():
        return False
    layers = mlp.layers
    if x.shape[-1] != 1 or x.dtype != torch.float64 or x.device.type != "cpu" or len(layers) == 0:
        return False
    for layer in layers:
        if not layer.activation or layer.weight.dtype != torch.float64:
            return False
    return load_kernel() is not None


def _layer_parameters(mlp: torch.nn.Module) -> List[torch.Tensor]:
    """The parameters of an MLP's layers in kernel order: per layer weight, bias, timestep (if any)."""
    out: List[torch.Tensor] = []
    for layer in mlp.layers:
        out += [layer.weight, layer.bias] + ([layer.idt] if layer.idt is not None else [])
    return out


class _TrainingEmbedding(torch.autograd.Function):
    """x [R, 1] -> (G [R, M1], dG/ds [R, M1]) by the kernel, for a training step.

    Forces differentiate the energy with respect to s once: the backward called under
    ``create_graph`` returns (dE/dG · dG/ds).sum(-1) built from differentiable ops on the
    saved dG/ds, so the loss reaches the weights through dG/ds without autograd
    differentiating the net's own backward (its second derivative). The backward called for
    the loss (grad mode off) returns the parameter gradients from both cotangents, computed by
    ``embedding_net_backward`` block by block (forward recomputed in cache), and the
    first-order dE/ds (so forces computed without ``create_graph`` are right too). The
    parameters are saved tensors: changing one in place before the backward is an error, as
    on the layer path. Not supported, and refused where it can be seen: a loss differentiated
    with ``create_graph`` through dG/ds (a second derivative with respect to positions, or a
    higher-order optimiser); use only inside :func:`parameter_gradients_only`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, mlp: torch.nn.Module, *params: torch.Tensor):
        g, gp = _evaluate(mlp, x, True)
        ctx.mlp = mlp
        ctx.n_params = len(params)
        ctx.set_materialize_grads(False)  # an output nobody used gets None, not zeros
        ctx.save_for_backward(x, gp, *params)
        return g, gp

    @staticmethod
    def backward(ctx, g_g: Optional[torch.Tensor], g_gp: Optional[torch.Tensor]):
        x, gp, *params = ctx.saved_tensors
        none = (None,) * ctx.n_params
        if torch.is_grad_enabled():  # the force pass: d/ds only, differentiable through dG/ds
            if g_gp is not None:
                raise RuntimeError(
                    "dpelt: a second derivative through an embedding net's dG/ds with create_graph was asked for inside "
                    "parameter_gradients_only(), which gives parameter gradients only; run it outside that context"
                )
            if g_g is None:
                return (None, None) + none
            return ((g_g * gp).sum(-1, keepdim=True), None) + none
        if g_g is None:
            g_g = torch.zeros_like(gp)
        gx = torch.ops.dpelt.gathered_row_dot(g_g, gp, _NO_ROWS).reshape(x.shape)  # dE/ds, first order
        return (gx, None) + _parameter_gradients(ctx.mlp, x, params, g_g, g_gp)


def _parameter_gradients(mlp: torch.nn.Module, x: torch.Tensor, params: List[torch.Tensor], g_g: torch.Tensor, g_gp: Optional[torch.Tensor]) -> tuple:
    """The gradients of ``params`` (the saved :func:`_layer_parameters`, in that order) for
    cotangents g_g of G and g_gp of dG/ds (None: zero), from ``embedding_net_backward``."""
    weights, biases, steps, shortcuts = packed_layers(mlp, params)
    empty = g_g.new_empty(0)
    grads = torch.ops.dpelt.embedding_net_backward(x.reshape(-1).contiguous(), weights, biases, steps, shortcuts, g_g, empty if g_gp is None else g_gp, BLOCK_ROWS)
    out: List[torch.Tensor] = []
    for j, layer in enumerate(mlp.layers):
        out += [grads[3 * j], grads[3 * j + 1]] + ([grads[3 * j + 2]] if layer.idt is not None else [])
    return tuple(out)


def training_embedding(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G = mlp(x) for x [R, 1] in a training step (check :func:`training_applicable` first)."""
    return _TrainingEmbedding.apply(x, mlp, *_layer_parameters(mlp))[0]


def fused_embedding(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """G = mlp(x) for x [..., 1] through the fused kernel (check :func:`applicable` first)."""
    return _FusedEmbedding.apply(x, mlp)


def fused_embedding_rows(mlp: torch.nn.Module, x: torch.Tensor, rows: List[torch.Tensor]) -> List[torch.Tensor]:
    """[mlp(x)[r] for r in rows] for x [R, 1] through the fused kernel (check :func:`applicable`)."""
    return list(_FusedGatheredEmbedding.apply(x, mlp, *rows))
