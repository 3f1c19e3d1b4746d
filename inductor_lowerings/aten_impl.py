"""The two custom ops written with aten ops only: their CPU kernels, their
implementation on any device when Triton is unavailable, and the decomposition Inductor
sees on the CPU (so its C++ code generation can fuse the gathers and additions).

Both functions follow the contracts documented in :mod:`inductor_lowerings.ops`.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["bd_project_aten", "pivot_linear_aten"]


def bd_project_aten(x: torch.Tensor, rows: torch.Tensor, rest: torch.Tensor,
                    w_rest: torch.Tensor, bias: Optional[torch.Tensor],
                    shared: bool = False) -> torch.Tensor:
    """``y[..., h*g:(h+1)*g] = x[..., rows[h]] + x[..., rest[h]] @ w_rest[h] (+ bias[h])``.

    Shared (all heads use the index tables of head 0): one GEMM ``x[..., rest[0]] @ W``
    with ``W = w_rest`` laid out as ``(d_in - g, H*g)`` -- a free view when ``w_rest``
    is stored ``(d_in - g, H, g)``-contiguous, a copy otherwise -- then the identity
    columns broadcast over the heads. Per head: one gather of the rest rows of every
    head and a batched GEMM whose additive input is the identity term plus the bias.
    """
    H, G = rows.shape
    K = rest.shape[1]
    d_in = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    M = x2.shape[0]
    if shared:
        xs = x2.index_select(1, rows[0])                          # (M, G)
        xr = x2.index_select(1, rest[0])                          # (M, K)
        w = w_rest.permute(1, 0, 2).reshape(K, H * G)
        y = torch.mm(xr, w) if bias is None else torch.addmm(bias.reshape(H * G), xr, w)
        y = y.view(M, H, G) + xs.unsqueeze(1)
    else:
        xs = x2.index_select(1, rows.reshape(-1)).view(M, H, G).transpose(0, 1)   # (H, M, G)
        xr = x2.index_select(1, rest.reshape(-1)).view(M, H, K).transpose(0, 1)   # (H, M, K)
        init = xs if bias is None else xs + bias.unsqueeze(1)
        y = torch.baddbmm(init, xr, w_rest).transpose(0, 1)                      # (M, H, G)
    return y.reshape(*lead, H * G)


def pivot_linear_aten(x: torch.Tensor, w_p: torch.Tensor, b_p: Optional[torch.Tensor],
                      coeff: torch.Tensor, b_r: Optional[torch.Tensor],
                      pivots: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``y[..., pivots] = x @ w_p (+ b_p)``, ``y[..., rest] = y[..., pivots] @ coeff (+ b_r)``.

    Both GEMMs write their columns into the final buffer with ``index_copy_``; no
    concatenation and no permuting gather.
    """
    d_in, R = w_p.shape
    N = coeff.shape[1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in)
    yp = torch.mm(x2, w_p) if b_p is None else torch.addmm(b_p, x2, w_p)
    yr = torch.mm(yp, coeff) if b_r is None else torch.addmm(b_r, yp, coeff)
    out = x2.new_empty((x2.shape[0], R + N))
    out.index_copy_(1, pivots, yp)
    out.index_copy_(1, rest, yr)
    return out.view(*lead, R + N)
