"""Tensor-parallel shards of a prepared model, read from one prepared checkpoint.

A model prepared once (:func:`bdpass.prepare`, saved with :func:`bdpass.save_prepared`) is
served tensor-parallel by loading, on each rank, only that rank's slices of the file into the
rank's own module (the model class built with local sizes, as gpt-fast/Megatron-style code
builds it, its forward all-reducing after every row-parallel projection). Nothing is
factorized at load time, and no rank holds another rank's factors.

``tp_plan`` maps module paths to how each is split across ``world`` ranks, as in the
unprepared model (a path the plan does not name is replicated):

* ``"col"`` (column-parallel: output features split, rank ``k`` owns the ``k``-th of
  ``world`` equal ranges):

  - ``nn.Linear``: rows of ``weight`` and ``bias``;
  - :class:`~bdpass.prepare.BDLinear` (a projection after basis decomposition), *by heads*:
    its column blocks are cut at the range's ends, which must fall on head boundaries
    inside every BD block (a head of a BD block is as wide as its table's identity rows;
    a dense block may be cut anywhere). A rank keeps the pivot tables its blocks read;
  - :class:`~bdpass.prepare.Absorbed` (the first linear of a low-rank chain, whose product
    the chain's :class:`~bdpass.prepare.PivotLinear` computes): nothing to split; legal
    only with its chain split ``"row"``.

* ``"row"`` (row-parallel: the output is this rank's partial sum, all-reduced by the model):

  - ``nn.Linear``: columns of ``weight``; the bias is added once (rank 0 holds it, the
    others hold zeros);
  - :class:`~bdpass.prepare.PivotLinear` (a low-rank chain after PIFA), *by rank slices*:
    rank ``k`` owns the ``k``-th of ``world`` equal slices ``J`` of the ``r`` pivots
    (``w_pivot[:, J]``, ``coeff[J]``) and computes ``y[P_J]`` (complete) and its term
    ``y[P_J] @ coeff[J]`` of the other columns; the pivot columns of the other ranks are
    zero on this rank, and the bias of the non-pivot columns is added once (rank 0). The
    sum over ranks is the chain's output, exactly: the chain was ``u(v(x))`` with ``v``
    column-parallel and ``u`` row-parallel, and is still a sum of per-rank terms. A rank
    holds ``in*r_k + r_k*(out - r_k)`` factor elements, ``r_k*(r - r_k)`` of them the zeros
    of the other ranks' pivot columns (the op writes every output column).

Refused (``ValueError`` with the reason): a BDLinear split ``"row"`` (its identity rows read
input channels that the split would scatter over ranks), a PivotLinear split ``"col"`` (every
output column needs every pivot), cuts that split a BD head, sizes not divisible by
``world``.

Entry points: :func:`load_sharded` (from a safetensors file written by
:func:`~bdpass.save_prepared`, reading only this rank's slices) and :func:`shard_state` (from
an in-memory prepared ``state_dict`` and plan); :func:`local_plan` gives the specs of the
local prepared modules.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

__all__ = ["load_sharded", "shard_state", "local_plan", "ShardError"]


class ShardError(ValueError):
    """A split the prepared module does not allow (see the module docstring)."""


def _how(tp_plan: Mapping[str, Any], path: str) -> str | None:
    how = tp_plan.get(path)
    if isinstance(how, (tuple, list)):
        how = how[0]
    if how not in (None, "col", "row"):
        raise ShardError(f"bdpass.shard: {path}: unknown split {how!r} (use 'col', 'row' or leave it out)")
    return how


def split_range(n: int, rank: int, world: int, what: str) -> tuple[int, int]:
    """Rank ``rank``'s part ``[a, b)`` of ``n`` split in ``world`` equal parts."""
    if n % world:
        raise ShardError(f"bdpass.shard: {what}: {n} is not divisible by {world} ranks")
    per = n // world
    return rank * per, (rank + 1) * per


# ---------------------------------------------------------------------------- per module
# a prepared module's share is its rule's (``Rule.shard_module``: BD's in
# bdpass.rewrites.bd_modules, PIFA's in bdpass.rewrites.pifa_modules)
def _linear(path: str, how: str | None, get: Callable, names: list[str], rank: int, world: int) -> dict:
    state = {}
    for name in names:
        t = get(name)
        if how == "col":
            n = t.get_shape()[0] if hasattr(t, "get_shape") else t.shape[0]
            a, b = split_range(n, rank, world, f"{path}.{name} (rows)")
            state[name] = t[a:b]
        elif how == "row" and name == "weight":
            n = t.get_shape()[1] if hasattr(t, "get_shape") else t.shape[1]
            a, b = split_range(n, rank, world, f"{path}.weight (columns)")
            state[name] = t[:, a:b]
        elif how == "row" and name == "bias":
            full = t[...]
            state[name] = full if rank == 0 else torch.zeros_like(full)
        else:
            state[name] = t[...]
    return state


# ---------------------------------------------------------------------------- whole model
def _owner(name: str, paths: set[str]) -> tuple[str, str]:
    """(module path, tensor name inside it) for a state_dict key, the longest known path."""
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in paths:
            return p, ".".join(parts[k:])
    return "", name


def _shard(plan: dict, names: list[str], read: Callable[[str], Any], tp_plan: Mapping[str, Any],
           rank: int, world: int) -> tuple[dict, dict]:
    if not 0 <= rank < world:
        raise ShardError(f"bdpass.shard: rank {rank} outside a world of {world}")
    from . import rules
    from .prepare.modules import MARKER

    prepared = plan["modules"]
    unknown = set(tp_plan) - {p for n in names for p in [".".join(n.split(".")[:k])
                                                         for k in range(1, len(n.split(".")))]} - set(prepared)
    if unknown:
        raise ShardError(f"bdpass.shard: the split plan names modules the checkpoint does not have: "
                         f"{sorted(unknown)}")
    paths = set(prepared) | set(tp_plan)
    by_module: dict[str, list[str]] = {}
    for n in names:
        p, rest = _owner(n, paths)
        by_module.setdefault(p, []).append(rest)
    specs: dict[str, dict] = {}
    state: dict[str, torch.Tensor] = {}
    # a module whose spec names ``into`` (PIFA's Absorbed) is part of the module at that path
    absorbed_into = {spec["into"]: p for p, spec in prepared.items() if "into" in spec}
    for p, spec in sorted(prepared.items(), key=lambda kv: "into" in kv[1]):   # the modules they join first
        how = _how(tp_plan, p)
        get = (lambda q: lambda t: read(f"{q}.{t}"))(p)
        local: dict
        tensors: dict = {}
        if how is None:
            local, tensors = dict(spec), {t: get(t)[...] for t in by_module.get(p, [])}
        else:
            local, tensors = rules.rule_for_module(spec["type"]).shard_module(
                p, spec, how, get, rank, world, lambda q: _how(tp_plan, q))
        if MARKER in by_module.get(p, ()) and MARKER not in tensors:     # the empty marker, as it is
            tensors[MARKER] = get(MARKER)[...]
        specs[p] = local
        state.update({f"{p}.{t}" if p else t: v for t, v in tensors.items()})
    for p, ts in by_module.items():
        if p in prepared:
            continue
        how = _how(tp_plan, p) if p else None
        if how is not None and set(ts) - {"weight", "bias"}:
            raise ShardError(f"bdpass.shard: {p}: only nn.Linear-shaped modules (weight, bias) can be split, "
                             f"it holds {sorted(ts)}")
        get = (lambda q: lambda t: read(f"{q}.{t}" if q else t))(p)
        for t, v in _linear(p, how, get, ts, rank, world).items():
            state[f"{p}.{t}" if p else t] = v
    for into, p in absorbed_into.items():
        if into not in specs:
            raise ShardError(f"bdpass.shard: {p} is absorbed into {into}, which the plan does not hold")
    local_plan_ = {**plan, "modules": specs}
    # own copies: a slice of an in-memory state would keep the whole tensor alive
    return local_plan_, {k: v.clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def local_plan(plan: dict, tp_plan: Mapping[str, Any], rank: int, world: int) -> dict:
    """The plan of rank ``rank``'s prepared modules (shapes only; nothing is read)."""
    from .prepare.modules import from_spec

    fake: dict[str, torch.Tensor] = {}
    for p, spec in plan["modules"].items():
        with torch.device("meta"):
            m = from_spec(spec, dtype=torch.float32)
        for n, t in m.state_dict(keep_vars=True).items():
            fake[f"{p}.{n}"] = t
    lp, _ = _shard(plan, list(fake), fake.__getitem__, {k: v for k, v in tp_plan.items() if k in plan["modules"]},
                   rank, world)
    return lp


def _install(model: nn.Module, lp: dict, state: dict, strict: bool) -> nn.Module:
    from .prepare.checkpoint import set_config_plan
    from .prepare.modules import PREPARED_TYPES, from_spec

    for path, spec in lp["modules"].items():
        old = model.get_submodule(path)
        if isinstance(old, PREPARED_TYPES):
            raise ShardError(f"bdpass.shard: {path} is already a prepared module; give a fresh (local) model")
        w = getattr(old, "weight", None)
        dev = w.device if isinstance(w, torch.Tensor) and w.device.type != "meta" else None
        new = from_spec(spec, device=dev, dtype=None if w is None else w.dtype,
                        requires_grad=bool(getattr(w, "requires_grad", False)))
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, new)
    model.load_state_dict(state, strict=strict)
    set_config_plan(model, lp)
    return model


def shard_state(model: nn.Module, plan: dict, state: Mapping[str, torch.Tensor], tp_plan: Mapping[str, Any],
                rank: int, world: int, *, strict: bool = True) -> nn.Module:
    """Give ``model`` (rank ``rank``'s module, built with local sizes) this rank's share of a
    prepared model held in memory: ``plan`` (:func:`bdpass.plan_of`) and ``state`` (its
    ``state_dict``). Returns ``model``."""
    lp, local = _shard(plan, list(state), state.__getitem__, tp_plan, rank, world)
    return _install(model, lp, local, strict)


def load_sharded(model: nn.Module, path: Any, tp_plan: Mapping[str, Any], rank: int, world: int, *,
                 strict: bool = True) -> nn.Module:
    """Load rank ``rank``'s share of the prepared checkpoint ``path`` (a safetensors file
    written by :func:`bdpass.save_prepared`) into ``model``, rank ``rank``'s module built with
    local sizes: its replaced modules become local prepared modules (:func:`local_plan`),
    and every tensor is read as this rank's slice only. ``strict``: the file's tensors and
    the model's state match (a local module of the wrong size is a size mismatch). Returns
    ``model``. Nothing is factorized."""
    from safetensors import safe_open

    from .prepare.checkpoint import read_plan

    plan = read_plan(path)
    with safe_open(str(path), framework="pt") as f:
        lp, local = _shard(plan, list(f.keys()), f.get_slice, tp_plan, rank, world)
    return _install(model, lp, local, strict)
