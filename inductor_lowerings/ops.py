"""Registration of the custom ops ``bdpass::bd_project``, ``bdpass::pivot_linear`` and
``bdpass::bd_linear`` (whose contract is in :mod:`inductor_lowerings.bd_linear`), and how
each one reaches the compiler.

``bdpass::bd_project(Tensor x, Tensor rows, Tensor rest, Tensor w_rest, Tensor? bias,
bool shared=False) -> Tensor``

    ``x`` (..., d_in); ``rows`` int64 (H, g): the identity rows of each head;
    ``rest`` int64 (H, d_in - g): the other rows of each head; ``w_rest``
    (H, d_in - g, g); ``bias`` (H, g) or None. Returns (..., H*g) with
    ``y[..., h*g + j] = x[..., rows[h, j]] + sum_k x[..., rest[h, k]] w_rest[h, k, j]
    (+ bias[h, j])``. With ``shared=True`` every head reads the tables of head 0
    (``rows[0]``, ``rest[0]``): the caller asserts that all heads share their rows,
    and the projection becomes one GEMM over the rest rows for all heads at once.

``bdpass::pivot_linear(Tensor x, Tensor w_p, Tensor? b_p, Tensor coeff, Tensor? b_r,
Tensor pivots, Tensor rest) -> Tensor``

    ``x`` (..., d_in); ``w_p`` (d_in, r); ``b_p`` (r,) or None; ``coeff``
    (r, d_out - r); ``b_r`` (d_out - r,) or None; ``pivots`` int64 (r,) and ``rest``
    int64 (d_out - r,): disjoint, together every column of the output once. Returns
    (..., d_out) with ``y[..., pivots] = x @ w_p (+ b_p)`` and
    ``y[..., rest] = y[..., pivots] @ coeff (+ b_r)``.

Common rules: floating operands share ``x``'s dtype and device (the output has them too);
index tables are int64 on the same device and are not bounds-checked by the Triton
kernels (they are compile-time metadata built by :mod:`bdpass.identities`). The output
is contiguous.

What each op has (there is no hand-written Inductor lowering: each op is either decomposed
into ops Inductor compiles, or called by Inductor's generated code as an opaque kernel):

* ``bd_project`` and ``pivot_linear``:
  - a fake kernel (shape, dtype and device checks, an empty output);
  - CUDA with Triton installed and ``torch.library.triton_op`` available: a ``triton_op``
    whose body launches the kernels of :mod:`inductor_lowerings.triton_kernels` through
    ``wrap_triton``; under ``torch.compile`` AOTAutograd decomposes it into those kernel
    calls, so Inductor schedules and launches the kernels itself;
  - everything else (CPU; CUDA without Triton): a ``custom_op`` whose body is
    :mod:`inductor_lowerings.aten_impl`, decomposed into those aten ops while AOTAutograd
    functionalizes (as a ``triton_op`` is), so Inductor's CPU code generation fuses the
    gathers and additions with their neighbours;
  - autograd: backward formulas in aten ops.
* ``bd_linear`` (what the ``bd`` backend emits):
  - a fake kernel;
  - one implementation for every device, :func:`inductor_lowerings.bd_linear.bd_linear_blocks`:
    per block, the identity rows written into the block's output columns and one GEMM
    accumulated onto them (``addmm_`` into strided views on CPU; on CUDA with Triton, the
    ``bd_block_triton`` kernel);
  - opaque to Inductor under ``torch.compile`` (its kernels are the point: each block is
    written in place in the output, with no gather pass and no concatenation), but
    decomposed into its aten reference
    (:func:`inductor_lowerings.bd_linear.bd_linear_reference`) under ``torch.export``, so an
    exported or AOTInductor-packaged program runs without this package;
  - autograd: through the aten reference.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .aten_impl import bd_project_aten, pivot_linear_aten
from .bd_linear import bd_linear_blocks, bd_linear_fake, bd_linear_reference

__all__ = ["HAS_TRITON_KERNELS", "bd_linear", "bd_project", "pivot_linear"]

try:  # Triton is optional: without it the aten implementation serves every device.
    from torch.library import triton_op

    from .triton_kernels import bd_block_triton, bd_project_triton, pivot_linear_triton   # imports triton
    HAS_TRITON_KERNELS = True
except Exception:  # ImportError, or a Triton build that fails to import
    HAS_TRITON_KERNELS = False


def _use_triton(x: torch.Tensor) -> bool:
    return HAS_TRITON_KERNELS and x.device.type == "cuda"


# ----------------------------------------------------------------------------- bd_project
def _bd_project(x: torch.Tensor, rows: torch.Tensor, rest: torch.Tensor, w_rest: torch.Tensor,
                bias: Optional[torch.Tensor], shared: bool = False) -> torch.Tensor:
    if _use_triton(x):
        return bd_project_triton(x, rows, rest, w_rest, bias, shared)
    return bd_project_aten(x, rows, rest, w_rest, bias, shared)


def _check_same(x: torch.Tensor, t: Optional[torch.Tensor], what: str, index: bool = False) -> None:
    if t is None:
        return
    want = torch.int64 if index else x.dtype
    torch._check(t.dtype == want, lambda: f"{what} must have dtype {want}, got {t.dtype}")
    torch._check(t.device == x.device, lambda: f"{what} is on {t.device}, x on {x.device}")


def _bd_project_fake(x, rows, rest, w_rest, bias, shared=False):
    torch._check(x.dim() >= 1, lambda: "x must have a channel dimension")
    torch._check(rows.dim() == 2 and rest.dim() == 2 and w_rest.dim() == 3,
                 lambda: "expected rows (H, g), rest (H, d_in - g), w_rest (H, d_in - g, g)")
    H, G = rows.shape
    K = rest.shape[1]
    torch._check(rest.shape[0] == H, lambda: f"rest has {rest.shape[0]} heads, rows {H}")
    torch._check(x.shape[-1] == G + K, lambda: f"x has {x.shape[-1]} channels, rows+rest cover {G + K}")
    torch._check(tuple(w_rest.shape) == (H, K, G),
                 lambda: f"w_rest must have shape {(H, K, G)}, got {tuple(w_rest.shape)}")
    if bias is not None:
        torch._check(tuple(bias.shape) == (H, G), lambda: f"bias must have shape {(H, G)}, got {tuple(bias.shape)}")
    for t, what, idx in ((rows, "rows", True), (rest, "rest", True), (w_rest, "w_rest", False),
                         (bias, "bias", False)):
        _check_same(x, t, what, idx)
    return x.new_empty((*x.shape[:-1], H * G))


def _bd_setup(ctx, inputs, output):
    x, rows, rest, w_rest, bias = inputs[:5]
    ctx.shared = bool(inputs[5]) if len(inputs) > 5 else False
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, rows, rest, w_rest)


def _bd_backward(ctx, gy):
    x, rows, rest, w_rest = ctx.saved_tensors
    H, G = rows.shape
    K = rest.shape[1]
    d_in = x.shape[-1]
    if ctx.shared:
        rows, rest = rows[:1].expand(H, G), rest[:1].expand(H, K)
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    g3 = gy.reshape(M, H, G)
    gx = gw = gb = None
    need = ctx.needs_input_grad            # (shared may be left out when at its default)
    need_x, need_w, need_b = need[0], need[3], need[4]
    if need_x:
        gx = x2.new_zeros((M, d_in))
        gx = gx.index_add(1, rows.reshape(-1), g3.reshape(M, H * G))
        gr = torch.einsum("mhg,hkg->mhk", g3, w_rest).reshape(M, H * K)
        gx = gx.index_add(1, rest.reshape(-1), gr).reshape(x.shape)
    if need_w:
        xr = x2.index_select(1, rest.reshape(-1)).view(M, H, K)
        gw = torch.einsum("mhk,mhg->hkg", xr, g3)
    if need_b and ctx.has_bias:
        gb = g3.sum(0)
    return (gx, None, None, gw, gb, None)[:len(need)]


# ----------------------------------------------------------------------------- pivot_linear
def _pivot_linear(x: torch.Tensor, w_p: torch.Tensor, b_p: Optional[torch.Tensor],
                  coeff: torch.Tensor, b_r: Optional[torch.Tensor],
                  pivots: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return pivot_linear_triton(x, w_p, b_p, coeff, b_r, pivots, rest)
    return pivot_linear_aten(x, w_p, b_p, coeff, b_r, pivots, rest)


def _pivot_linear_fake(x, w_p, b_p, coeff, b_r, pivots, rest):
    torch._check(x.dim() >= 1, lambda: "x must have a channel dimension")
    torch._check(w_p.dim() == 2 and coeff.dim() == 2 and pivots.dim() == 1 and rest.dim() == 1,
                 lambda: "expected w_p (d_in, r), coeff (r, d_out - r), pivots (r,), rest (d_out - r,)")
    d_in, R = w_p.shape
    N = coeff.shape[1]
    torch._check(x.shape[-1] == d_in, lambda: f"x has {x.shape[-1]} channels, w_p expects {d_in}")
    torch._check(coeff.shape[0] == R, lambda: f"coeff has {coeff.shape[0]} rows, w_p {R} columns")
    torch._check(pivots.shape[0] == R, lambda: f"pivots must have {R} entries, got {pivots.shape[0]}")
    torch._check(rest.shape[0] == N, lambda: f"rest must have {N} entries, got {rest.shape[0]}")
    if b_p is not None:
        torch._check(tuple(b_p.shape) == (R,), lambda: f"b_p must have shape ({R},), got {tuple(b_p.shape)}")
    if b_r is not None:
        torch._check(tuple(b_r.shape) == (N,), lambda: f"b_r must have shape ({N},), got {tuple(b_r.shape)}")
    for t, what, idx in ((w_p, "w_p", False), (b_p, "b_p", False), (coeff, "coeff", False),
                         (b_r, "b_r", False), (pivots, "pivots", True), (rest, "rest", True)):
        _check_same(x, t, what, idx)
    return x.new_empty((*x.shape[:-1], R + N))


def _pivot_setup(ctx, inputs, output):
    x, w_p, b_p, coeff, b_r, pivots, rest = inputs
    ctx.has_bp, ctx.has_br = b_p is not None, b_r is not None
    ctx.save_for_backward(x, w_p, coeff, pivots, rest, output)


def _pivot_backward(ctx, gy):
    x, w_p, coeff, pivots, rest, out = ctx.saved_tensors
    d_in = x.shape[-1]
    x2 = x.reshape(-1, d_in)
    g2 = gy.reshape(x2.shape[0], -1)
    yp = out.reshape(x2.shape[0], -1).index_select(1, pivots)
    g_r = g2.index_select(1, rest)
    g_p = g2.index_select(1, pivots) + g_r @ coeff.t()
    need = ctx.needs_input_grad
    gx = (g_p @ w_p.t()).reshape(x.shape) if need[0] else None
    gwp = x2.t() @ g_p if need[1] else None
    gbp = g_p.sum(0) if need[2] and ctx.has_bp else None
    gc = yp.t() @ g_r if need[3] else None
    gbr = g_r.sum(0) if need[4] and ctx.has_br else None
    return gx, gwp, gbp, gc, gbr, None, None


# ----------------------------------------------------------------------------- bd_linear
def _bd_linear(x: torch.Tensor, sel: list[torch.Tensor], rest: list[torch.Tensor], weight: list[torch.Tensor],
               bias: list[Optional[torch.Tensor]], block_table: list[int], block_col: list[int],
               d_out: int) -> torch.Tensor:
    return bd_linear_blocks(x, sel, rest, weight, bias, block_table, block_col, d_out,
                            bd_block=bd_block_triton if _use_triton(x) else None)


def _bd_linear_setup(ctx, inputs, output):
    x, sel, rest, weight, bias, block_table, block_col, d_out = inputs
    ctx.meta = (len(sel), len(weight), [b is not None for b in bias], list(block_table), list(block_col), d_out)
    ctx.save_for_backward(x, *sel, *rest, *weight, *[b for b in bias if b is not None])


def _bd_linear_backward(ctx, gy):
    T, n, has_b, block_table, block_col, d_out = ctx.meta
    saved = list(ctx.saved_tensors)
    x, sel, rest, weight = saved[0], saved[1:1 + T], saved[1 + T:1 + 2 * T], saved[1 + 2 * T:1 + 2 * T + n]
    it = iter(saved[1 + 2 * T + n:])
    bias = [next(it) if h else None for h in has_b]
    leaves = [x, *weight, *bias]
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in leaves]
    with torch.enable_grad():
        y = bd_linear_reference(leaves[0], sel, rest, leaves[1:1 + n], leaves[1 + n:], block_table, block_col,
                                d_out)
        grads = iter(torch.autograd.grad(y, [t for t in leaves if t is not None], gy, allow_unused=True))
    g = [next(grads) if t is not None else None for t in leaves]
    return g[0], [None] * T, [None] * T, g[1:1 + n], g[1 + n:], None, None, None


def _bd_linear_when_functionalizing(mode, func, types, args, kwargs):
    """Opaque to Inductor (its CPU and CUDA kernels are the point), but decomposed into its
    aten reference under ``torch.export``, so that an exported or AOTInductor-packaged
    program runs without this package installed."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
        return NotImplemented
    if torch.compiler.is_exporting():
        with mode:
            return bd_linear_reference(*args, **kwargs)
    return mode.__torch_dispatch__(func, types, args, kwargs)


bd_linear = torch.library.custom_op("bdpass::bd_linear", _bd_linear, mutates_args=())
bd_linear.register_fake(bd_linear_fake)
bd_linear.register_autograd(_bd_linear_backward, setup_context=_bd_linear_setup)
bd_linear.register_torch_dispatch(FunctionalTensorMode, _bd_linear_when_functionalizing)


# ----------------------------------------------------------------------------- registration
def _decompose_when_functionalizing(op, fn) -> None:
    """Decompose ``op`` into ``fn``'s aten ops under AOTAutograd, as ``triton_op`` does."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    def rule(mode, func, types, args, kwargs):
        if any(t not in (torch.Tensor, FunctionalTensor) and not issubclass(t, FakeTensor) for t in types):
            return NotImplemented        # another tensor subclass: let it handle the op
        with mode:
            return fn(*args, **kwargs)
    op.register_torch_dispatch(FunctionalTensorMode, rule)


def _define(name: str, fn, fake, setup, backward):
    if HAS_TRITON_KERNELS:
        op = triton_op(name, fn, mutates_args=())
    else:
        op = torch.library.custom_op(name, fn, mutates_args=())
        _decompose_when_functionalizing(op, fn)
    op.register_fake(fake)
    op.register_autograd(backward, setup_context=setup)
    return op


bd_project = _define("bdpass::bd_project", _bd_project, _bd_project_fake, _bd_setup, _bd_backward)
pivot_linear = _define("bdpass::pivot_linear", _pivot_linear, _pivot_linear_fake, _pivot_setup,
                       _pivot_backward)
