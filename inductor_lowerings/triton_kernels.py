"""Triton kernels for ``bdpass::bd_project`` and ``bdpass::pivot_linear``.

This module imports ``triton``; :mod:`inductor_lowerings.ops` imports it only when
triton is installed. Every kernel accumulates in float32 and rounds once, when it
stores its output tile. Index tables (``int64``) are read inside the kernels: no
gathered copy of an operand and no scatter pass over the output is ever materialized.

``_bd_project_kernel`` -- the BD projection ``y_h = x[:, rows_h] + x[:, rest_h] @ w_rest_h
(+ bias_h)``. One program computes a ``BLOCK_M x BLOCK_N`` tile of the output:

* The accumulator starts as the identity term: the tile's identity columns
  ``x[m, rows_h[j]]`` (plus the bias) are loaded straight into the float32
  accumulator, so the identity block costs one load per output element and no
  multiply, and no separate pass adds it afterwards.
* The K loop runs over the ``d_in - g`` rest rows only. The A tile is loaded through
  the rest index table (``x[m, rest_h[k]]``; the table is sorted, so the loads of a
  row fall in a few contiguous runs), the B tile from ``w_rest`` by its strides, and
  ``tl.dot`` adds into the accumulator.
* Per-head mode (``SHARED=False``, grid ``(M tiles, g tiles, H)``): a tile never
  crosses a head, because each head gathers different rest rows.
* Shared mode (``SHARED=True``, grid ``(M tiles, H*g tiles)``): every head uses the
  rest rows of head 0, so the A tile is the same for all heads and the N dimension
  runs over all ``H*g`` output columns at once -- one GEMM over the rest rows, with
  column ``n`` reading ``w_rest[n // g, :, n % g]`` and its identity term
  ``x[m, rows_0[n % g]]``. ``w_rest`` is addressed through its strides, so no
  relayout is needed; a ``(d_in - g, H, g)``-contiguous buffer viewed as
  ``(H, d_in - g, g)`` gives row-contiguous B tiles.

``_pivot_stage1_kernel`` / ``_pivot_stage2_kernel`` -- the PIFA chain
``y[:, P] = x @ w_p + b_p``, ``y[:, R] = y[:, P] @ coeff + b_r``, in two launches
that write one output buffer:

* Stage 1 is a GEMM over ``d_in`` whose epilogue adds ``b_p``, rounds to the output
  dtype and stores column ``n`` of the tile at ``out[:, pivots[n]]``: the pivot
  columns land in their final place.
* Stage 2 is a GEMM over ``r`` whose A operand is read back from those pivot columns
  of ``out`` through the same pivot table (the output buffer is what stage 1 keeps
  for stage 2; no workspace), and whose epilogue adds ``b_r`` and stores column
  ``n`` at ``out[:, rest[n]]``. The two column sets are disjoint, so a stage-2 tile
  never reads what another stage-2 tile writes; the launch order on the stream is
  the only synchronisation needed.
* ``y_P`` enters stage 2 rounded to the output dtype, as it does in the unrewritten
  chain (whose intermediate ``x A + a`` is rounded too) and in the aten path, so all
  three carry the same kind of error; an extra float32 workspace would cost
  ``8 M r`` bytes of traffic for a smaller error than the original chain's.

Tensor-core precision: float32 operands use ``input_precision="ieee"`` unless
``torch.backends.cuda.matmul`` allows TF32 (the ``TF32`` flag, read when the op is
launched or traced: the same switch Inductor's own GEMMs obey), so a float32 rewrite is
not less exact than the matmuls it replaces. Half-precision operands take the tensor
cores in their own dtype.

Interpreter: ``TRITON_INTERPRET=1`` stores bfloat16 as raw 16-bit patterns and its
``tl.dot`` multiplies those patterns, so under the interpreter the launchers set the
``DOT_F32`` flag, which widens the operand tiles to float32 before ``tl.dot``. That is
exact (a product of two bfloat16 values fits a float32) and leaves the float32
accumulation as it is on a GPU; on a GPU the flag is off and ``tl.dot`` takes the
operands in their own dtype. Interpreted kernels are launched directly rather than
through ``wrap_triton`` (see ``_KERNELS_INTERPRETED``).

Autotuning: a few block configurations keyed on the problem sizes (``M`` through a
power-of-two bucket); under ``TRITON_INTERPRET=1`` a single small configuration, so
that nothing is benchmarked on the CPU. Under ``torch.compile``, Inductor sees these
kernels through ``torch.library.wrap_triton`` and tunes and launches them itself.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

__all__ = [
    "INTERPRET",
    "bd_project_triton",
    "pivot_linear_triton",
]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 32}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
]
_INTERPRET_CONFIGS = [
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1, num_stages=1),
]
CONFIGS = _INTERPRET_CONFIGS if INTERPRET else _GPU_CONFIGS


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _mma(a, b, acc, TF32: tl.constexpr, DOT_F32: tl.constexpr):
    """acc + a @ b in fp32 (inputs widened first where the interpreter needs it)."""
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _bd_project_kernel(
    x_ptr, rows_ptr, rest_ptr, w_ptr, b_ptr, out_ptr,
    M, G, K, N_COLS,
    stride_xm, stride_xk,
    stride_rh, stride_rg,
    stride_sh, stride_sk,
    stride_wh, stride_wk, stride_wg,
    stride_bh, stride_bg,
    stride_om, stride_on,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, SHARED: tl.constexpr, TF32: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    if SHARED:
        # N runs over all H*g columns; every head reads the index tables of head 0.
        col = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = col < N_COLS
        head = col // G
        j = col - head * G
        table = 0
    else:
        table = tl.program_id(2)
        j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = j < G
        head = table
        col = table * G + j
    xm = offs_m.to(tl.int64)[:, None] * stride_xm

    # Identity term (and bias) straight into the float32 accumulator.
    id_rows = tl.load(rows_ptr + table * stride_rh + j * stride_rg, mask=n_mask, other=0)
    acc = tl.load(x_ptr + xm + id_rows[None, :] * stride_xk,
                  mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + head * stride_bh + j * stride_bg, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    w_cols = head * stride_wh + j * stride_wg
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        rest_rows = tl.load(rest_ptr + table * stride_sh + offs_k * stride_sk, mask=k_mask, other=0)
        a = tl.load(x_ptr + xm + rest_rows[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + w_cols[None, :],
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, TF32, DOT_F32)

    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + col[None, :] * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _pivot_stage1_kernel(
    x_ptr, w_ptr, b_ptr, piv_ptr, out_ptr,
    M, R, K,
    stride_xm, stride_xk,
    stride_wk, stride_wn,
    stride_b, stride_p,
    stride_om, stride_on,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, TF32: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < R
    xm = offs_m.to(tl.int64)[:, None] * stride_xm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(x_ptr + xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, w, acc, TF32, DOT_F32)

    # Epilogue: each pivot column goes straight to its final place.
    cols = tl.load(piv_ptr + offs_n * stride_p, mask=n_mask, other=0)
    out_offs = offs_m.to(tl.int64)[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _pivot_stage2_kernel(
    out_ptr, piv_ptr, c_ptr, b_ptr, rest_ptr,
    M, N, R,
    stride_om, stride_on,
    stride_p,
    stride_ck, stride_cn,
    stride_b, stride_s,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, TF32: tl.constexpr, DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    om = offs_m.to(tl.int64)[:, None] * stride_om

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n * stride_b, mask=n_mask, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < R
        piv = tl.load(piv_ptr + offs_k * stride_p, mask=k_mask, other=0)
        # y_P as stage 1 stored it, read back from its final columns.
        a = tl.load(out_ptr + om + piv[None, :] * stride_on,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        c = tl.load(c_ptr + offs_k[:, None] * stride_ck + offs_n[None, :] * stride_cn,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _mma(a, c, acc, TF32, DOT_F32)

    cols = tl.load(rest_ptr + offs_n * stride_s, mask=n_mask, other=0)
    tl.store(out_ptr + om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


_KEY = ["M_BUCKET"]
_bd_project_tuned = triton.autotune(configs=CONFIGS, key=_KEY + ["G", "K", "N_COLS"])(_bd_project_kernel)
_pivot_stage1_tuned = triton.autotune(configs=CONFIGS, key=_KEY + ["R", "K"])(_pivot_stage1_kernel)
_pivot_stage2_tuned = triton.autotune(configs=CONFIGS, key=_KEY + ["N", "R"])(_pivot_stage2_kernel)


# ----------------------------------------------------------------------------- launchers
def _interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function, possibly under ``triton.autotune`` /
    ``triton.heuristics``) runs in Triton's interpreter: with ``TRITON_INTERPRET=1``
    ``triton.jit`` returns an ``InterpretedFunction``, which is not a ``JITFunction``."""
    from triton.runtime.jit import JITFunction

    seen = set()
    while not isinstance(kernel, JITFunction):
        inner = getattr(kernel, "fn", None)
        if inner is None or id(kernel) in seen:
            return True
        seen.add(id(kernel))
        kernel = inner
    return False


def _fix_interpreter_scalar_index() -> None:
    """Let the interpreter use a scalar kernel argument as a Python index (the bound of
    ``range(0, K, BLOCK_K)``) with NumPy 2.4 and later.

    The interpreter holds a scalar argument as a one-element 1-D array, and some Triton
    releases (3.6 among them) convert it with ``int(data)``, which NumPy 2.4 turned from a
    deprecation warning into a ``TypeError`` (only 0-d arrays convert); later Triton
    releases convert ``data.squeeze()``. Where a probe of the installed interpreter shows
    the failure, its tensor patch is extended with the later releases' conversion; an
    interpreter that converts correctly, or whose internals differ, is left as it is."""
    import operator
    import types

    import numpy as np

    try:
        from triton.runtime import interpreter as ti

        patch, scope_cls = ti._patch_lang_tensor, ti._LangPatchScope
    except (ImportError, AttributeError):
        return
    if getattr(patch, "_scalar_index_fixed", False):
        return

    class _Probe:
        pass

    scope = scope_cls()
    try:
        patch(_Probe, scope)
        probe = _Probe()
        probe.handle = types.SimpleNamespace(data=np.array([3], dtype=np.int32))
        if operator.index(probe) == 3:
            return
    except TypeError:
        pass                      # the failure this fixes
    except Exception:
        return
    finally:
        scope.restore()

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._scalar_index_fixed = True
    ti._patch_lang_tensor = patched


# Whether the kernels run in Triton's interpreter: decided once, when they are defined
# (``triton.jit`` reads ``TRITON_INTERPRET``). The launchers call an interpreted kernel
# directly, and otherwise through ``wrap_triton`` (traceable by ``make_fx`` / AOTAutograd,
# so that Inductor launches the kernel itself: the only path on a GPU). ``wrap_triton``
# needs a kernel's JIT metadata, which an interpreted kernel lacks: torch 2.11 rejects a
# bare ``InterpretedFunction`` and, for one under ``triton.autotune``, fails at the launch
# (``'function' object has no attribute 'fn'``: the ``.fn`` chain never reaches a
# ``JITFunction``); newer torch returns such kernels unwrapped, as the launchers do on every
# version. The interpreter runs eagerly on CPU tensors, where nothing is traced. (The
# ``wrap_triton(...)`` calls stay spelled out in the launchers: ``triton_op`` finds an op's
# kernels by reading its source for them.)
_KERNELS_INTERPRETED = _interpreted(_bd_project_tuned)
if _KERNELS_INTERPRETED:
    _fix_interpreter_scalar_index()


def _m_bucket(m) -> int:
    """Autotuning key for the token count: its power-of-two bucket (capped), or 0 when
    the count is symbolic (under torch.compile Inductor picks the configuration)."""
    if not isinstance(m, int):
        return 0
    return min(triton.next_power_of_2(max(m, 1)), 4096)


def _unused(x: torch.Tensor) -> torch.Tensor:
    """Stand-in for an absent bias pointer (never read: ``HAS_BIAS`` is off). A buffer of
    its own, so that no tensor is passed to a kernel twice."""
    return x.new_empty(1)


def _tf32(dtype: torch.dtype) -> bool:
    """Whether float32 tiles may go through TF32 tensor cores (torch's matmul setting)."""
    if dtype != torch.float32:
        return False
    mm = torch.backends.cuda.matmul
    prec = getattr(mm, "fp32_precision", None)
    return prec == "tf32" if prec is not None else bool(mm.allow_tf32)


def bd_project_triton(x: torch.Tensor, rows: torch.Tensor, rest: torch.Tensor,
                      w_rest: torch.Tensor, bias: Optional[torch.Tensor],
                      shared: bool = False, *, config: Optional[dict] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the BD projection kernel; same contract as ``bdpass::bd_project``.

    ``config`` (``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` and optionally ``num_warps``,
    ``num_stages``) launches the raw kernel with that configuration instead of the
    autotuned one. ``out``: an (M, H*g) view (any strides) to write into, e.g. a block of
    a larger output (then ``x`` must be 2-D and nothing is returned but ``out``)."""
    H, G = rows.shape
    K = rest.shape[1]
    d_in = x.shape[-1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    if out is None:
        out = torch.empty((M, H * G), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*x.shape[:-1], H * G)
    b = bias if bias is not None else _unused(x)
    sb = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)
    n_cols = H * G
    if shared:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(n_cols, meta["BLOCK_N"]), 1)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(G, meta["BLOCK_N"]), H)
    kernel = _bd_project_tuned if config is None else _bd_project_kernel
    launch = kernel if _KERNELS_INTERPRETED else wrap_triton(kernel)
    launch[grid](
        x2, rows, rest, w_rest, b, out,
        M, G, K, n_cols,
        x2.stride(0), x2.stride(1),
        rows.stride(0), rows.stride(1),
        rest.stride(0), rest.stride(1),
        w_rest.stride(0), w_rest.stride(1), w_rest.stride(2),
        sb[0], sb[1],
        out.stride(0), out.stride(1),
        _m_bucket(M),
        HAS_BIAS=bias is not None, SHARED=bool(shared),
        TF32=_tf32(x.dtype), DOT_F32=INTERPRET,
        **(config or {}),
    )
    return out.reshape(*x.shape[:-1], H * G)


def bd_block_triton(x2: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor, w: torch.Tensor,
                    b: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """One BD block of ``bdpass::bd_linear`` (see :mod:`inductor_lowerings.bd_linear`): the
    ``n / g`` adjacent heads sharing table ``(sel, rest)``, with weights ``w`` (K, n) and bias
    ``b`` (n,), written into the (M, n) view ``out`` by the shared kernel (one GEMM over the
    rest rows for all the block's heads, the identity term in the accumulator)."""
    g, K = sel.numel(), rest.numel()
    H = w.shape[1] // g
    w3 = w.view(K, H, g).permute(1, 0, 2)          # (H, K, g) view: rows of K contiguous
    bias = None if b is None else b.view(H, g)
    bd_project_triton(x2, sel.view(1, g).expand(H, g), rest.view(1, K).expand(H, K), w3, bias, True, out=out)


def pivot_linear_triton(x: torch.Tensor, w_p: torch.Tensor, b_p: Optional[torch.Tensor],
                        coeff: torch.Tensor, b_r: Optional[torch.Tensor],
                        pivots: torch.Tensor, rest: torch.Tensor, *,
                        config: Optional[dict] = None) -> torch.Tensor:
    """Launch the two pivot-linear stages; same contract as ``bdpass::pivot_linear``.
    ``config`` as for :func:`bd_project_triton` (used by both stages)."""
    d_in, R = w_p.shape
    N = coeff.shape[1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    out = torch.empty((M, R + N), device=x.device, dtype=x.dtype)
    if M == 0:
        return out.reshape(*x.shape[:-1], R + N)
    tf32 = _tf32(x.dtype)
    bucket = _m_bucket(M)

    def grid1(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(R, meta["BLOCK_N"]), 1)

    stage1 = _pivot_stage1_tuned if config is None else _pivot_stage1_kernel
    stage2 = _pivot_stage2_tuned if config is None else _pivot_stage2_kernel
    launch1 = stage1 if _KERNELS_INTERPRETED else wrap_triton(stage1)
    launch1[grid1](
        x2, w_p, b_p if b_p is not None else _unused(x), pivots, out,
        M, R, d_in,
        x2.stride(0), x2.stride(1),
        w_p.stride(0), w_p.stride(1),
        b_p.stride(0) if b_p is not None else 0, pivots.stride(0),
        out.stride(0), out.stride(1),
        bucket,
        HAS_BIAS=b_p is not None, TF32=tf32, DOT_F32=INTERPRET,
        **(config or {}),
    )
    if N > 0:
        def grid2(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), 1)

        launch2 = stage2 if _KERNELS_INTERPRETED else wrap_triton(stage2)
        launch2[grid2](
            out, pivots, coeff, b_r if b_r is not None else _unused(x), rest,
            M, N, R,
            out.stride(0), out.stride(1),
            pivots.stride(0),
            coeff.stride(0), coeff.stride(1),
            b_r.stride(0) if b_r is not None else 0, rest.stride(0),
            bucket,
            HAS_BIAS=b_r is not None, TF32=tf32, DOT_F32=INTERPRET,
            **(config or {}),
        )
    return out.reshape(*x.shape[:-1], R + N)
