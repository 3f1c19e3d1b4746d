"""BD on attention head pairs: the rewrite of the components planned by
:mod:`bdpass.rewrites.bd_plan`.

A *source* is a projection that owns BD heads (K or V channels). Each source is rewritten
as one ``bdpass::bd_linear`` call (see :mod:`inductor_lowerings.bd_linear`): per head,
``x[..., S_t] + x[..., R_t] @ W'_h`` written straight into the head's output columns, and
the projection's other columns (e.g. the queries of a fused QKV projection, with their
folded weights) as dense blocks in place; everything downstream of the projection is
untouched. Partner projections (queries, output projections) only get folded weights.

The parts, one module each:

* :mod:`bdpass.rewrites.bd_sources`: sources, their head sets and forms (``per_head``,
  ``groups``, ``shared``);
* :mod:`bdpass.rewrites.bd_factors`: BD factors of a source in a form, and every derived
  tensor of a component (:class:`_ComponentMath`);
* :mod:`bdpass.rewrites.bd_blocks`: the pivot tables and blocks of a source's
  ``bd_linear`` call (:class:`BlockLayout`);
* :mod:`bdpass.rewrites.bd_decide`: the form of each source (error budget, cost model),
  or the reason not to rewrite.

Everything derived for one connected set of projections is recomputed together from their
current weights when any of them changes (see ``bdpass.runtime``).

The names of those modules that other modules import from here stay importable here.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from ..graph.linears import LinearSite
from ..graph.ops import dtype_of
from ..identities import FactorizationError
from ..report import RewriteRecord, SkipRecord
from .bd_blocks import BlockLayout, _rest, op_statics, source_layout, source_tensors  # noqa: F401
from .bd_decide import _estimate_source, _one_per_site, _time_source, decide, skips_for  # noqa: F401
from .bd_factors import (SetFactors, _ComponentMath, _shared_rows, _stack, _synthetic,  # noqa: F401
                         _table_rows, form_factors)
from .bd_plan import Component, Group
from .bd_sources import FORMS, N_GROUPS, HeadSet, Source, _normalized, _sources  # noqa: F401
from .decisions import BdDecision

from .editor import GraphEditor


# ---------------------------------------------------------------------------- rewrite
def apply_component(editor: GraphEditor, comp: Component, sites: Sequence[LinearSite],
                    first_index: int, error_budget: float,
                    cost_model: bool = True) -> tuple[list[RewriteRecord], list[SkipRecord]]:
    import inductor_lowerings  # noqa: F401  (registers the ops)

    norm, why = _normalized(comp)
    if norm is None:
        return [], skips_for(comp.groups, why)
    comp = norm
    sources = _sources(comp)
    skips: list[SkipRecord] = []
    dtypes = {sites[lin].weight.tensor.dtype for lin in comp.linears}
    devices = {sites[lin].weight.tensor.device for lin in comp.linears}
    if len(dtypes) != 1 or len(devices) != 1:
        why = "the component's weights differ in dtype or device"
        return [], skips + skips_for(comp.groups, why)
    fac, details, why = decide(comp, sites, sources, editor.example_inputs, error_budget, cost_model)
    if fac is None:
        return [], skips + skips_for(comp.groups, why)
    math_ = _ComponentMath(comp, sites, sources, error_budget)
    try:
        initial = math_.tensors(editor.example_inputs, fac)
    except FactorizationError as e:
        return [], skips + skips_for(comp.groups, str(e))
    src_of = sorted({i for lin in comp.linears for i in
                     ([sites[lin].weight.index] + ([sites[lin].bias.index] if sites[lin].bias else []))})
    editor.current_rewrite = first_index
    nodes = editor.add_derived(f"bd{first_index}", src_of, lambda a: math_.tensors(a), initial,
                               dtype=dtypes.pop(), device=devices.pop())
    it = iter(nodes)
    linear = torch._C._nn.linear
    for lin in comp.linears:
        site = sites[lin]
        src = sources.get(lin)
        target = editor.new(site.output)
        x = editor.new(site.input)
        with editor.graph.inserting_before(target):
            for name, a in site.prologue:         # e.g. an einsum over several dims
                x = editor.call(name, (x, *a), method=True, origin=site.output)
            if src is None:
                w, b = next(it), next(it)
                y = editor.call(linear, (x, w, b), origin=site.output)
            else:
                T, block_table, block_col = op_statics(site, src)
                sel = [next(it) for _ in range(T)]
                rest = [next(it) for _ in range(T)]
                weight, bias = [], []
                for _ in block_table:
                    weight.append(next(it))
                    bias.append(next(it))
                y = editor.call(torch.ops.bdpass.bd_linear.default,
                                (x, sel, rest, weight, bias, block_table, block_col, site.d_out),
                                origin=site.output)
            if dtype_of(site.output) is not None and dtype_of(site.output) != site.weight.tensor.dtype:
                y = editor.call("to", (y, dtype_of(site.output)), method=True, origin=site.output)
            for name, a in site.epilogue:
                y = editor.call(name, (y, *a), method=True, origin=site.output)
        editor.replace(site.output, y)
        editor.discard([site.output, site.core], first_index)
    editor.current_rewrite = None
    records = _records(comp, sites, sources, fac, details)
    editor.decisions.append(BdDecision(comp, sites, sources, fac, records, error_budget))
    return records, skips


def _records(comp: Component, sites: Sequence[LinearSite], sources: dict[int, Source], fac,
             details: dict[int, dict]) -> list[RewriteRecord]:
    cond_of: dict[int, float] = {}
    growth_of: dict[int, float] = {}
    for s, sets in fac.items():
        for st, sf in zip(sources[s].sets, sets):
            for h, g in enumerate(st.heads):
                cond_of[g.gid] = float(sf.f.conds[h])
                growth_of[g.gid] = float(sf.f.expected[h])
    by_key: dict[tuple, list[Group]] = defaultdict(list)
    for g in comp.groups:
        by_key[(g.kind, g.site, g.source)].append(g)
    recs = []
    for (kind, site, src), gs in by_key.items():
        d_in = sites[src].d_in
        d_h = sorted({len(g.cols) for g in gs})
        before = sum(d_in * len(g.cols) for g in gs)
        after = sum((d_in - len(g.cols)) * len(g.cols) for g in gs)
        cond = max(cond_of[g.gid] for g in gs)
        growth = max(growth_of[g.gid] for g in gs)
        partners = sorted({sites[i].weight.name for g in gs for i, _ in (g.q_partners | g.o_partners)})
        d = details.get(src, {})
        recs.append(RewriteRecord(
            kind=kind, site=site, params_before=before, params_after=after,
            flops_saved=2 * sum(len(g.cols) ** 2 for g in gs), cond=cond, error_bound=cond,
            expected_growth=growth,
            details={"heads": len(gs), "d_in": d_in, "d_h": d_h[0] if len(d_h) == 1 else d_h,
                     "projection": sites[src].weight.name, "folded_into": partners,
                     "form": d.get("form", sources[src].form), "shared_basis": d.get("form") == "shared",
                     "nodes": sorted({n for g in gs for n in (getattr(g, "nodes", ()) or ())}),
                     **{k: v for k, v in d.items() if k in ("ms", "estimated_ms")}}))
    return recs

