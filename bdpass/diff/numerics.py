"""Numerics of one aligned graph: the float64 and model-dtype runs of the original and the
rewritten graph, the error of every node (:func:`stats`), the values a BD span carries in
another basis, the divergence rule and the FLOPs of each run (see "Numerics", "BD spans"
and "Divergence rule" in :mod:`bdpass.diff.core`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.fx

from ..graph.exact import LocalInterpreter
from .model import GraphDiff, Row, Stats

BASIS_DEV = 0.1   # dev64 above which a value in a BD span counts as in a changed basis


class _Recorder(LocalInterpreter):
    """Runs a graph node by node, handing every value to ``on_value``. Collectives give their
    local stand-ins (nothing is sent to other ranks; a graph that computes on DTensors
    raises, and the diff goes on without numerics)."""

    def __init__(self, gm: torch.fx.GraphModule, on_value: Callable[[torch.fx.Node, Any], None],
                 to64: bool = False):
        super().__init__(gm)
        self.on_value = on_value
        self.to64 = to64
        self._mod64: dict[str, torch.nn.Module] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        val = super().run_node(n)
        self.on_value(n, val)
        return val

    def get_attr(self, target, args, kwargs):
        val = super().get_attr(target, args, kwargs)
        if self.to64 and isinstance(val, torch.Tensor) and val.is_floating_point():
            val = val.double()
        return val

    def call_module(self, target, args, kwargs):
        if not self.to64:
            return super().call_module(target, args, kwargs)
        if target not in self._mod64:
            import copy
            self._mod64[target] = copy.deepcopy(self.fetch_attr(target)).double()
        return self._mod64[target](*args, **kwargs)


def _prep(inputs: Sequence[Any], to64: bool) -> list[Any]:
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            if to64 and t.is_floating_point():
                t = t.detach().double()
            elif not isinstance(t, torch.nn.Parameter):
                t = t.detach().clone()   # graphs may write into their inputs
        out.append(t)
    return out


def stats(val: Any, ref: Any) -> Stats | None:
    """Error of ``val`` against ``ref`` (float64); None when not comparable."""
    if not (isinstance(val, torch.Tensor) and isinstance(ref, torch.Tensor)):
        return None
    if not (val.is_floating_point() and ref.is_floating_point()) or tuple(val.shape) != tuple(ref.shape):
        return None
    a = val.detach().double()
    r = ref.detach().double()
    if a.numel() == 0:
        return Stats(0.0, 0.0, math.inf)
    fin_a, fin_r = torch.isfinite(a), torch.isfinite(r)
    bad = (fin_a != fin_r) | (~fin_a & ~fin_r & ~((a == r) | (torch.isnan(a) & torch.isnan(r))))
    if bool(bad.any()):
        return Stats(math.inf, math.inf, -math.inf)
    both = fin_a & fin_r
    d = torch.where(both, a - r, torch.zeros((), dtype=a.dtype))
    rz = torch.where(both, r, torch.zeros((), dtype=r.dtype))
    nd = float(torch.linalg.vector_norm(d))
    nr = float(torch.linalg.vector_norm(rz))
    max_abs = float(d.abs().max())
    if nd == 0.0:
        return Stats(max_abs, 0.0, math.inf)
    rel = nd / nr if nr > 0 else math.inf
    sqnr = 20.0 * math.log10(nr / nd) if nr > 0 else -math.inf
    return Stats(max_abs, rel, sqnr)


def measure_graph(gd: GraphDiff, floor: float | None) -> None:
    """Run the graphs of ``gd`` (see "Numerics" in :mod:`bdpass.diff.core`) and fill the
    errors, ``dev64``, ``basis_changed`` and ``diverged`` of its rows, its first divergence
    and the FLOPs of each run."""
    from torch.utils.flop_counter import FlopCounterMode

    orig_gm, new_gm, inputs, new_inputs = gd.report.graphs_kept
    ref: dict[str, torch.Tensor] = {}       # original graph, float64
    ref_new: dict[str, torch.Tensor] = {}   # rewritten graph, float64 (stored factors)

    def keeper(store):
        def keep(n, v):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                store[n.name] = v.detach()
        return keep

    rewritten = new_gm is not None and gd.rewritten
    with torch.no_grad():
        _Recorder(orig_gm, keeper(ref), to64=True).run(*_prep(inputs, True))

        orig_stats: dict[str, Stats | None] = {}

        def cmp_orig(n, v):
            orig_stats[n.name] = stats(v, ref.get(n.name))

        fc = FlopCounterMode(display=False)
        with fc:
            _Recorder(orig_gm, cmp_orig).run(*_prep(inputs, False))
        gd.flops_before = int(fc.get_total_flops())

        vs_orig: dict[str, Stats | None] = {}    # rewritten, model dtype, vs original float64
        vs_self: dict[str, Stats | None] = {}    # rewritten, model dtype, vs rewritten float64
        if rewritten:
            _Recorder(new_gm, keeper(ref_new), to64=True).run(*_prep(new_inputs, True))
            ref_of = {r.after.name: r.ref for r in gd.rows if r.after is not None and r.ref}

            def cmp_new(n, v):
                rn = ref_of.get(n.name)
                if rn is not None:
                    vs_orig[n.name] = stats(v, ref.get(rn))
                vs_self[n.name] = stats(v, ref_new.get(n.name))

            fc = FlopCounterMode(display=False)
            with fc:
                _Recorder(new_gm, cmp_new).run(*_prep(new_inputs, False))
            gd.flops_after = int(fc.get_total_flops())
        else:
            vs_orig = dict(orig_stats)
            gd.flops_after = gd.flops_before

    changed: set[str] = set()
    if rewritten:
        for row in gd.rows:
            if row.after is not None and row.ref is not None and row.after.op != "placeholder":
                d = stats(ref_new.get(row.after.name), ref.get(row.ref))
                row.dev64 = d.rel_l2 if d is not None else None
        changed = _basis_changed(gd, new_gm)

    for k, row in enumerate(gd.rows):
        if row.before is not None and row.before.op == "placeholder":
            continue   # inputs: nothing computed (a cast input matches its float64 copy exactly)
        if row.before is not None:
            row.orig = orig_stats.get(row.before.name)
        a = row.after
        if a is not None:
            if a.name in changed:
                row.basis_changed = True
                row.new, row.ref_kind = vs_self.get(a.name), "new64"
            elif row.ref is not None:
                row.new, row.ref_kind = vs_orig.get(a.name), "orig64"
            elif row.role == "internal":
                row.new, row.ref_kind = vs_self.get(a.name), "new64"
            if row.new is None:
                row.ref_kind = None
        if row.shape is None and a is not None:
            v = ref_new.get(a.name) if rewritten else ref.get(a.name)
            if v is not None:
                row.shape = list(v.shape)
        row.diverged = _diverged(row, floor)
        if row.diverged and gd.first_divergence is None:
            gd.first_divergence = k


def _basis_changed(gd: GraphDiff, new_gm: torch.fx.GraphModule) -> set[str]:
    """Nodes of the rewritten graph that legitimately carry values in another basis.

    A BD rewrite replaces a q/k/v projection by one whose output is the original one in a
    different per-head basis; the original values come back where the basis cancels (the
    attention scores, the output projection). Such values are compared with the float64
    run of the rewritten graph instead of the original one. A node is in a changed basis
    when it deviates from the original in exact arithmetic (``dev64 > BASIS_DEV``) and
    either it replaces a projection in a BD region whose own inputs are not in a changed
    basis (the start of the span), or it is an untouched node fed by a node in a changed
    basis. Values the graph returns and replacements fed from a changed basis (the output
    projection: where the basis must cancel) never are."""
    rows_by_after = {r.after.name: r for r in gd.rows if r.after is not None}
    bd_regions = {k for k, reg in enumerate(gd.regions) if any(x.startswith("bd") for x in reg.kinds)}
    region_new = {r.after.name: r.region for r in gd.rows
                  if r.after is not None and r.status != "same" and r.region is not None}
    changed: set[str] = set()

    def external_inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        out, stack, seen = [], list(node.all_input_nodes), set()
        while stack:
            x = stack.pop()
            if x.name in seen:
                continue
            seen.add(x.name)
            if x.name in region_new and region_new[x.name] == region_new.get(node.name):
                stack.extend(x.all_input_nodes)
            else:
                out.append(x)
        return out

    for n in new_gm.graph.nodes:
        row = rows_by_after.get(n.name)
        if row is None or row.returned or n.op == "output":
            continue
        if row.status == "replaced" and row.region in bd_regions:
            if row.dev64 is not None and row.dev64 > BASIS_DEV \
                    and not any(x.name in changed for x in external_inputs(n)):
                changed.add(n.name)
        elif row.status == "same" and any(x.name in changed for x in n.all_input_nodes):
            # non-tensor values (e.g. the tuple of a split) pass the basis on
            if row.dev64 is None or row.dev64 > BASIS_DEV:
                changed.add(n.name)
    return changed


def _diverged(row: Row, floor: float | None) -> bool:
    if row.orig is None or row.new is None or row.status not in ("same", "replaced"):
        return False
    o, n = row.orig.rel_l2, row.new.rel_l2
    if not math.isfinite(n):
        return math.isfinite(o)
    if not math.isfinite(o):
        return False
    return n > max(2.0 * o, floor or 0.0)
