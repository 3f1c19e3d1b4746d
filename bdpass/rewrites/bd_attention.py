"""BD on attention head pairs: the rule (:class:`BdRule`), its decisions and its graph
rewrite of the components planned by :mod:`bdpass.rewrites.bd_plan`.

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
  or the reason not to rewrite;
* :mod:`bdpass.rewrites.bd_modules`: the module edits of ``prepare`` and the shards of
  ``bdpass.shard``.

Everything derived for one connected set of projections is recomputed together from their
current weights when any of them changes (see ``bdpass.runtime``).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from typing import ClassVar, Sequence

import torch

from ..graph.linears import LinearSite
from ..graph.ops import dtype_of
from ..identities import FactorizationError
from ..prepare.modules import BDLinear
from ..report import RewriteRecord, SkipRecord
from ..rules import Decision, PlanContext, Rule
from .bd_blocks import op_statics
from .bd_decide import decide, skips_for
from .bd_factors import _ComponentMath
from .bd_plan import Component, Group
from .bd_sources import Source, _normalized, _sources
from .editor import GraphEditor


# ---------------------------------------------------------------------------- the rule
@dataclass
class BdDecision(Decision):
    """A connected set of projections rewritten by BD: sources (K/V projections, one
    ``bd_linear`` each, in a chosen form) and partners (Q columns, O rows folded).
    ``tensors`` are, per linear of the component in order, a partner's folded weight and
    bias, or a source's pivot tables (selected and rest rows) and its blocks' weights and
    biases; ``statics[lin]`` the source's ``bd_linear`` statics (tables, block tables,
    block columns)."""
    rule: ClassVar[str] = "bd"
    tensor_fields: ClassVar[tuple[str, ...]] = ("factors",)
    component: Component | None = None      # heads in ascending channel order
    sites: Sequence[LinearSite] = ()        # the linear sites the component's indices refer to
    sources: dict = dataclasses.field(default_factory=dict)    # linear index -> Source (with its form)
    factors: dict = dataclasses.field(default_factory=dict)    # linear index -> [SetFactors] at the example weights
    statics: dict = dataclasses.field(default_factory=dict)    # linear index -> (T, block_table, block_col)
    details: dict = dataclasses.field(default_factory=dict)    # linear index -> how its form was chosen

    @property
    def weights(self) -> list[str]:
        return [p.name for i in self.component.linears for p in (self.sites[i].weight, self.sites[i].bias)
                if p is not None]


def decide_component(comp: Component, sites: Sequence[LinearSite], args, error_budget: float,
                     cost_model: bool = True) -> tuple[BdDecision | None, list[SkipRecord]]:
    """The decision for one planned component (form per source, factors, records), or the
    skip records that say why not."""
    norm, why = _normalized(comp)
    if norm is None:
        return None, skips_for(comp.groups, why)
    comp = norm
    sources = _sources(comp)
    dtypes = {sites[lin].weight.tensor.dtype for lin in comp.linears}
    devices = {sites[lin].weight.tensor.device for lin in comp.linears}
    if len(dtypes) != 1 or len(devices) != 1:
        return None, skips_for(comp.groups, "the component's weights differ in dtype or device")
    fac, details, why = decide(comp, sites, sources, args, error_budget, cost_model)
    if fac is None:
        return None, skips_for(comp.groups, why)
    math_ = _ComponentMath(comp, sites, sources, error_budget)
    try:
        initial = math_.tensors(args, fac)
    except FactorizationError as e:
        return None, skips_for(comp.groups, str(e))
    src_of = tuple(sorted({i for lin in comp.linears for i in
                           ([sites[lin].weight.index] + ([sites[lin].bias.index] if sites[lin].bias else []))}))
    return BdDecision(records=_records(comp, sites, sources, fac, details),
                      nodes=frozenset(sites[lin].core.name for lin in comp.linears),
                      tensors=initial, recompute=math_.tensors, derived_from=src_of, dtype=dtypes.pop(),
                      device=devices.pop(), error_budget=error_budget, component=comp, sites=sites,
                      sources=sources, factors=fac, details=details,
                      statics={lin: op_statics(sites[lin], src) for lin, src in sources.items()}), []


class BdRule(Rule):
    """BD on attention head pairs: ``bd_qk`` (keys against queries) and ``bd_vo`` (values
    against output projections), planned together by :mod:`bdpass.rewrites.bd_plan`."""
    name = "bd"
    kinds = ("bd_qk", "bd_vo")
    modules = (BDLinear,)

    def plan(self, ctx: PlanContext) -> list[BdDecision]:
        from ..graph.layout import analyze
        from . import bd_plan

        opts = ctx.opts
        sites = ctx.free_linears()
        layout = analyze(ctx.gm, sites, ctx.example_inputs)
        comps, skips = bd_plan.plan(layout, sites, opts.bd_qk, opts.bd_vo, min_saving=opts.min_saving,
                                    reshaped_sites=True)
        ctx.report.skipped.extend(skips)
        out = []
        for comp in comps:
            why = ctx.refusal([sites[i] for i in comp.linears])
            if why:
                ctx.report.skipped.extend(skips_for(comp.groups, why))
                continue
            budget = opts.budget_for(sites[comp.linears[0]].weight.tensor.dtype)
            d, skips = decide_component(comp, sites, ctx.example_inputs, budget, opts.cost_model)
            ctx.report.skipped.extend(skips)
            if d is not None:
                out.append(d)
                ctx.claimed.update(sites[i].core for i in comp.linears)
        return out

    def rewrite(self, editor: GraphEditor, d: BdDecision, index: int) -> None:
        import inductor_lowerings  # noqa: F401  (registers the ops)

        editor.current_rewrite = index
        nodes = editor.add_derived(f"bd{index}", d.derived_from, d.recompute, d.tensors, dtype=d.dtype, device=d.device)
        it = iter(nodes)
        linear = torch._C._nn.linear
        for lin in d.component.linears:
            site = d.sites[lin]
            target = editor.new(site.output)
            x = editor.new(site.input)
            with editor.graph.inserting_before(target):
                for name, a in site.prologue:         # e.g. an einsum over several dims
                    x = editor.call(name, (x, *a), method=True, origin=site.output)
                if lin not in d.statics:
                    w, b = next(it), next(it)
                    y = editor.call(linear, (x, w, b), origin=site.output)
                else:
                    T, block_table, block_col = d.statics[lin]
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
            editor.discard([site.output, site.core], index)
        editor.current_rewrite = None

    def refit(self, d: BdDecision, args) -> BdDecision:
        math_ = _ComponentMath(d.component, d.sites, d.sources, d.error_budget)
        fac = math_.factors(args)
        return dataclasses.replace(d, records=_records(d.component, d.sites, d.sources, fac, d.details),
                                   factors=fac, tensors=math_.tensors(args, fac), recompute=math_.tensors)

    def module_edits(self, decisions, args, idx, graph):
        from .bd_modules import module_edits

        return module_edits(decisions, args, idx, graph)

    def shard_module(self, path, spec, how, get, rank, world, split_of):
        from .bd_modules import shard_module

        return shard_module(path, spec, how, get, rank, world, split_of)


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

