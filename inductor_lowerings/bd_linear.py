"""``bdpass::bd_linear``: a whole projection after basis decomposition, in one op.

Schema::

    bd_linear(Tensor x, Tensor[] sel, Tensor[] rest, Tensor[] weight, Tensor?[] bias,
              int[] block_table, int[] block_col, int d_out) -> Tensor

``x`` (..., d_in). The output (..., d_out) is assembled from column *blocks*, each written
straight into its final columns (no concatenation, no permuting pass). Block ``i`` covers
columns ``block_col[i] : block_col[i] + n_i`` and reads pivot table ``t = block_table[i]``:

* ``sel[t]`` (g,) int64: the identity rows of the table's heads; ``rest[t]`` (K,) int64:
  the other rows, ``g + K = d_in`` (a *dense* table has ``g = 0`` and ``rest`` every row).
* ``weight[i]`` (K, n_i), ``bias[i]`` (n_i,) or None. With ``g > 0`` the block is
  ``n_i / g`` adjacent heads sharing the table:
  ``y[..., block] = tile(x[..., sel[t]]) + x[..., rest[t]] @ weight[i] (+ bias[i])``,
  where ``tile`` repeats the identity columns once per head. A dense block is
  ``x @ weight[i] (+ bias[i])``.

Every output column belongs to exactly one block. A BD projection uses one table per head
(most accurate), per group of heads, or one for all heads of a size (one GEMM for all of
them: the fast CPU form); a projection's columns that BD does not own (queries of a fused
QKV projection, the rotary part of a key head) are dense blocks.

Implementations:

* CPU, and CUDA without Triton (:func:`bd_linear_blocks`): the output is allocated once;
  each block is an in-place ``addmm_`` into a strided view of the output whose initial
  value is the identity term plus the bias (one write of the block, no multiply for the
  identity rows), the GEMM accumulating onto it while the output tile is in cache; a dense
  block without bias is a GEMM with beta 0. ``x[..., rest[t]]`` and ``x[..., sel[t]]`` are
  views when the rows are one contiguous range, else one gather per table.
* CUDA with Triton: BD blocks through the Triton kernel of
  :mod:`inductor_lowerings.triton_kernels` (identity term loaded into the accumulator,
  rest rows read through the table: no gathered copy), writing into the block's view of
  the output; dense blocks as in-place GEMMs.
* :func:`bd_linear_reference`: the same function in plain functional aten ops (gathers,
  matmuls, a concatenation and one permuting gather): used for autograd and tests, and
  the readable definition.

Under ``torch.compile`` the op is opaque: Inductor calls it as an external kernel, as it
calls its own GEMMs.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

__all__ = ["bd_linear_blocks", "bd_linear_reference", "bd_linear_fake", "contiguous_start"]


def contiguous_start(idx: torch.Tensor) -> Optional[int]:
    """The start of ``idx`` if it is ``start, start+1, ...`` (checked for CPU tables only;
    a CUDA table would need a device synchronisation)."""
    n = idx.numel()
    if n == 0 or idx.device.type != "cpu":
        return None
    start = int(idx[0])
    if int(idx[-1]) - start + 1 == n and (n == 1 or bool((idx[1:] - idx[:-1] == 1).all())):
        return start
    return None


def _columns(x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    start = contiguous_start(idx)
    if start is not None:
        return x2[:, start:start + idx.numel()]
    return x2.index_select(1, idx)


def bd_linear_blocks(x: torch.Tensor, sel: Sequence[torch.Tensor], rest: Sequence[torch.Tensor],
                     weight: Sequence[torch.Tensor], bias: Sequence[Optional[torch.Tensor]],
                     block_table: Sequence[int], block_col: Sequence[int], d_out: int,
                     bd_block: Optional[Callable] = None) -> torch.Tensor:
    """Block implementation (see the module docstring). ``bd_block(x2, sel, rest, w, b, o)``,
    if given, computes a BD block into the output view ``o`` (the Triton path)."""
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    out = x2.new_empty((M, d_out))
    if M == 0:
        return out.reshape(*lead, d_out)
    cache: dict[int, tuple] = {}
    for w, b, t, c in zip(weight, bias, block_table, block_col):
        n = w.shape[1]
        o = out[:, c:c + n]
        g = sel[t].numel()
        if g and bd_block is not None:
            bd_block(x2, sel[t], rest[t], w, b, o)
            continue
        if t not in cache:
            xr = x2 if rest[t].numel() == d_in else _columns(x2, rest[t])
            cache[t] = (_columns(x2, sel[t]) if g else None, xr)
        xs, xr = cache[t]
        if g:
            o3 = o.view(M, n // g, g)
            if b is None:
                o3.copy_(xs.unsqueeze(1).expand(M, n // g, g))
            else:
                torch.add(xs.unsqueeze(1), b.view(n // g, g), out=o3)
            o.addmm_(xr, w)
        elif b is None:
            o.addmm_(xr, w, beta=0)        # beta 0: the uninitialised output is not read
        else:
            o.copy_(b.expand(M, n))
            o.addmm_(xr, w)
    return out.reshape(*lead, d_out)


def bd_linear_reference(x: torch.Tensor, sel: Sequence[torch.Tensor], rest: Sequence[torch.Tensor],
                        weight: Sequence[torch.Tensor], bias: Sequence[Optional[torch.Tensor]],
                        block_table: Sequence[int], block_col: Sequence[int], d_out: int) -> torch.Tensor:
    """The op in functional aten ops (differentiable; the definition the others must match)."""
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    parts, cols = [], []
    for w, b, t, c in zip(weight, bias, block_table, block_col):
        n = w.shape[1]
        g = sel[t].numel()
        y = x2.index_select(1, rest[t]) @ w
        if g:
            y = y + x2.index_select(1, sel[t]).repeat(1, n // g)
        parts.append(y if b is None else y + b)
        cols.append(torch.arange(c, c + n))
    order = torch.cat(cols)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    y = torch.cat(parts, dim=1).index_select(1, inv.to(x.device))
    return y.reshape(*lead, d_out)


def bd_linear_fake(x, sel, rest, weight, bias, block_table, block_col, d_out):
    torch._check(x.dim() >= 1, lambda: "x must have a channel dimension")
    d_in = x.shape[-1]
    T = len(sel)
    torch._check(len(rest) == T, lambda: f"{len(rest)} rest tables for {T} sel tables")
    n_blocks = len(weight)
    torch._check(len(bias) == len(block_table) == len(block_col) == n_blocks,
                 lambda: "weight, bias, block_table and block_col differ in length")
    for s, r in zip(sel, rest):
        torch._check(s.dim() == 1 and r.dim() == 1 and s.numel() + r.numel() == d_in,
                     lambda: f"each table's sel and rest must cover the {d_in} input channels")
        for t in (s, r):
            torch._check(t.dtype == torch.int64 and t.device == x.device,
                         lambda: "index tables must be int64 on x's device")
    covered = 0
    for w, b, t in zip(weight, bias, block_table):
        torch._check(0 <= t < T, lambda: f"block table {t} out of range")
        g, K = sel[t].numel(), rest[t].numel()
        torch._check(w.dim() == 2 and w.shape[0] == K, lambda: f"a block reading table {t} needs ({K}, n) weights")
        torch._check(g == 0 or w.shape[1] % g == 0, lambda: f"a block of table {t} must be whole heads of {g}")
        torch._check(b is None or tuple(b.shape) == (w.shape[1],), lambda: "bias must match the block width")
        for p in (w, b):
            if p is not None:
                torch._check(p.dtype == x.dtype and p.device == x.device,
                             lambda: f"weights must have x's dtype and device ({x.dtype}, {x.device})")
        covered += w.shape[1]
    torch._check(covered == d_out, lambda: f"blocks cover {covered} columns, d_out is {d_out}")
    return x.new_empty((*x.shape[:-1], d_out))
