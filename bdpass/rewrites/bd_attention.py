"""BD on attention head pairs: factors and rewrite of the components planned by
:mod:`bdpass.rewrites.bd_plan`.

Each projection that owns groups is rewritten as ``x[..., S_h] + x[..., R_h] @ W'_h`` per
head (identity rows cost nothing), its other columns computed densely with folded weights,
and the columns put back in their original order so that everything downstream of the
projection is untouched. Partner projections only get folded weights.

Everything derived for one connected set of projections is recomputed together from their
current weights when any of them changes (see ``bdpass.runtime``).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .. import cost
from ..graph.linears import LinearSite
from ..graph.ops import dtype_of
from ..identities import FactorizationError, bd_factors
from ..report import RewriteRecord, SkipRecord
from .bd_plan import Component, Group
from .editor import GraphEditor


# ---------------------------------------------------------------------------- factors
class _ComponentMath:
    """All derived tensors of one component, computed from the graph's arguments."""

    def __init__(self, comp: Component, sites: Sequence[LinearSite], error_budget: float):
        self.comp = comp
        self.sites = sites
        self.budget = error_budget
        self.bd_by_source: dict[int, list[Group]] = defaultdict(list)
        for g in comp.groups:
            self.bd_by_source[g.source].append(g)
        for gs in self.bd_by_source.values():
            gs.sort(key=lambda g: g.cols[0])

    def factors(self, args):
        """{source: [(groups, BdFactors)]} computed in float64 from current weights."""
        out = {}
        for s, gs in self.bd_by_source.items():
            site = self.sites[s]
            W = site.weight_matrix(args).detach().to("cpu", torch.float64)
            b = site.bias_vector(args)
            b = None if b is None else b.detach().to("cpu", torch.float64)
            by_g: dict[int, list[Group]] = defaultdict(list)
            for g in gs:
                by_g[len(g.cols)].append(g)
            res = []
            for gsz, members in sorted(by_g.items()):
                Wh = torch.stack([W[:, list(g.cols)] for g in members])
                bh = None if b is None else torch.stack([b[list(g.cols)] for g in members])
                f = bd_factors(Wh, bh, dtype=torch.float64, error_budget=self.budget)
                res.append((members, f))
            out[s] = res
        return out

    def tensors(self, args, fac=None) -> list[torch.Tensor | None]:
        """The derived inputs of the rewritten graph, exact (float64 values, int64 indices)."""
        fac = fac if fac is not None else self.factors(args)
        basis = {}
        for s, lst in fac.items():
            for members, f in lst:
                for h, g in enumerate(members):
                    basis[g.gid] = f.basis64[h]
        out: list[torch.Tensor | None] = []
        for lin in self.comp.linears:
            site = self.sites[lin]
            W = site.weight_matrix(args).detach().to("cpu", torch.float64).clone()
            b = site.bias_vector(args)
            b = None if b is None else b.detach().to("cpu", torch.float64).clone()
            if not bool(torch.isfinite(W).all()) or (b is not None and not bool(torch.isfinite(b).all())):
                # a NaN folded with B would spread over the whole head
                raise FactorizationError(f"non-finite weights in {site.weight.name}")
            W0, b0 = W.clone(), (None if b is None else b.clone())
            for g in self.comp.groups:
                B = basis[g.gid]
                for (qs, qcols) in g.q_partners:
                    if qs == lin:
                        W[:, list(qcols)] = W0[:, list(qcols)] @ B.T
                        if b is not None:
                            b[list(qcols)] = b0[list(qcols)] @ B.T
                for (os_, rows) in g.o_partners:
                    if os_ == lin:
                        W[list(rows), :] = B @ W0[list(rows), :]
            bd_cols = [c for g in self.bd_by_source.get(lin, []) for c in g.cols]
            dense = sorted(set(range(site.d_out)) - set(bd_cols))
            out.append(W[:, dense].t() if dense else None)
            out.append(b[dense] if (b is not None and dense) else None)
            for members, f in fac.get(lin, []):
                out.append(f.rows.reshape(-1))
                out.append(f.rest_rows.reshape(-1))
                out.append(f.w_rest)
                out.append(None if f.bias is None else f.bias.reshape(-1))
            if lin in self.bd_by_source:
                order = dense + [c for members, _ in fac[lin] for g in members for c in g.cols]
                inv = torch.empty(site.d_out, dtype=torch.long)
                inv[torch.tensor(order, dtype=torch.long)] = torch.arange(site.d_out)
                out.append(inv)
        return out


def estimate(comp: Component, sites: Sequence[LinearSite]) -> str | None:
    """The cost model's objection to rewriting this component, or None."""
    by_src: dict[int, list[Group]] = defaultdict(list)
    for g in comp.groups:
        by_src[g.source].append(g)
    for s, gs in by_src.items():
        site = sites[s]
        gsz = len(gs[0].cols)
        bd_cols = sum(len(g.cols) for g in gs)
        dtype = dtype_of(site.output) or site.weight.tensor.dtype
        dev = site.weight.tensor.device
        est = cost.bd_projection(site.tokens, site.d_in, site.d_out - bd_cols, len(gs), gsz, dtype, dev)
        if not est.pays:
            return est.reason(f"the BD projection of {site.weight.name}", cost.device_model(dev), site.tokens)
    return None


def apply_component(editor: GraphEditor, comp: Component, sites: Sequence[LinearSite],
                    first_index: int, error_budget: float,
                    cost_model: bool = True) -> tuple[list[RewriteRecord], list[SkipRecord]]:
    if cost_model:
        why = estimate(comp, sites)
        if why is not None:
            return [], [SkipRecord(g.kind, g.site, why) for g in _one_per_site(comp.groups)]
    math_ = _ComponentMath(comp, sites, error_budget)
    try:
        fac = math_.factors(editor.example_inputs)
    except FactorizationError as e:
        return [], [SkipRecord(g.kind, g.site, str(e)) for g in _one_per_site(comp.groups)]
    try:
        initial = math_.tensors(editor.example_inputs, fac)
    except FactorizationError as e:
        return [], [SkipRecord(g.kind, g.site, str(e)) for g in _one_per_site(comp.groups)]
    sources = sorted({i for lin in comp.linears for i in
                      ([sites[lin].weight.index] + ([sites[lin].bias.index] if sites[lin].bias else []))})
    editor.current_rewrite = first_index
    dtypes = {sites[lin].weight.tensor.dtype for lin in comp.linears}
    devices = {sites[lin].weight.tensor.device for lin in comp.linears}
    if len(dtypes) != 1 or len(devices) != 1:
        why = "the component's weights differ in dtype or device"
        return [], [SkipRecord(g.kind, g.site, why) for g in _one_per_site(comp.groups)]
    nodes = editor.add_derived(f"bd{first_index}", sources, lambda a: math_.tensors(a), initial,
                               dtype=dtypes.pop(), device=devices.pop())
    it = iter(nodes)
    linear = torch._C._nn.linear
    for lin in comp.linears:
        site = sites[lin]
        w_d, b_d = next(it), next(it)
        target = editor.new(site.output)
        x = editor.new(site.input)
        with editor.graph.inserting_before(target):
            parts = []
            if w_d is not None:
                parts.append(editor.call(linear, (x, w_d, b_d), origin=site.output))
            for members, f in fac.get(lin, []):
                rows, rest, w_rest, bias = next(it), next(it), next(it), next(it)
                H, g = f.rows.shape
                xs = editor.call(torch.index_select, (x, -1, rows), origin=site.output)
                xr = editor.call(torch.index_select, (x, -1, rest), origin=site.output)
                xr = editor.call(torch.unflatten, (xr, -1, (H, site.d_in - g)), origin=site.output)
                yh = editor.call(torch.einsum, ("...hr,hrg->...hg", xr, w_rest), origin=site.output)
                y = editor.call(torch.flatten, (yh, -2), origin=site.output)
                y = editor.call(torch.add, (y, xs), origin=site.output)
                if bias is not None:
                    y = editor.call(torch.add, (y, bias), origin=site.output)
                parts.append(y)
            if lin in math_.bd_by_source:
                inv = next(it)
                y = parts[0] if len(parts) == 1 else editor.call(torch.cat, (parts, -1), origin=site.output)
                y = editor.call(torch.index_select, (y, -1, inv), origin=site.output)
            else:
                y = parts[0]
            if dtype_of(site.output) is not None and dtype_of(site.output) != site.weight.tensor.dtype:
                y = editor.call("to", (y, dtype_of(site.output)), method=True, origin=site.output)
        editor.replace(site.output, y)
        editor.discard([site.output, site.core], first_index)
    editor.current_rewrite = None
    return _records(comp, sites, fac), []


def _one_per_site(groups: list[Group]) -> list[Group]:
    seen, out = set(), []
    for g in groups:
        if (g.kind, g.site) not in seen:
            seen.add((g.kind, g.site))
            out.append(g)
    return out


def _records(comp: Component, sites: Sequence[LinearSite], fac) -> list[RewriteRecord]:
    cond_of: dict[int, float] = {}
    shared_of: dict[int, bool] = {}
    for s, lst in fac.items():
        for members, f in lst:
            for h, g in enumerate(members):
                cond_of[g.gid] = float(f.conds[h])
                shared_of[g.gid] = bool(f.shared)
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
        partners = sorted({sites[i].weight.name for g in gs for i, _ in (g.q_partners | g.o_partners)})
        recs.append(RewriteRecord(
            kind=kind, site=site, params_before=before, params_after=after,
            flops_saved=2 * sum(len(g.cols) ** 2 for g in gs), cond=cond, error_bound=cond,
            details={"heads": len(gs), "d_in": d_in, "d_h": d_h[0] if len(d_h) == 1 else d_h,
                     "projection": sites[src].weight.name, "folded_into": partners,
                     "shared_basis": all(shared_of[g.gid] for g in gs)}))
    return recs
