"""Basis decomposition (BD) of per-head attention projections.

A head ``h`` projects ``x`` (width ``d_in``) to ``d_h`` channels with
``K_h = x W_h + b_h``, ``W_h: (d_in, d_h)``, ``d_h < d_in``. Choose ``d_h`` rows
``S_h`` of ``W_h`` whose block ``B_h = W_h[S_h]`` (``d_h x d_h``) is invertible, and
let ``R_h`` be the other rows. Then

    K'_h = K_h B_h^{-1} = x[:, S_h] + x[:, R_h] (W_h[R_h] B_h^{-1}) + b_h B_h^{-1}

because ``x W_h = x[:, S_h] B_h + x[:, R_h] W_h[R_h]``: the ``S_h`` rows become an
identity block that costs no multiply, and the projection stores
``(d_in - d_h) * d_h`` weights instead of ``d_in * d_h``. The inverse is absorbed by
the other side of the contraction:

    scores:  Q'_h = Q_h B_h^T   (fold B_h^T into the query weights and bias)
             Q'_h K'_h^T = Q_h B_h^T B_h^{-T} K_h^T = Q_h K_h^T
    values:  V'_h = V_h B_h^{-1},  W_o'^h = B_h W_o^h
             V'_h W_o'^h = V_h W_o^h

With grouped-query attention several query (or output) heads share one key/value
head; each of them folds that head's ``B_h``.

Error growth. The rewritten contraction multiplies ``Q'_h = Q_h B_h^T`` by
``K'_h = K_h B_h^{-1}``. Each factor is computed with a rounding error relative to its
own size, and ``||Q'_h|| <= ||Q_h|| ||B_h||``, ``||K'_h|| <= ||K_h|| ||B_h^{-1}||``, so the
first-order error of ``Q'_h K'_h^T`` is bounded by ``cond2(B_h)`` times the
corresponding bound ``u ||Q_h|| ||K_h||`` for the original product (likewise for
``V'_h W_o'^h``). The growth factor of a BD rewrite is therefore

    error_bound = max_h cond2(B_h).

The block is chosen per head by QR with column pivoting of ``W_h^T``, which on random
Gaussian weights (``d_in = 512``, ``d_h = 128``) gives conditions in the tens, where a
fixed block of rows shared by all heads gives thousands. A single contiguous block
shared by all heads lowers to simpler code; it is used only when its conditioning is
within a small factor of the per-head choice.

All factors are computed in float64 and cast once to the target dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .pivots import (
    FactorizationError,
    as_float64,
    block_conds,
    format_bound,
    is_rank_deficient,
    pivoted_qr,
)

__all__ = [
    "BdFactors",
    "bd_factors",
    "bd_factors_with_rows",
    "reference_rows",
]


@dataclass
class BdFactors:
    """Factors of ``K'_h = x[:, rows[h]] + x[:, rest_rows[h]] @ w_rest[h] + bias[h]``.

    Index tensors live on the CPU (compile-time metadata); ``basis``, ``w_rest`` and
    ``bias`` are in the target dtype on the device of ``W``; ``basis64`` is a float64
    CPU copy of the blocks, used to fold them into the query and output weights.
    """

    rows: torch.Tensor              # (H, d_h) pivot rows S_h, ascending within a head
    shared: bool                    # all heads use one contiguous block of rows
    basis: torch.Tensor             # (H, d_h, d_h) B_h = W_h[S_h]
    basis64: torch.Tensor           # (H, d_h, d_h) float64 CPU copy of B_h
    rest_rows: torch.Tensor         # (H, d_in - d_h) complement rows, ascending
    w_rest: torch.Tensor            # (H, d_in - d_h, d_h) = W_h[R_h] @ B_h^{-1}
    bias: Optional[torch.Tensor]    # (H, d_h) = b_h @ B_h^{-1}, or None
    conds: list[float]              # cond2(B_h) per head
    error_bound: float              # max_h cond2(B_h), worst-case first-order error growth
    params_before: int              # H * d_in * d_h (weights; the bias count is unchanged)
    params_after: int               # H * (d_in - d_h) * d_h
    expected: list[float] = None    # per head ||W_h B_h^-1||_F ||B_h||_F / (||W_h||_F sqrt(d_h))
    expected_growth: float = 0.0    # max of ``expected``: the typical growth (the budget's measure)

    @property
    def num_heads(self) -> int:
        return int(self.rows.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.rows.shape[1])


# ----------------------------------------------------------------------------- helpers
def _check_w(W: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if W.dim() != 3:
        raise ValueError(f"expected W of shape (H, d_in, d_h), got {tuple(W.shape)}")
    H, d_in, d_h = W.shape
    if bias is not None and tuple(bias.shape) != (H, d_h):
        raise ValueError(f"bias must have shape ({H}, {d_h}), got {tuple(bias.shape)}")
    if d_h >= d_in:
        raise FactorizationError(f"head dim d_h={d_h} >= d_in={d_in}")
    return H, d_in, d_h


def _finite64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t64 = as_float64(t)
    if not bool(torch.isfinite(t64).all()):
        raise FactorizationError("non-finite weights")
    return t64


def _gather_rows(W64: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[h] = W64[h, rows[h]]`` for rows of shape (H, k)."""
    return W64[torch.arange(W64.shape[0])[:, None], rows]


def _conds(blocks: torch.Tensor) -> list[float]:
    """cond2 of each square float64 block in a (H, n, n) batch (inf when numerically singular)."""
    return block_conds(blocks).tolist()


def _complement(rows: torch.Tensor, d_in: int) -> torch.Tensor:
    keep = torch.ones(rows.shape[0], d_in, dtype=torch.bool)
    keep.scatter_(1, rows, False)
    return torch.nonzero(keep)[:, 1].reshape(rows.shape[0], d_in - rows.shape[1])


def _is_shared_block(rows: torch.Tensor) -> bool:
    first = rows[0]
    contiguous = bool((first == torch.arange(int(first[0]), int(first[0]) + first.numel())).all())
    return contiguous and bool((rows == first).all())


def _build(W64: torch.Tensor, b64: Optional[torch.Tensor], rows: torch.Tensor, shared: bool,
           conds: list[float], *, dtype: torch.dtype, device: torch.device,
           error_budget: float) -> BdFactors:
    H, d_in, d_h = W64.shape
    if any(math.isinf(c) for c in conds):
        raise FactorizationError("pivot block is singular (rank-deficient)")
    error_bound = max(conds)
    rest_rows = _complement(rows, d_in)
    basis64 = _gather_rows(W64, rows)
    try:
        w_rest = torch.linalg.solve(basis64, _gather_rows(W64, rest_rows), left=False)
    except RuntimeError as e:       # torch.linalg.LinAlgError: exactly singular in float64
        raise FactorizationError(f"pivot block is singular (rank-deficient): {e}") from None
    # ||W B^-1||_F^2 = d_h (the identity rows) + ||W[R] B^-1||_F^2
    fro = torch.linalg.matrix_norm
    expected = ((d_h + fro(w_rest) ** 2).sqrt() * fro(basis64) / (fro(W64) * math.sqrt(d_h))).tolist()
    expected = [e if math.isfinite(e) else math.inf for e in expected]
    if max(expected) > error_budget:
        raise FactorizationError(f"expected error growth {format_bound(max(expected))} exceeds budget "
                                 f"{format_bound(error_budget)} (cond {format_bound(error_bound)})")
    bias = None
    if b64 is not None:
        try:
            bias = torch.linalg.solve(basis64, b64[:, None, :], left=False)[:, 0, :]
        except RuntimeError as e:
            raise FactorizationError(f"pivot block is singular (rank-deficient): {e}") from None
    if not bool(torch.isfinite(w_rest).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        raise FactorizationError("pivot block is singular (rank-deficient)")
    return BdFactors(
        rows=rows,
        shared=shared,
        basis=basis64.to(device=device, dtype=dtype),
        basis64=basis64,
        rest_rows=rest_rows,
        w_rest=w_rest.to(device=device, dtype=dtype),
        bias=None if bias is None else bias.to(device=device, dtype=dtype),
        conds=conds,
        error_bound=error_bound,
        expected=expected,
        expected_growth=max(expected),
        params_before=H * d_in * d_h,
        params_after=H * (d_in - d_h) * d_h,
    )


# ----------------------------------------------------------------------------- factors
def bd_factors(
    W: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    error_budget: float = float("inf"),
    allow_shared: bool = True,
    shared_slack: float = 2.0,
) -> BdFactors:
    """BD factors of the per-head projections ``W`` (H, d_in, d_h) with optional bias
    (H, d_h); ``dtype`` defaults to ``W.dtype``.

    Each head's rows come from QR with column pivoting of ``W_h^T``. If
    ``allow_shared``, the first and the last ``d_h`` rows are also tried as one block
    shared by all heads; the better of the two is used (``shared=True``) when its
    worst condition number is at most ``min(error_budget, shared_slack * max_h
    cond2(per-head block))``.

    Raises :class:`FactorizationError` when ``d_h >= d_in``, when a weight is
    non-finite, when a head has no invertible block (rank-deficient ``W_h``), or when
    the error bound ``max_h cond2(B_h)`` exceeds ``error_budget``.
    """
    H, d_in, d_h = _check_w(W, bias)
    dtype = W.dtype if dtype is None else dtype
    W64 = _finite64(W)
    b64 = _finite64(bias)

    per_head = []
    for h in range(H):
        order, rdiag = pivoted_qr(W64[h].T, d_h)
        if is_rank_deficient(rdiag, d_h, (d_h, d_in)):
            raise FactorizationError("pivot block is singular (rank-deficient)")
        per_head.append(torch.sort(order).values)
    rows = torch.stack(per_head)
    conds = _conds(_gather_rows(W64, rows))
    shared = False

    if allow_shared:
        best: Optional[tuple[float, torch.Tensor, list[float]]] = None
        for start in (0, d_in - d_h):
            block = torch.arange(start, start + d_h).expand(H, d_h).contiguous()
            c = _conds(_gather_rows(W64, block))
            if best is None or max(c) < best[0]:
                best = (max(c), block, c)
        assert best is not None
        if best[0] <= min(error_budget, shared_slack * max(conds)):
            _, rows, conds = best
            shared = True

    return _build(W64, b64, rows, shared, conds, dtype=dtype, device=W.device,
                  error_budget=error_budget)


def bd_factors_with_rows(
    W: torch.Tensor,
    rows: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    error_budget: float = float("inf"),
) -> BdFactors:
    """BD factors of ``W`` (H, d_in, d_h) for given pivot rows: (d_h,) shared by all
    heads or (H, d_h) per head; they are sorted within each head. ``shared`` is set when
    every head uses the same contiguous block. Raises :class:`FactorizationError` like
    :func:`bd_factors`."""
    H, d_in, d_h = _check_w(W, bias)
    dtype = W.dtype if dtype is None else dtype
    rows = torch.as_tensor(rows).detach().to(device="cpu", dtype=torch.int64)
    if rows.dim() == 1:
        rows = rows.expand(H, -1)
    if tuple(rows.shape) != (H, d_h):
        raise ValueError(f"rows must have shape ({d_h},) or ({H}, {d_h}), got {tuple(rows.shape)}")
    rows = torch.sort(rows, dim=1).values.contiguous()
    if bool(((rows < 0) | (rows >= d_in)).any()) or bool((rows[:, 1:] == rows[:, :-1]).any()):
        raise ValueError(f"rows must be {d_h} distinct indices in [0, {d_in}) per head")
    W64 = _finite64(W)
    b64 = _finite64(bias)
    conds = _conds(_gather_rows(W64, rows))
    return _build(W64, b64, rows, _is_shared_block(rows), conds, dtype=dtype,
                  device=W.device, error_budget=error_budget)


def reference_rows(W: torch.Tensor) -> torch.Tensor:
    """The row choice of the published BD reference, for comparisons: one contiguous
    block shared by all heads, the first ``d_h`` rows or the last ``d_h`` rows.

    The reference picks between the two by a least-squares residual computed in the
    model's working precision. Here: for each candidate block ``S`` and each head, solve
    ``X_h B_h = W_h`` (``B_h = W_h[S]``) for ``X_h`` by least squares in float32, and
    measure the relative residual ``||X_h B_h - W_h||_F^2 / ||W_h||_F^2`` in float64.
    In exact arithmetic it is zero for any invertible block; in float32 it grows with
    how strongly the block amplifies rounding, so it is a proxy for conditioning. The
    block with the smaller mean over heads wins (the first block on a tie).

    Returns the rows as (H, d_h), ready for :func:`bd_factors_with_rows`.
    """
    H, d_in, d_h = _check_w(W, None)
    W64 = _finite64(W)
    W32 = W64.to(torch.float32)
    best: Optional[tuple[float, int]] = None
    for start in (0, d_in - d_h):
        B32 = W32[:, start:start + d_h, :]
        X = torch.linalg.lstsq(B32.transpose(1, 2), W32.transpose(1, 2)).solution.transpose(1, 2)
        resid = (X.double() @ B32.double() - W64).square().sum(dim=(1, 2))
        score = float((resid / W64.square().sum(dim=(1, 2)).clamp_min(1e-300)).mean())
        if not math.isfinite(score):
            score = math.inf
        if best is None or score < best[0]:
            best = (score, start)
    assert best is not None
    start = best[1]
    return torch.arange(start, start + d_h).expand(H, d_h).contiguous()
