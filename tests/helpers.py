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
