"""BD's module-level side: the edits of ``prepare`` and the shards of ``bdpass.shard``.

An edit per component: every partner's weights (query columns, output-projection rows,
biases) get ``B`` folded in, *in place* (same parameters, same shapes), whatever their
spelling (``nn.Linear``, ``F.linear`` on a raw parameter, ``x @ W.T``, einsum weights under
views): the fold is written back through the inverse of the views the graph applied to the
parameter. Every source projection module is replaced by a
:class:`~bdpass.prepare.modules.BDLinear` holding the tensors of its ``bd_linear`` call. All
values are the decision's own (the backend's math, float64), rounded once to the weight's
dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..prepare.edits import (Edit, ModelIndex, NotPreparable, as_stored, inverse_weight_view, module_site, owned_once,
                             single_read, site_name)
from ..prepare.modules import BDLinear


def module_edits(decisions: Sequence[Any], args: Sequence[Any], idx: ModelIndex,
                 graph: int) -> tuple[list[Edit], list[NotPreparable]]:
    """The edits of one graph instance's BD decisions (:class:`~bdpass.rewrites.bd_attention.BdDecision`),
    and those that have none."""
    edits, bad = [], []
    for d in decisions:
        e, b = _component_edit(d, args, idx, graph)
        if e is not None:
            edits.append(e)
        if b is not None:
            bad.append(b)
    return edits, bad


def _component_edit(d: Any, args: Sequence[Any], idx: ModelIndex, graph: int):
    comp, sites, sources = d.component, d.sites, d.sources
    kinds = "+".join(sorted({r.kind for r in d.records}))
    names = {lin: idx.name(args[sites[lin].weight.index], sites[lin].weight.name) for lin in comp.linears}
    paths = [n.rsplit(".", 1)[0] for n in names.values()]
    site = site_name(paths)
    backed: dict[int, Backed] = {}
    reason = None
    for lin in comp.linears:
        s = sites[lin]
        ts = [args[s.weight.index], None if s.bias is None else args[s.bias.index]]
        if lin in sources:
            b = module_site(s, args, idx)
            if isinstance(b, str):
                reason = f"source projection: {b}"
                break
            backed[lin] = b
        else:
            reason = owned_once(ts, idx, [s.weight.name, s.bias.name if s.bias else ""])
            if reason:
                reason = f"partner projection: {reason}"
                break
        reason = single_read(ts, idx)
        if reason:
            break
    if reason:
        return None, NotPreparable(kinds, site, reason, graph)
    flat = iter(d.tensors)
    ed = Edit(kinds, site, graph, list(d.records))
    for lin in comp.linears:
        s = sites[lin]
        w = args[s.weight.index]
        b = None if s.bias is None else args[s.bias.index]
        src = sources.get(lin)
        if src is None:
            wt, bt = next(flat), next(flat)          # (d_out, d_in) folded weight, folded bias
            ed.fold.append((names[lin], w, as_stored(inverse_weight_view(s, w, wt.t()), w)))
            if b is not None and not torch.equal(bt, b.detach().to("cpu", torch.float64)):
                ed.fold.append((idx.name(b, s.bias.name), b, as_stored(bt, b)))   # query biases (not output ones)
            continue
        T, block_table, block_col = d.statics[lin]
        sel = [next(flat) for _ in range(T)]
        rest = [next(flat) for _ in range(T)]
        blocks = [(next(flat), next(flat)) for _ in block_table]
        mod = BDLinear(s.d_in, s.d_out, [int(t.numel()) for t in sel],
                       [(t, c, bw.shape[1], bb is not None) for t, c, (bw, bb) in zip(block_table, block_col, blocks)],
                       device=w.device, dtype=w.dtype, requires_grad=w.requires_grad, replaces=backed[lin].kind)
        with torch.no_grad():
            for t in range(T):
                getattr(mod, f"sel_{t}").copy_(sel[t])
                getattr(mod, f"rest_{t}").copy_(rest[t])
            for i, (bw, bb) in enumerate(blocks):
                getattr(mod, f"weight_{i}").copy_(as_stored(bw, w))
                if bb is not None:
                    getattr(mod, f"bias_{i}").copy_(as_stored(bb, w))
        ed.replace[backed[lin].path] = mod
        ed.dropped += [t for t in (w, b) if t is not None]
    return ed, None


def shard_module(path: str, spec: dict, how: str, get: Callable, rank: int, world: int,
                 split_of: Callable[[str], str | None]) -> tuple[dict, dict]:
    """One rank's share of a :class:`BDLinear` split by heads (``"col"``; see :mod:`bdpass.shard`)."""
    from ..shard import ShardError, split_range

    if how != "col":
        raise ShardError(f"bdpass.shard: {path} (BDLinear) can only be split by heads ('col'): its identity "
                         "rows read input channels that a row split scatters over ranks")
    c0, c1 = split_range(spec["out_features"], rank, world, f"{path} (out_features)")
    tables = spec["tables"]
    new_tables: list[int] = []
    remap: dict[int, int] = {}
    blocks, state = [], {}
    for i, (t, col, n, hb) in enumerate(spec["blocks"]):
        a, b = max(c0, col), min(c1, col + n)
        if a >= b:
            continue
        g = tables[t]
        if g and ((a - col) % g or (b - col) % g):
            raise ShardError(f"bdpass.shard: {path}: columns {c0}:{c1} of rank {rank} cut a BD head of block {i} "
                             f"(columns {col}:{col + n}, heads of {g}); split by whole heads")
        if t not in remap:
            remap[t] = len(new_tables)
            new_tables.append(g)
            state[f"sel_{remap[t]}"] = get(f"sel_{t}")[...]
            state[f"rest_{remap[t]}"] = get(f"rest_{t}")[...]
        j = len(blocks)
        blocks.append([remap[t], a - c0, b - a, hb])
        state[f"weight_{j}"] = get(f"weight_{i}")[:, a - col:b - col]
        if hb:
            state[f"bias_{j}"] = get(f"bias_{i}")[a - col:b - col]
    return {**spec, "out_features": c1 - c0, "tables": new_tables, "blocks": blocks}, state
