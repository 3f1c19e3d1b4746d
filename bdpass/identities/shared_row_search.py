"""One BD row set shared by all heads of a projection (or by each of a few groups).

BD of a head picks ``d_h`` rows ``S`` of its projection ``W_h`` (``d_in x d_h``) and
inverts ``B_h = W_h[S]``; the rewrite grows rounding error by up to ``cond2(B_h)``.
Per-head rows from QR with column pivoting keep every ``cond2(B_h)`` in the tens, but on
a CPU only one row set shared by all heads pays (the remainder ``x[:, R]`` is gathered
once and one GEMM serves every head). Here that set is chosen to minimise
``max_h cond2(W_h[S])``:

1. *Initial set* by a simultaneous pivoted Gram-Schmidt over the heads: each head is
   orthonormalised (``W_h = Q_h R_h``, so heads of any scale count alike), and at each of
   the ``d_h`` steps the row is taken whose smallest residual over the heads (its
   distance from the span of the rows already taken, in each head) is largest. The
   product of a head's residuals is ``det(Q_h[S])^2``, so this greedily keeps every
   head's block away from singular. QR with column pivoting of the stacked normalised
   heads (``init="qr"``) is the simpler alternative and 2x-20x worse (below).
2. *Swap search*: exchange one row of ``S`` with one outside when that lowers
   ``sum_h kappa_h^8``, ``kappa_h = ||B_h||_F ||B_h^-1||_F`` (the Frobenius condition
   number, at most ``d_h`` times ``cond2``), a smooth stand-in for the maximum over
   heads. With ``C_h = W_h B_h^-1`` (which holds an identity block at ``S``) the swap of
   position ``p`` for row ``j`` changes ``B_h^-1`` by a rank-one term with pivot
   ``C_h[j, p]`` (Sherman-Morrison), so ``||B_h'^-1||_F`` of every candidate comes from
   ``C_h``, ``K_h = B_h^-T B_h^-1`` and ``C_h K_h`` in ``O(d_in d_h)`` per head, and the
   state follows each swap by rank-one updates (recomputed every 32 swaps). Candidates
   are screened on the 8 worst heads, the best 512 scored on all heads. Single swaps
   reach a local minimum of the true ``max_h cond2`` within a few steps, so the search
   restarts from the best set with two random swaps (from ``seed``) until its steps run
   out; the exact ``max_h cond2`` (skipped when a power-iteration lower bound already
   exceeds the best) decides which visited set is returned.

Measured (float64, one core of a loaded 2-core machine):

* random Gaussian, 32 heads of 512 x 128 (DeepSeek MLA's ``kv_b_proj`` with K-nope
  and V heads together), seeds 0-2: QR of the stacked heads 5.7e3 / 6.1e3 / 2.6e4;
  greedy initial set 1.1e3 / 1.3e3 / 1.9e3 (0.6 s); after the default search (23
  steps) 478 / 499 / 570 in 1.9-2.1 s; with 47 steps 478 / 493 / 510 (2-4 s). Per-head
  QR pivots: 33-36; four contiguous groups of 8 heads: 119-123. At 16 heads: 239-250.
* trained MLA (``benchmarks/bd_accuracy.py``: 16 head blocks of 128 x 32 per layer):
  QR 924-11393, greedy 158-525 per layer, after search 97-171 (1.1 s per layer);
  per-head pivots 23-45.

``cond2`` is a worst-case bound on BD's error growth and overstates it by an amount
that depends on the weights: :func:`first_order_factors` is the tighter first-order
bound, :func:`expected_growth` the typical growth, which predicts the measured growth
within a factor 1.5 (random shared set above: cond 478, first-order factor 281, expected
growth 20; four groups: 120, 75, 7.1; per head: 36, 20, 2.7).

All arithmetic is float64 on the CPU, single-threaded. For a fixed ``seed`` the result is
deterministic unless ``max_seconds`` cuts the search short.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from typing import Optional

import torch

from .pivots import FactorizationError, as_float64, block_conds

__all__ = ["expected_growth", "first_order_factors", "grouped_rows", "max_cond", "shared_rows"]

_EPS64 = float(torch.finfo(torch.float64).eps)


# ----------------------------------------------------------------------------- helpers
# Everything below is torch float64 on the CPU: torch's LAPACK/BLAS follow
# torch.set_num_threads, where numpy's and scipy's bundled OpenBLAS threads can stall
# for minutes on a loaded machine.
def _prepare(W: torch.Tensor) -> torch.Tensor:
    if W.dim() != 3:
        raise ValueError(f"expected W of shape (H, d_in, d_h), got {tuple(W.shape)}")
    H, d_in, d_h = W.shape
    if H == 0 or d_h == 0:
        raise ValueError(f"W has no heads or no channels: {tuple(W.shape)}")
    if d_h >= d_in:
        raise FactorizationError(f"head dim d_h={d_h} >= d_in={d_in}")
    W64 = as_float64(W).contiguous()
    if not bool(torch.isfinite(W64).all()):
        raise FactorizationError("non-finite weights")
    return W64


def _orthonormal(W64: torch.Tensor) -> torch.Tensor:
    """Per head an orthonormal basis of the column space (H, d_in, d_h); raises on a
    rank-deficient head (relative tolerance ``max(d_in, d_h) * eps``, as for a
    rank-revealing QR)."""
    _, d_in, d_h = W64.shape
    Q, R = torch.linalg.qr(W64)
    s = torch.linalg.svdvals(R)                              # the singular values of W_h
    tol = max(d_in, d_h) * _EPS64
    if not (bool(torch.isfinite(s).all()) and bool((s[:, 0] > 0).all())
            and bool((s[:, -1] > tol * s[:, 0]).all())):
        raise FactorizationError("a head is rank-deficient (no invertible block of rows)")
    return Q


def _conds(W64: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """cond2 of W_h[rows] per head (inf when singular); rows (d_h,) or (H, d_h)."""
    if rows.dim() == 1:
        return block_conds(W64[:, rows, :])
    return block_conds(W64[torch.arange(W64.shape[0])[:, None], rows, :])


def first_order_factors(W: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """Per head ``g_h = ||W_h B_h^-1||_2 ||B_h||_2 / ||W_h||_2`` with ``B_h = W_h[rows]``
    (rows (d_h,) shared or (H, d_h) per head), in float64; ``inf`` when a block is singular.

    The first-order factor by which BD can grow the rounding error of what it replaces:
    the rewritten key (or value) ``x (W_h B_h^-1)`` carries an error of order
    ``u ||x|| ||W_h B_h^-1||`` and meets a query (or output weight) scaled by ``||B_h||``,
    where the original meets ``u ||x|| ||W_h||``. ``1 <= g_h <= cond2(B_h)``, and
    ``g_h = cond2(B_h)`` when ``W_h`` has orthonormal columns."""
    W64 = as_float64(W)
    r = torch.as_tensor(rows).to(torch.int64).cpu()
    B = W64[:, r, :] if r.dim() == 1 else W64[torch.arange(W64.shape[0])[:, None], r, :]
    C, info = torch.linalg.solve_ex(B, W64, left=False)      # W B^-1
    bad = (info != 0) | ~torch.isfinite(C).all(dim=(1, 2))
    C = torch.where(bad[:, None, None], torch.zeros_like(C), C)
    n2 = lambda M: torch.linalg.matrix_norm(M, ord=2)
    g = n2(C) * n2(B) / n2(W64)
    g = torch.where(~bad & torch.isfinite(g), g, torch.full_like(g, math.inf))
    return g.tolist()


def expected_growth(W: torch.Tensor, rows: torch.Tensor) -> list[float]:
    """Per head ``e_h = ||W_h B_h^-1||_F ||B_h||_F / (||W_h||_F sqrt(d_h))`` with
    ``B_h = W_h[rows]`` (rows (d_h,) shared or (H, d_h) per head), in float64; ``inf``
    when a block is singular.

    The typical (not worst-case) growth of BD's rounding error: the first-order bound of
    :func:`first_order_factors` with Frobenius norms in place of 2-norms, i.e. rounding
    errors of random direction. Measured per head on the attention logits (float32 and
    bfloat16, random and trained weights, every basis form of
    ``benchmarks/bd_accuracy.py``, 400 heads whose error grew more than 3x), the error
    grew by ``sqrt(1 + (k e_h)^2)`` with ``k`` between 0.66 and 1.11, where ``cond2(B_h)``
    needs ``k`` between 0.02 and 0.08 (a 4x spread between weights). ``e_h <= cond2(B_h)``."""
    W64 = as_float64(W)
    r = torch.as_tensor(rows).to(torch.int64).cpu()
    B = W64[:, r, :] if r.dim() == 1 else W64[torch.arange(W64.shape[0])[:, None], r, :]
    C, info = torch.linalg.solve_ex(B, W64, left=False)      # W B^-1
    nF = lambda M: torch.linalg.matrix_norm(M)
    e = nF(C) * nF(B) / (nF(W64) * math.sqrt(W64.shape[2]))
    bad = (info != 0) | ~torch.isfinite(e)
    return torch.where(bad, torch.full_like(e, math.inf), e).tolist()


def max_cond(W: torch.Tensor, rows: torch.Tensor) -> float:
    """``max_h cond2(W_h[rows])`` for rows (d_h,) shared by all heads or (H, d_h) per head,
    computed in float64 (``inf`` when a block is singular)."""
    return float(_conds(as_float64(W), torch.as_tensor(rows).to(torch.int64).cpu()).max())


# ----------------------------------------------------------------------------- initial sets
def _init_greedy(Q: torch.Tensor) -> torch.Tensor:
    """Simultaneous pivoted Gram-Schmidt on the orthonormalised heads: each step takes the
    row whose smallest residual norm over the heads is largest.

    Left-looking: the residual of row j in head h is ``Q_h[j] (I - V_h V_h^T)`` with
    ``V_h`` the orthonormal directions taken so far, and the new direction ``u_h`` is
    orthogonal to ``V_h``, so the residual norms update with ``Q_h u_h`` alone."""
    H, d_in, d_h = Q.shape
    Qt = Q.transpose(1, 2).contiguous()                      # (H, d_h, d_in)
    n = Q.square().sum(-1)                                   # (H, d_in) residual norms^2
    V = Q.new_zeros(H, d_h, d_h)                             # directions taken, as rows
    taken = torch.zeros(d_in, dtype=torch.bool)
    rows = []
    for t in range(d_h):
        score = n.min(dim=0).values.masked_fill(taken, -math.inf)
        j = int(torch.argmax(score))
        if not float(score[j]) > 0:
            raise FactorizationError("no shared block of rows is invertible for every head")
        rows.append(j)
        taken[j] = True
        e = Q[:, j, :]                                       # (H, d_h)
        Vt = V[:, :t]
        for _ in range(2):                                   # Gram-Schmidt, twice
            e = e - ((e[:, None, :] * Vt).sum(-1)[:, :, None] * Vt).sum(1)
        u = e / e.norm(dim=-1, keepdim=True)
        V[:, t] = u
        proj = torch.bmm(u[:, None, :], Qt)[:, 0]            # (H, d_in) = Q_h u_h
        n -= proj * proj
        n[:, j] = 0.0
    return torch.sort(torch.tensor(rows, dtype=torch.int64)).values


def _init_qr(Q: torch.Tensor) -> torch.Tensor:
    """QR with column pivoting of the stacked orthonormalised heads (H*d_h, d_in): the
    same choice as LAPACK's geqp3 up to ties, by left-looking pivoted Gram-Schmidt."""
    H, d_in, d_h = Q.shape
    At = Q.permute(0, 2, 1).reshape(H * d_h, d_in).contiguous()   # column j = [Q_1[j], ...]
    n = At.square().sum(0)
    V = At.new_zeros(d_h, H * d_h)
    taken = torch.zeros(d_in, dtype=torch.bool)
    rows = []
    for t in range(d_h):
        j = int(torch.argmax(n.masked_fill(taken, -math.inf)))
        if not float(n[j]) > 0:
            raise FactorizationError("no shared block of rows is invertible for every head")
        rows.append(j)
        taken[j] = True
        e = At[:, j].clone()
        for _ in range(2):
            e = e - (V[:t] @ e) @ V[:t]
        u = e / e.norm()
        V[t] = u
        proj = u @ At
        n -= proj * proj
        n[j] = 0.0
    return torch.sort(torch.tensor(rows, dtype=torch.int64)).values


# ----------------------------------------------------------------------------- swap search
class _State:
    """Per-head quantities for the row set ``rows`` (positions p = 0..d_h-1):
    C = W B^-1 (H, d_in, d_h), M = B^-1, K = M^T M, CK = C K, nB = ||B||_F^2."""

    def __init__(self, W64: torch.Tensor, rows: torch.Tensor):
        self.W = W64
        self.rowsq = W64.square().sum(-1)                    # (H, d_in)
        self.ok = self.reset(rows)

    def reset(self, rows: torch.Tensor) -> bool:
        """Recompute everything for ``rows``; False (state unusable) if a block is
        singular."""
        self.rows = rows.clone()
        H, d_in, d_h = self.W.shape
        B = self.W[:, self.rows, :]
        self.M, info = torch.linalg.solve_ex(B, torch.eye(d_h, dtype=B.dtype).expand(H, d_h, d_h))
        self.C = self.W @ self.M
        self.K = self.M.transpose(1, 2) @ self.M
        self.CK = self.C @ self.K
        self.Crow = self.C.square().sum(-1)
        self.nB = self.rowsq[:, self.rows].sum(-1)
        self.inS = torch.zeros(d_in, dtype=torch.bool)
        self.inS[self.rows] = True
        return not bool(info.any()) and bool(torch.isfinite(self.CK).all())

    _FIELDS = ("rows", "M", "C", "K", "CK", "Crow", "nB", "inS")

    def snapshot(self) -> dict:
        return {f: getattr(self, f).clone() for f in self._FIELDS}

    def restore(self, snap: dict) -> None:
        for f in self._FIELDS:
            getattr(self, f).copy_(snap[f])

    def cond_lower_bound(self, iters: int = 8) -> torch.Tensor:
        """A lower bound on cond2(B_h) per head from power iterations on ``B^T B`` and
        ``K = B^-T B^-1`` (Rayleigh quotients never exceed the largest eigenvalue)."""
        B = self.W[:, self.rows, :]
        out = []
        for A in (B.transpose(1, 2) @ B, self.K):
            v = A.new_ones(A.shape[0], A.shape[1], 1)
            for _ in range(iters):
                v = torch.bmm(A, v)
                v = v / v.norm(dim=1, keepdim=True)
            out.append((v * torch.bmm(A, v)).sum((1, 2)))
        return (out[0] * out[1]).clamp_min(0).sqrt()

    def kappa2(self) -> torch.Tensor:
        """Squared Frobenius condition number of every head's block."""
        return self.nB * torch.diagonal(self.K, dim1=1, dim2=2).sum(-1)

    def candidates(self, heads: torch.Tensor, j: Optional[torch.Tensor] = None,
                   p: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Squared Frobenius condition of each head in ``heads`` after swapping position p
        for row j: every (j, p) pair as (len(heads), d_in, d_h), or the listed pairs as
        (len(heads), n). Swaps that make a block singular score inf."""
        Kd = torch.diagonal(self.K[heads], dim1=1, dim2=2)   # (w, d_h)
        nM = Kd.sum(-1)
        if j is None:
            C, CK = self.C[heads], self.CK[heads]
            Kpp = Kd[:, None, :]
            Crow = self.Crow[heads][:, :, None]
            rsq_j = self.rowsq[heads][:, :, None]
            rsq_p = self.rowsq[heads][:, self.rows][:, None, :]
            nM, nB = nM[:, None, None], self.nB[heads][:, None, None]
        else:
            hh = heads[:, None]
            C, CK = self.C[hh, j[None], p[None]], self.CK[hh, j[None], p[None]]
            Kpp = Kd[:, p]
            Crow = self.Crow[hh, j[None]]
            rsq_j = self.rowsq[hh, j[None]]
            rsq_p = self.rowsq[hh, self.rows[p][None]]
            nM, nB = nM[:, None], self.nB[heads][:, None]
        # nM' = nM + a (Kpp (Crow - 2 C + 1) a - 2 (CK - Kpp)),  a = 1 / C[j, p]
        a = torch.reciprocal(C)
        x = C * -2.0
        x += Crow
        x += 1.0
        x *= Kpp
        x *= a
        CK = CK - Kpp
        CK *= 2.0
        x -= CK
        x *= a
        x += nM
        x *= nB - rsq_p + rsq_j
        x.nan_to_num_(nan=math.inf, posinf=math.inf)
        return x.masked_fill_(x <= 0, math.inf)

    def swap(self, p: int, j: int) -> None:
        """Replace rows[p] by row j: rank-one (Sherman-Morrison) updates of every head's
        state, ``C' = C - c r^T / alpha`` with ``c = C[:, p]``, ``r = C[j] - e_p``,
        ``alpha = C[j, p]``, and likewise for ``M``, ``K`` and ``C K``."""
        i = int(self.rows[p])
        a = 1.0 / self.C[:, j, p]                            # (H,)
        c = self.C[:, :, p].clone()                          # (H, d_in)
        r = self.C[:, j, :].clone()                          # (H, d_h)
        r[:, p] -= 1.0
        m = self.M[:, :, p].clone()
        k = self.K[:, :, p].clone()
        kap = k[:, p].clone()
        Ck = self.CK[:, :, p].clone()
        Cr = torch.bmm(r[:, None, :], self.C.transpose(1, 2))[:, 0]   # (H, d_in)
        Kr = torch.bmm(self.K, r[:, :, None])[:, :, 0]       # (H, d_h)
        rk = (r * k).sum(-1)
        rr = (r * r).sum(-1)
        a1 = a[:, None]
        u1 = -a1 * Ck + (a * a * kap)[:, None] * Cr + (a * a * rk - a ** 3 * kap * rr)[:, None] * c
        u2 = -a1 * Cr + (a * a * rr)[:, None] * c
        ac = a1 * c
        self.CK.baddbmm_(torch.stack([u1, u2, -ac], dim=2), torch.stack([r, k, Kr], dim=1))
        self.Crow += -2.0 * ac * Cr + (ac * ac) * rr[:, None]
        self.C.baddbmm_(ac[:, :, None], r[:, None, :], alpha=-1.0)
        self.M.baddbmm_((a1 * m)[:, :, None], r[:, None, :], alpha=-1.0)
        self.K.baddbmm_(torch.stack([-(a1 * k), -(a1 * r), (a * a * kap)[:, None] * r], dim=2),
                        torch.stack([r, k, r], dim=1))
        self.nB += self.rowsq[:, j] - self.rowsq[:, i]
        self.rows[p] = j
        self.inS[i] = False
        self.inS[j] = True


def _phi(k2: torch.Tensor, top: float) -> torch.Tensor:
    """``sum_h (kappa_h^2 / top)^4`` over the first dim: a smooth maximum over heads."""
    x = k2 / top
    x.square_().square_()
    return x.sum(0)


def _search(W64: torch.Tensor, rows: torch.Tensor, *, max_steps: int, refresh: int,
            screen_heads: int, screen_pairs: int, kicks: int, kick_size: int,
            gen: torch.Generator, deadline: float) -> torch.Tensor:
    H, _, d_h = W64.shape
    st = _State(W64, rows)
    if not st.ok:
        return torch.sort(rows).values
    best_rows = torch.sort(st.rows).values
    best = float(_conds(W64, best_rows).max())
    best_state = st.snapshot()

    def keep_best():
        # exact max cond2 of the current set, unless a lower bound shows it cannot win
        nonlocal best, best_rows, best_state
        if float(st.cond_lower_bound().max()) >= best:
            return
        cur = torch.sort(st.rows).values
        c = float(_conds(W64, cur).max())
        if c < best:
            best, best_rows, best_state = c, cur, st.snapshot()

    all_heads = torch.arange(H)
    steps = since_reset = 0
    kicks_left = kicks
    was_improving = True
    while steps < max_steps and time.perf_counter() < deadline:
        steps += 1
        k2 = st.kappa2()
        if not bool(torch.isfinite(k2).all()):
            break
        top = float(k2.max())
        phi = float(_phi(k2, top))
        worst = torch.argsort(k2, descending=True)[:screen_heads]
        score = _phi(st.candidates(worst), top)                        # (d_in, d_h)
        score[st.inS] = math.inf
        n = min(screen_pairs, score.numel())
        flat = torch.topk(score.reshape(-1), n, largest=False).indices
        j, p = flat // d_h, flat % d_h
        tot = _phi(st.candidates(all_heads, j, p), top)                # (n,)
        b = int(torch.argmin(tot))
        improving = math.isfinite(float(tot[b])) and float(tot[b]) < phi * (1.0 - 1e-9)
        if not improving and was_improving:
            keep_best()                                                  # a local minimum
        was_improving = improving
        if improving:
            st.swap(int(p[b]), int(j[b]))
            since_reset += 1
            if since_reset >= refresh:
                if not st.reset(st.rows):
                    break
                since_reset = 0
            continue
        if kicks_left <= 0:
            break
        kicks_left -= 1
        # restart from the best set (a saved copy of its state) with a few random swaps
        st.restore(best_state)
        since_reset = 0
        outside = torch.nonzero(~st.inS)[:, 0]
        pos = torch.randperm(d_h, generator=gen)[:kick_size]
        new_rows = outside[torch.randperm(outside.numel(), generator=gen)[:kick_size]]
        for pp, jj in zip(pos.tolist(), new_rows.tolist()):
            # skip a swap that would make some head's block (nearly) singular: its
            # determinant changes by the factor C_h[j, p]
            if float(st.C[:, jj, pp].abs().min()) > 1e-6:
                st.swap(pp, jj)
        if not bool(torch.isfinite(st.kappa2()).all()):
            break
        was_improving = True
    keep_best()
    return best_rows


# ----------------------------------------------------------------------------- public API
@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # The search is a long chain of small tensor ops: extra threads do not pay, cost a
    # great deal on a loaded machine, and the thread count must not change which rows
    # are found. Restored on exit.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _default_steps(H: int, d_in: int, d_h: int) -> int:
    # a step costs O(H d_in d_h): 23 steps at 32 heads of 512 x 128, up to 256 on small
    # problems
    return max(16, min(256, int(5e7 // (H * d_in * d_h))))


def shared_rows(
    W: torch.Tensor,
    *,
    max_seconds: float = 2.0,
    seed: int = 0,
    init: str = "greedy",
    max_steps: Optional[int] = None,
) -> tuple[torch.Tensor, list[float]]:
    """One row set ``S`` shared by all heads of ``W`` (H, d_in, d_h), chosen to minimise
    ``max_h cond2(W_h[S])``.

    ``init``: ``"greedy"`` (simultaneous pivoted Gram-Schmidt over the orthonormalised
    heads, the default) or ``"qr"`` (QR with column pivoting of the stacked orthonormalised
    heads). The swap search then runs for ``max_steps`` steps (a step is one swap or one
    random restart from the best set; by default about 50 at 32 heads of 512 x 128 and up
    to 256 on small problems; ``0`` returns the initial set) or until ``max_seconds`` have
    passed since the call, whichever comes first. Deterministic for a given ``seed``
    unless ``max_seconds`` ends the search.

    Returns the rows, sorted, (d_h,) int64 on the CPU, and ``cond2(W_h[S])`` per head.
    Raises :class:`FactorizationError` when ``d_h >= d_in``, a weight is non-finite, a
    head is rank-deficient, or no shared block is invertible for every head.
    """
    with _single_thread():
        return _shared_rows(W, max_seconds=max_seconds, seed=seed, init=init, max_steps=max_steps)


def _shared_rows(W, *, max_seconds, seed, init, max_steps):
    t0 = time.perf_counter()
    W64 = _prepare(W)
    H, d_in, d_h = W64.shape
    Q = _orthonormal(W64)
    if init == "greedy":
        rows = _init_greedy(Q)
    elif init == "qr":
        rows = _init_qr(Q)
    else:
        raise ValueError(f"init must be 'greedy' or 'qr', got {init!r}")
    steps = _default_steps(H, d_in, d_h) if max_steps is None else int(max_steps)
    if steps > 0 and bool(torch.isfinite(_conds(W64, rows)).all()):
        rows = _search(W64, rows, max_steps=steps, refresh=32,
                       screen_heads=min(H, 8), screen_pairs=512, kicks=steps,
                       kick_size=min(2, d_h),
                       gen=torch.Generator().manual_seed(seed), deadline=t0 + max_seconds)
    conds = _conds(W64, rows)
    if not bool(torch.isfinite(conds).all()):
        raise FactorizationError("found no shared block of rows that is invertible for every head")
    return rows, conds.tolist()


def grouped_rows(
    W: torch.Tensor,
    n_groups: int,
    *,
    groups: Optional[Sequence[Sequence[int]]] = None,
    max_seconds: float = 2.0,
    seed: int = 0,
    init: str = "greedy",
    max_steps: Optional[int] = None,
) -> tuple[list[list[int]], torch.Tensor]:
    """One shared row set per group of heads of ``W`` (H, d_in, d_h).

    By default the heads are split into ``n_groups`` contiguous ranges of near-equal size
    (the first ``H % n_groups`` ranges get one head more), the form a lowering prefers;
    ``groups`` gives the partition explicitly instead (``n_groups`` lists of head indices
    covering every head once). Each group's rows come from :func:`shared_rows`, which
    gets what is left of ``max_seconds`` divided by the groups still to do, and seed
    ``seed + g``. Returns the groups and the rows (n_groups, d_h), sorted within a group.
    Raises :class:`FactorizationError` like :func:`shared_rows`.
    """
    W64 = _prepare(W)
    H = W64.shape[0]
    if not 1 <= n_groups <= H:
        raise ValueError(f"n_groups must lie in [1, {H}], got {n_groups}")
    if groups is None:
        sizes = [H // n_groups + (1 if g < H % n_groups else 0) for g in range(n_groups)]
        groups, start = [], 0
        for size in sizes:
            groups.append(list(range(start, start + size)))
            start += size
    else:
        groups = [[int(h) for h in g] for g in groups]
        if len(groups) != n_groups or any(not g for g in groups) or \
                sorted(h for g in groups for h in g) != list(range(H)):
            raise ValueError(f"groups must be {n_groups} non-empty lists covering heads 0..{H - 1} once")
    t0 = time.perf_counter()
    rows = []
    for g, heads in enumerate(groups):
        left = max(0.0, max_seconds - (time.perf_counter() - t0))
        r, _ = shared_rows(W64[heads], max_seconds=left / (n_groups - g), seed=seed + g,
                           init=init, max_steps=max_steps)
        rows.append(r)
    return groups, torch.stack(rows)
