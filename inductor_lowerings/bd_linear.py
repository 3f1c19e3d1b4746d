"""``bdpass::bd_linear``: a whole projection after basis decomposition, in one op.

Schema::

    bd_linear(Tensor x, Tensor sel, Tensor rest, Tensor w_rest, Tensor? b_rest,
              int[] head_table, int[] head_col, Tensor[] w_dense, Tensor?[] b_dense,
              int[] dense_col, int d_out) -> Tensor

``x`` (..., d_in). The output (..., d_out) is assembled from column blocks written straight
into their final places (no concatenation, no permuting pass):

* BD heads ``h`` (``len(head_col)`` of them, each ``g`` wide): columns
  ``head_col[h] : head_col[h] + g`` hold ``x[..., sel[t]] + x[..., rest[t]] @ W_h (+ b_h)``
  with ``t = head_table[h]``. ``sel`` (T, g) and ``rest`` (T, K = d_in - g) are int64 pivot
  tables: one table shared by every head (T = 1), one per group of heads, or one per head.
  ``w_rest`` (K, H*g) holds ``W_h`` in columns ``h*g : (h+1)*g`` (the heads side by side, so
  that adjacent heads with one table are one GEMM); ``b_rest`` (H*g,) or None.
* Dense blocks ``i``: columns ``dense_col[i] : dense_col[i] + n_i`` hold
  ``x @ w_dense[i].T (+ b_dense[i])`` with ``w_dense[i]`` (n_i, d_in) (``nn.Linear`` layout).

Every output column belongs to exactly one block. Heads are listed in increasing
``head_col`` order.

Implementations:

* CPU and CUDA without Triton (:func:`bd_linear_blocks`): the output is allocated once;
  each maximal run of adjacent heads sharing a table is one in-place ``addmm_`` (beta 1)
  into a strided view of the output, whose initial value is the identity term (the
  ``sel`` columns of ``x``, broadcast over the run's heads, plus the bias): the identity
  block costs one write of the output and no multiply, and the GEMM accumulates onto it
  while the output tile is in cache. ``x[..., rest[t]]`` is a view when the rows are one
  contiguous range (after a producer permutation, or when the pivots are the first or last
  rows) and one gather per table otherwise.
* CUDA with Triton: the BD heads through the Triton kernel of
  :mod:`inductor_lowerings.triton_kernels`, which loads the identity term into its
  accumulator and reads the rest rows through the table (no gathered copy), writing each
  head at ``head_col``; the dense blocks as in-place GEMMs into the same buffer.
* :func:`bd_linear_reference`: the same function in plain functional aten ops (gathers,
  matmuls, a concatenation and one permuting gather): used for autograd, tests, and as the
  readable definition.

Under ``torch.compile`` the op is opaque: Inductor calls it as an external kernel, as it
calls its own GEMMs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["bd_linear_blocks", "bd_linear_reference", "bd_linear_fake", "head_runs"]


def head_runs(head_table: Sequence[int], head_col: Sequence[int], g: int) -> list[tuple[int, int, int]]:
    """Maximal runs ``(first head, end head, table)`` of adjacent heads (each starting where
    the previous one ends) that share a table."""
    runs = []
    h0 = 0
    H = len(head_col)
    for h in range(1, H + 1):
        if h == H or head_table[h] != head_table[h0] or head_col[h] != head_col[h - 1] + g:
            runs.append((h0, h, int(head_table[h0])))
            h0 = h
    return runs if H else []


def _contiguous_range(idx: torch.Tensor) -> Optional[int]:
    """The start of ``idx`` if it is ``start, start+1, ...`` (checked on the CPU only)."""
    if idx.numel() == 0 or idx.device.type != "cpu":
        return None
    start = int(idx[0])
    if int(idx[-1]) - start + 1 == idx.numel() and bool((idx[1:] - idx[:-1] == 1).all()):
        return start
    return None


def _columns(x2: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    start = _contiguous_range(idx)
    if start is not None:
        return x2[:, start:start + idx.numel()]
    return x2.index_select(1, idx)


def bd_linear_blocks(x: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor, w_rest: torch.Tensor,
                     b_rest: Optional[torch.Tensor], head_table: Sequence[int], head_col: Sequence[int],
                     w_dense: Sequence[torch.Tensor], b_dense: Sequence[Optional[torch.Tensor]],
                     dense_col: Sequence[int], d_out: int, bd_heads=None) -> torch.Tensor:
    """Block implementation (see the module docstring). ``bd_heads(x2, out)``, if given,
    writes every BD head into ``out`` instead of the per-run GEMMs (the Triton path)."""
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    out = x2.new_empty((M, d_out))
    if M == 0:
        return out.reshape(*lead, d_out)
    for w, b, c in zip(w_dense, b_dense, dense_col):
        n = w.shape[0]
        o = out[:, c:c + n]
        if b is None:
            o.addmm_(x2, w.t(), beta=0)       # beta 0: the uninitialised output is not read
        else:
            o.copy_(b.expand(M, n))
            o.addmm_(x2, w.t())
    g = sel.shape[1]
    if len(head_col):
        if bd_heads is not None:
            bd_heads(x2, out)
        else:
            cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
            for h0, h1, t in head_runs(head_table, head_col, g):
                if t not in cache:
                    cache[t] = (_columns(x2, sel[t]), _columns(x2, rest[t]))
                xs, xr = cache[t]
                c, n = head_col[h0], (h1 - h0) * g
                o = out[:, c:c + n]
                o3 = o.view(M, h1 - h0, g)
                if b_rest is None:
                    o3.copy_(xs.unsqueeze(1).expand(M, h1 - h0, g))
                else:
                    torch.add(xs.unsqueeze(1), b_rest[h0 * g:h1 * g].view(h1 - h0, g), out=o3)
                o.addmm_(xr, w_rest[:, h0 * g:h1 * g])
    return out.reshape(*lead, d_out)


def bd_linear_reference(x: torch.Tensor, sel: torch.Tensor, rest: torch.Tensor, w_rest: torch.Tensor,
                        b_rest: Optional[torch.Tensor], head_table: Sequence[int], head_col: Sequence[int],
                        w_dense: Sequence[torch.Tensor], b_dense: Sequence[Optional[torch.Tensor]],
                        dense_col: Sequence[int], d_out: int) -> torch.Tensor:
    """The op in functional aten ops (differentiable; the definition the others must match)."""
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    g = sel.shape[1]
    parts, cols = [], []
    for w, b, c in zip(w_dense, b_dense, dense_col):
        y = x2 @ w.t()
        parts.append(y if b is None else y + b)
        cols.append(torch.arange(c, c + w.shape[0]))
    for h, (t, c) in enumerate(zip(head_table, head_col)):
        y = x2.index_select(1, sel[t]) + x2.index_select(1, rest[t]) @ w_rest[:, h * g:(h + 1) * g]
        parts.append(y if b_rest is None else y + b_rest[h * g:(h + 1) * g])
        cols.append(torch.arange(c, c + g))
    order = torch.cat(cols)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    y = torch.cat(parts, dim=1).index_select(1, inv.to(x.device))
    return y.reshape(*lead, d_out)


def bd_linear_fake(x, sel, rest, w_rest, b_rest, head_table, head_col, w_dense, b_dense, dense_col, d_out):
    torch._check(x.dim() >= 1, lambda: "x must have a channel dimension")
    d_in = x.shape[-1]
    torch._check(sel.dim() == 2 and rest.dim() == 2, lambda: "expected sel (T, g) and rest (T, d_in - g)")
    T, g = sel.shape
    K = rest.shape[1]
    H = len(head_col)
    torch._check(rest.shape[0] == T, lambda: f"rest has {rest.shape[0]} tables, sel {T}")
    torch._check(len(head_table) == H, lambda: "head_table and head_col differ in length")
    torch._check(all(0 <= t < T for t in head_table) or H == 0, lambda: "head_table out of range")
    if H:
        torch._check(g + K == d_in, lambda: f"x has {d_in} channels, sel+rest cover {g + K}")
        torch._check(tuple(w_rest.shape) == (K, H * g),
                     lambda: f"w_rest must have shape {(K, H * g)}, got {tuple(w_rest.shape)}")
        if b_rest is not None:
            torch._check(tuple(b_rest.shape) == (H * g,), lambda: f"b_rest must have shape ({H * g},)")
    torch._check(len(w_dense) == len(b_dense) == len(dense_col), lambda: "dense lists differ in length")
    covered = H * g
    for w, b in zip(w_dense, b_dense):
        torch._check(w.dim() == 2 and w.shape[1] == d_in, lambda: f"dense weights must be (n, {d_in})")
        torch._check(b is None or tuple(b.shape) == (w.shape[0],), lambda: "dense bias shape")
        covered += w.shape[0]
    torch._check(covered == d_out, lambda: f"blocks cover {covered} columns, d_out is {d_out}")
    for t in [sel, rest]:
        torch._check(t.dtype == torch.int64 and t.device == x.device, lambda: "index tables: int64 on x's device")
    for t in [w_rest, b_rest, *w_dense, *b_dense]:
        if t is not None:
            torch._check(t.dtype == x.dtype and t.device == x.device,
                         lambda: f"weights must have x's dtype and device ({x.dtype}, {x.device})")
    return x.new_empty((*x.shape[:-1], d_out))
