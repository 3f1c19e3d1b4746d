"""Pivot selection and conditioning helpers shared by the BD and PIFA factorizations.

Both rewrites pick a square block out of a wide matrix and invert it. Which block is
picked decides how much the rewrite amplifies rounding error: the amplification is
governed by the condition number of the block (BD) or by the size of the coefficients
that express the other columns in the block's basis (PIFA). Choosing the block by QR
with column pivoting (a rank-revealing QR, Businger and Golub) keeps both small: each
step takes the column with the largest component orthogonal to the columns already
chosen, so the chosen block is well conditioned whenever the matrix has one.

Everything here works in float64 on the CPU; callers cast results once to their
target dtype.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "FactorizationError",
    "as_float64",
    "cond2",
    "format_bound",
    "is_rank_deficient",
    "pivot_columns",
    "pivoted_qr",
    "unit_roundoff",
]

_EPS64 = float(np.finfo(np.float64).eps)


class FactorizationError(ValueError):
    """A factorization was refused. The message is short and human readable; it is
    shown to users as the reason a rewrite was skipped."""


def as_float64(t: torch.Tensor) -> torch.Tensor:
    """A detached float64 CPU copy of ``t`` (the working precision of all factor math)."""
    return t.detach().to(device="cpu", dtype=torch.float64)


def format_bound(x: float) -> str:
    """Compact rendering of an error bound or budget for messages: ``1.2e4``, ``100``."""
    if math.isinf(x) or math.isnan(x):
        return str(x)
    s = f"{x:.3g}"
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant}e{int(exp)}"
    return s


# scipy's QR runs on its own OpenBLAS threads, which do not follow torch.set_num_threads. A
# small matrix (a head's weights) is factorized fastest on one thread, and several threads
# that wait on each other on a loaded machine make it many times slower; a large one gets as
# many threads as torch uses. threadpoolctl sets them where it is installed.
_SMALL = 1 << 20
_CONTROLLER: list = []


def _blas_threads(n: int):
    if not _CONTROLLER:
        try:
            from threadpoolctl import ThreadpoolController

            _CONTROLLER.append(ThreadpoolController())
        except Exception:       # not installed (or no BLAS found): scipy keeps its threads
            _CONTROLLER.append(None)
    if _CONTROLLER[0] is None:
        return contextlib.nullcontext()
    return _CONTROLLER[0].limit(limits=max(1, n), user_api="blas")


def pivoted_qr(M: torch.Tensor, k: int) -> tuple[torch.Tensor, np.ndarray]:
    """QR with column pivoting of the 2-D matrix ``M``.

    Returns the first ``k`` pivot columns in the order the QR chose them (CPU int64)
    and the absolute values of the diagonal of ``R`` (non-increasing), which reveal
    the numerical rank: ``|R[j, j]|`` is, up to a modest factor, the distance of the
    ``j``-th chosen column from the span of the previous ones.
    """
    if M.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(M.shape)}")
    m, n = M.shape
    if not 0 < k <= min(m, n):
        raise ValueError(f"k={k} must lie in [1, min{tuple(M.shape)}]")
    a = as_float64(M).numpy()
    with _blas_threads(1 if m * n <= _SMALL else torch.get_num_threads()):
        R, perm = scipy.linalg.qr(a, pivoting=True, mode="r", check_finite=False)
    rdiag = np.abs(np.diag(R))
    return torch.from_numpy(np.ascontiguousarray(perm[:k])).to(torch.int64), rdiag


def pivot_columns(M: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` column indices of ``M`` chosen by QR with column pivoting, sorted ascending
    (CPU int64)."""
    piv, _ = pivoted_qr(M, k)
    return torch.sort(piv).values


def is_rank_deficient(rdiag: np.ndarray, k: int, shape: tuple[int, ...]) -> bool:
    """Whether the first ``k`` pivots of a pivoted QR with ``|diag(R)| = rdiag`` span a
    numerically singular block: ``|R[k-1, k-1]| <= max(shape) * eps64 * |R[0, 0]|``
    (the usual rank tolerance of a rank-revealing QR)."""
    if k <= 0:
        return False
    top = float(rdiag[0]) if rdiag.size else 0.0
    if not math.isfinite(top) or top == 0.0:
        return True
    tol = max(shape) * _EPS64 * top
    return not float(rdiag[k - 1]) > tol


def block_conds(blocks: torch.Tensor) -> torch.Tensor:
    """cond2 of each square float64 block of a (H, n, n) batch, ``inf`` where the block is
    numerically singular: ``sigma_min <= n * eps64 * sigma_max`` (the rank tolerance of
    :func:`is_rank_deficient`). An exact zero is not required: whether the float64 SVD of an
    exactly rank-deficient block returns 0 or ~1e-17 depends on the LAPACK build."""
    s = torch.linalg.svdvals(blocks)
    smax, smin = s[..., 0], s[..., -1]
    c = smax / smin
    singular = ~(smin > blocks.shape[-1] * _EPS64 * smax) | ~torch.isfinite(c)
    return torch.where(singular, torch.full_like(c, math.inf), c)


def cond2(M: torch.Tensor) -> float:
    """2-norm condition number ``sigma_max / sigma_min`` of a square matrix, computed in
    float64; ``inf`` if the matrix is singular or has non-finite entries."""
    if M.dim() != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"cond2 expects a square matrix, got shape {tuple(M.shape)}")
    m = as_float64(M)
    if m.numel() == 0:
        return 1.0
    if not bool(torch.isfinite(m).all()):
        return math.inf
    s = torch.linalg.svdvals(m)
    smax, smin = float(s[0]), float(s[-1])
    if smin == 0.0 or not math.isfinite(smax):
        return math.inf
    c = smax / smin
    return c if math.isfinite(c) else math.inf


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff ``u = eps / 2`` of a floating dtype (2**-24 for float32)."""
    return torch.finfo(dtype).eps / 2
