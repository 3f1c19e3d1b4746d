"""PIFA's module-level side: the edits of ``prepare`` and the shards of ``bdpass.shard``.

An edit per chain: the chain's second linear module becomes a
:class:`~bdpass.prepare.modules.PivotLinear`, its first an
:class:`~bdpass.prepare.modules.Absorbed` identity. A chain whose output order the next
chain absorbs (``restore_order=False``) stays linked to it: both are prepared, the first
without restoring the order, the next with the absorbed order in its first weight; if the
next chain cannot be prepared, this one is prepared with the order restored (its factors
do not depend on the link); a chain that absorbed the order of a chain that cannot be
prepared is prepared with that order undone (a row permutation of its first factor: the
pivots of a chain depend on its second weight only).

The ops between the two modules must only move leading dimensions without naming the
channel count (``reshape(..., -1)``, ``flatten``/``unsqueeze`` of leading dims,
``contiguous``, ...), so that they act the same on the input of the first linear; nothing
else reads the intermediate (the chain finder checks it).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..graph.ops import canonical
from ..prepare.edits import (Backed, Edit, ModelIndex, NotPreparable, as_stored, innermost_module, last_component,
                             module_site, same_type, single_read, site_name)
from ..prepare.modules import Absorbed, PivotLinear
from .pifa_plan import KIND, reshape_sizes, static_value


_AGNOSTIC = {"contiguous", "clone", "detach", "alias", "type_as", "to", "cast", "dropout", "flatten", "unflatten",
             "unsqueeze", "squeeze"}


def _between_ok(chain: Any, inner: tuple[Backed, Backed]) -> str | None:
    """Why the ops between the chain's two modules would not act alike on the first
    module's input (None if they do). Ops inside either module's own forward (Conv1D's
    reshapes) are part of the module."""
    names = {(type(b.module), b.path.rsplit(".", 1)[-1]) for b in inner}
    for m in chain.between:
        im = innermost_module(m)
        if im is not None and any(same_type(im[1], t) and last_component(im[0]) == n for t, n in names):
            continue
        name = canonical(m)
        if name == "reshape":
            sizes = reshape_sizes(m)
            if sizes is not None and not isinstance(sizes[-1], torch.fx.Node) and static_value(sizes[-1]) == -1:
                continue
            return f"{m.name} reshapes with the chain's inner width {chain.rank} spelled out"
        if name not in _AGNOSTIC:
            return f"{m.name} between the two modules"
    return None


def _pifa_module(d: Any, restore_order: bool, second: Backed, requires_grad: bool,
                 input_order: torch.Tensor | None = None) -> PivotLinear:
    """``input_order``: the producer's column order that the factors' first weight absorbed,
    to be undone (the producer stays as it was, so the input arrives in natural order)."""
    f = d.factors
    w = second.module.weight
    chain = d.chain
    mod = PivotLinear(chain.first.d_in, chain.rank, chain.second.d_out, bias=f.b_pivot is not None,
                      restore_order=restore_order, device=w.device, dtype=w.dtype, requires_grad=requires_grad,
                      replaces=second.kind)
    w_pivot = f.w_pivot
    if input_order is not None:     # rows of w_pivot are in the producer's order: w_abs = w_nat[order]
        w_pivot = w_pivot[torch.argsort(input_order.to(w_pivot.device))]
    with torch.no_grad():
        for name, v in (("w_pivot", w_pivot), ("b_pivot", f.b_pivot), ("coeff", f.coeff), ("b_rest", f.b_rest)):
            if v is not None:
                getattr(mod, name).copy_(as_stored(v, w))
        if restore_order:
            mod.pivots.copy_(f.pivots.to(w.device))
            mod.rest.copy_(f.rest.to(w.device))
    return mod


def module_edits(decisions: list[Any], args: Sequence[Any], idx: ModelIndex,
                 graph: int) -> tuple[list[Edit], list[NotPreparable]]:
    """The edits of one graph instance's PIFA decisions (:class:`~bdpass.rewrites.pifa.PifaDecision`),
    and those that have none."""
    edits, bad = [], []
    backed: dict[int, tuple[Backed, Backed]] = {}
    why: dict[int, str] = {}
    by_chain = {id(d.chain): k for k, d in enumerate(decisions)}
    for k, d in enumerate(decisions):
        c = d.chain
        b1, b2 = module_site(c.first, args, idx), module_site(c.second, args, idx)
        reason = b1 if isinstance(b1, str) else b2 if isinstance(b2, str) else None
        if reason is None and b1.module is b2.module:
            reason = "both linears are one module"
        if reason is None:
            reason = _between_ok(c, (b1, b2))
        if reason is None:
            reason = single_read([args[s.index] for x in (c.first, c.second)
                                  for s in (x.weight, x.bias) if s is not None], idx)
        if reason:
            why[k] = reason
        else:
            backed[k] = (b1, b2)
    # a chain whose input arrives in another chain's order: if that chain is not prepared (it
    # stays as it was, its output in natural order), the order its first weight absorbed is
    # undone (a row permutation of w_pivot); a producer whose consumer is not prepared
    # restores its own order
    unabsorb: dict[int, torch.Tensor] = {}
    for k, d in enumerate(decisions):
        if k in why or d.producer is None:
            continue
        p = by_chain.get(id(d.producer))
        if p is None:
            why[k] = "its first weight absorbed the column order of a chain this graph did not decide"
        elif p in why:      # the order exactly as the consumer's factors absorbed it
            unabsorb[k] = d.input_order
    consumers = {by_chain.get(id(d.producer)): k for k, d in enumerate(decisions) if d.producer is not None}
    for k, d in enumerate(decisions):
        site = _chain_site(d, backed, idx, args)
        if k in why:
            bad.append(NotPreparable(KIND, site, why[k], graph))
            continue
        b1, b2 = backed[k]
        restore = d.restore_order or consumers.get(k) is None or consumers[k] in why
        w = b2.module.weight
        mod = _pifa_module(d, restore, b2, w.requires_grad, unabsorb.get(k))
        ed = Edit(KIND, site, graph, list(d.records))
        ed.replace[b2.path] = mod
        w1 = b1.module.weight
        ed.replace[b1.path] = Absorbed(d.chain.first.d_in, d.chain.first.d_out, b2.path, b1.kind, device=w1.device,
                                       dtype=w1.dtype)
        ed.dropped = [t for b in (b1, b2) for t in (b.module.weight, b.module.bias) if t is not None]
        edits.append(ed)
    return edits, bad


def _chain_site(d: Any, backed: dict, idx: ModelIndex, args: Sequence[Any]) -> str:
    c = d.chain
    paths = [idx.owners(args[s.weight.index]) for s in (c.first, c.second)]
    names = [o[0][0] if o else s.weight.name for o, s in zip(paths, (c.first, c.second))]
    return site_name(names)


def shard_module(path: str, spec: dict, how: str, get: Callable, rank: int, world: int,
                 split_of: Callable[[str], str | None]) -> tuple[dict, dict]:
    """One rank's share of a prepared PIFA module (see :mod:`bdpass.shard`): a
    :class:`PivotLinear` by rank slices (``"row"``), an :class:`Absorbed` with its chain."""
    from ..shard import ShardError, split_range

    if spec["type"] == "Absorbed":      # no tensors but the marker
        into = spec["into"]
        if split_of(into) != "row" or how != "col":
            raise ShardError(f"bdpass.shard: {path} (first linear of the chain at {into}) splits with its chain: "
                             f"'col' here and 'row' at {into}")
        return {**spec, "out_features": spec["out_features"] // world}, {}
    if how != "row":
        raise ShardError(f"bdpass.shard: {path} (PivotLinear) can only be split by rank slices ('row', output "
                         "a partial sum): every output column needs every pivot")
    r, out = spec["rank"], spec["out_features"]
    j0, j1 = split_range(r, rank, world, f"{path} (rank)")
    rk = j1 - j0
    w_pivot = get("w_pivot")[:, j0:j1]
    coeff = get("coeff")[j0:j1, :]
    if spec["restore_order"]:
        pos_p, pos_r = get("pivots")[...], get("rest")[...]
    else:                                   # output in [pivots, rest] order, kept as it is
        pos_p, pos_r = torch.arange(r), torch.arange(r, out)
    others = torch.cat([pos_p[:j0], pos_p[j1:]])
    zeros = coeff.new_zeros(rk, r - rk)
    state = {"w_pivot": w_pivot, "coeff": torch.cat([zeros, coeff], dim=1),
             "pivots": pos_p[j0:j1].clone(), "rest": torch.cat([others, pos_r])}
    if spec["bias"]:
        b_rest = get("b_rest")[...]
        state["b_pivot"] = get("b_pivot")[j0:j1]
        state["b_rest"] = torch.cat([b_rest.new_zeros(r - rk), b_rest if rank == 0 else torch.zeros_like(b_rest)])
    return {**spec, "rank": rk, "restore_order": True}, state
