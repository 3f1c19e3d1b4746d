"""Shared test utilities: float64 references and side-by-side runs with plain Inductor."""
from __future__ import annotations

import copy
from typing import Any

import torch

import bdpass


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        return first_tensor(next(iter(out.values())))
    if isinstance(out, (list, tuple)):
        return first_tensor(out[0])
    raise TypeError(type(out))


def to64(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.double()
    if isinstance(x, dict):
        return {k: to64(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(to64(v) for v in x)
    return x


def side_by_side(model: torch.nn.Module, args: tuple, kwargs: dict | None = None,
                 options: dict | None = None, dynamic: bool | None = False):
    """(bd error, inductor error, bd output, inductor output, report), errors against a float64
    eager run of the same weights, all in one process."""
    kwargs = kwargs or {}
    model = model.eval()
    ref_model = copy.deepcopy(model).double()
    with torch.no_grad():
        ref = first_tensor(ref_model(*to64(args), **to64(kwargs)))
        torch._dynamo.reset()
        ind = first_tensor(torch.compile(model, backend="inductor", dynamic=dynamic)(*args, **kwargs))
        torch._dynamo.reset()
        with bdpass.collect_reports() as report:
            bd = first_tensor(torch.compile(model, backend="bd", options=options, dynamic=dynamic)(*args, **kwargs))
        torch._dynamo.reset()
    return rel_l2(bd, ref), rel_l2(ind, ref), bd, ind, report


# ---------------------------------------------------------------------------- BD folding
# The folds of B into the partner weights, written out on head-stacked weights: the
# reference the identity tests check BD factors against (the backend folds the same way,
# column group by column group, in bdpass/rewrites/bd_factors.py: _ComponentMath).
def _basis_for(f, n_heads: int, what: str) -> torch.Tensor:
    H = f.basis64.shape[0]
    if n_heads % H:
        raise ValueError(f"{what} has {n_heads} heads, not a multiple of the {H} key/value heads")
    return f.basis64.repeat_interleave(n_heads // H, dim=0)


def fold_query(Wq: torch.Tensor, bq, f):
    """``Wq'_h = Wq_h @ B_g^T``, ``bq'_h = bq_h @ B_g^T`` with ``g = h // (H_q // H)``.
    ``Wq``: (H_q, d_in_q, d_h); ``bq``: (H_q, d_h) or None. Float64 math, cast once."""
    if Wq.dim() != 3 or Wq.shape[2] != f.head_dim:
        raise ValueError(f"expected Wq of shape (H_q, d_in, {f.head_dim}), got {tuple(Wq.shape)}")
    Hq = Wq.shape[0]
    if bq is not None and tuple(bq.shape) != (Hq, f.head_dim):
        raise ValueError(f"bq must have shape ({Hq}, {f.head_dim}), got {tuple(bq.shape)}")
    Bt = _basis_for(f, Hq, "the query").transpose(1, 2)
    wq_new = (Wq.double() @ Bt).to(device=Wq.device, dtype=Wq.dtype)
    bq_new = None if bq is None else (bq.double()[:, None, :] @ Bt)[:, 0, :].to(device=bq.device, dtype=bq.dtype)
    return wq_new, bq_new


def fold_output(Wo: torch.Tensor, f) -> torch.Tensor:
    """``Wo'_h = B_g @ Wo_h``; ``Wo``: (H_o, d_h, d_out), the output projection's rows
    that read each head. Float64 math, cast once."""
    if Wo.dim() != 3 or Wo.shape[1] != f.head_dim:
        raise ValueError(f"expected Wo of shape (H_o, {f.head_dim}, d_out), got {tuple(Wo.shape)}")
    B = _basis_for(f, Wo.shape[0], "the output projection")
    return (B @ Wo.double()).to(device=Wo.device, dtype=Wo.dtype)
