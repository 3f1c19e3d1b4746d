"""BD on attention head pairs, planned from the channel-layout analysis.

A *group* is one head's channel set of a projection that BD rewrites:

* ``bd_qk``: the k channels one head contributes to a score contraction (only the
  positions where both q and k channels are untouched linear columns: the un-rotated part
  of partial-RoPE and MLA heads qualifies). Its basis ``B`` folds into the columns of every
  q head that meets it (all heads of a GQA group).
* ``bd_vo``: the v channels of one value head. Its basis folds into the rows of the output
  projection that read that head's attention output (every copy, for GQA).

Each projection that owns groups is rewritten as ``x[..., S_h] + x[..., R_h] @ W'_h`` per
head (identity rows cost nothing), its other columns computed densely with folded weights,
and the columns put back in their original order so that everything downstream of the
projection is untouched. Partner projections only get folded weights.

Everything derived for one connected set of projections is recomputed together from their
current weights when any of them changes (see ``bdpass.runtime``).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.fx

from .. import cost
from .._compat import module_path_of
from ..graph.layout import LayoutResult, decode
from ..graph.linears import LinearSite
from ..graph.params import weight_problem
from ..graph.ops import dtype_of
from ..identities import FactorizationError, bd_factors
from ..report import RewriteRecord, SkipRecord
from .editor import GraphEditor


@dataclass
class Group:
    gid: int
    kind: str                      # "bd_qk" | "bd_vo"
    source: int                    # linear index
    cols: tuple[int, ...]          # ordered channel columns of the head
    q_partners: set = field(default_factory=set)      # {(linear, cols)}
    o_partners: set = field(default_factory=set)      # {(linear, rows)}
    site: str = ""


def _common_path(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for toks in zip(*parts):
        if all(t == toks[0] for t in toks):
            out.append(toks[0])
        else:
            break
    return ".".join(out)


class _Planner:
    def __init__(self, res: LayoutResult, sites: Sequence[LinearSite], bd_qk: bool, bd_vo: bool):
        self.res = res
        self.sites = list(sites)
        self.bd_qk, self.bd_vo = bd_qk, bd_vo
        self.groups: dict[tuple, Group] = {}
        self.skips: dict[tuple, SkipRecord] = {}

    def skip(self, kind: str, site: str, reason: str) -> None:
        self.skips.setdefault((kind, site, reason), SkipRecord(kind, site, reason))

    def site_name(self, *linear_ids: int) -> str:
        return _common_path([self.sites[i].module_path for i in linear_ids]) or \
            " / ".join(self.sites[i].weight.name for i in linear_ids)

    def reason_of_codes(self, codes: np.ndarray) -> str:
        touched = codes[codes <= -2]
        if touched.size:
            return self.res.reason_of(int(touched[0]))
        return "channels not produced by a linear projection"

    # ------------------------------------------------------------------ QK
    def collect_qk(self) -> None:
        for ev in self.res.qk:
            for qrow, krow in zip(ev.q_rows, ev.k_rows):
                q_src = {decode(c)[0] for c in qrow if c >= 0}
                k_src = {decode(c)[0] for c in krow if c >= 0}
                site = module_path_of(ev.node) or (self.site_name(*(sorted(q_src | k_src)))
                                                    if (q_src or k_src) else ev.node.name)
                ok = (qrow >= 0) & (krow >= 0)
                if not ok.any():
                    reason = self.reason_of_codes(np.concatenate([krow, qrow]))
                    self.skip("bd_qk", site, reason if "RoPE" not in reason else "RoPE on q/k channels")
                    continue
                if not self.bd_qk:
                    continue
                qc, kc = qrow[ok], krow[ok]
                qs, ks = {decode(c)[0] for c in qc}, {decode(c)[0] for c in kc}
                if len(qs) != 1 or len(ks) != 1:
                    self.skip("bd_qk", site, "a head's channels come from several projections")
                    continue
                qsrc, ksrc = qs.pop(), ks.pop()
                key = ("bd_qk", ksrc, tuple(decode(c)[1] for c in kc))
                g = self.groups.get(key)
                if g is None:
                    g = self.groups[key] = Group(len(self.groups), "bd_qk", ksrc, key[2], site=site)
                g.q_partners.add((qsrc, tuple(decode(c)[1] for c in qc)))

    # ------------------------------------------------------------------ VO
    def collect_vo(self) -> None:
        if not self.bd_vo:
            return
        vheads: dict[tuple, Group] = {}
        for ev in self.res.av:
            for row in ev.v_rows:
                srcs = {decode(c)[0] for c in row if c >= 0}
                if not srcs:
                    continue
                site = module_path_of(ev.node) or self.site_name(*sorted(srcs))
                if (row < 0).any() or len(srcs) != 1:
                    self.skip("bd_vo", site, "a value head mixes projected and other channels")
                    continue
                s = srcs.pop()
                key = ("bd_vo", s, tuple(decode(c)[1] for c in row))
                if key not in self.groups:
                    self.groups[key] = Group(len(self.groups), "bd_vo", s, key[2], site=site)
                vheads[key] = self.groups[key]
        # output projection rows reading each value head
        for ev in self.res.o:
            o_index = self.sites.index(ev.site)
            rows = ev.rows
            for key, g in vheads.items():
                codes = (np.int64(g.source) << 32) + np.asarray(g.cols, dtype=np.int64)
                pos = {int(c): p for p, c in enumerate(codes)}
                hit = [j for j, c in enumerate(rows) if int(c) in pos]
                if not hit:
                    continue
                d = len(g.cols)
                order = [pos[int(rows[j])] for j in hit]
                if len(hit) % d or any(order[k] != k % d for k in range(len(order))):
                    g.o_partners.add((o_index, None))      # unsupported arrangement
                    continue
                for c in range(len(hit) // d):
                    g.o_partners.add((o_index, tuple(hit[c * d:(c + 1) * d])))
                g.site = g.site or self.site_name(g.source, o_index)

    # ------------------------------------------------------------------ legality
    def legal_groups(self) -> list[Group]:
        by_col: dict[tuple[int, int], Group] = {}
        bad: dict[int, str] = {}
        for g in self.groups.values():
            for c in g.cols:
                other = by_col.get((g.source, c))
                if other is not None and other is not g:
                    bad[g.gid] = bad[other.gid] = "channels shared by two heads"
                by_col[(g.source, c)] = g
        q_owner: dict[tuple, int] = {}
        q_cols_used: dict[tuple[int, int], tuple] = {}
        for g in self.groups.values():
            for (qs, qcols) in g.q_partners:
                prev = q_owner.get((qs, qcols))
                if prev is not None and prev != g.gid:
                    bad[g.gid] = bad[prev] = "a query head meets two different key heads"
                q_owner[(qs, qcols)] = g.gid
                for c in qcols:
                    if (qs, c) in by_col:
                        bad[g.gid] = "query channels are also rewritten as key/value channels"
                    u = q_cols_used.get((qs, c))
                    if u is not None and u != qcols:
                        bad[g.gid] = "query channels are paired inconsistently"
                    q_cols_used[(qs, c)] = qcols
        out = []
        for g in self.groups.values():
            site = self.sites[g.source]
            kind = g.kind
            reason = bad.get(g.gid)
            if reason is None and len(g.cols) >= site.d_in:
                reason = f"d_h={len(g.cols)} >= d_in={site.d_in}"
            if reason is None:
                esc = self.res.escape_reason(g.source, g.cols)
                if esc is not None:
                    reason = ("K" if kind == "bd_qk" else "V") + f" channels are also used elsewhere: {esc}"
            if reason is None and kind == "bd_qk":
                for (qs, qcols) in g.q_partners:
                    esc = self.res.escape_reason(qs, qcols)
                    if esc is not None:
                        reason = f"Q channels are also used elsewhere: {esc}"
                        break
            if reason is None and kind == "bd_vo":
                if not g.o_partners:
                    reason = "value head does not reach an output projection"
                elif any(rows is None for _, rows in g.o_partners):
                    reason = "output projection rows of a head are not in channel order"
            if reason is None:
                involved = [self.sites[g.source]] + [self.sites[i] for i, _ in g.q_partners | g.o_partners]
                reason = weight_problem([p for s in involved for p in (s.weight, s.bias) if p is not None])
            if reason is not None:
                self.skip(kind, g.site, reason)
                continue
            out.append(g)
        return out


@dataclass
class Component:
    linears: list[int]
    groups: list[Group]


def _components(groups: list[Group]) -> list[Component]:
    parent: dict[int, int] = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a, b):
        parent[find(a)] = find(b)

    for g in groups:
        find(g.source)
        for i, _ in g.q_partners | g.o_partners:
            union(g.source, i)
    comps: dict[int, Component] = {}
    for g in groups:
        r = find(g.source)
        comps.setdefault(r, Component([], [])).groups.append(g)
    for lin in list(parent):
        r = find(lin)
        if r in comps:
            comps[r].linears.append(lin)
    for c in comps.values():
        c.linears.sort()
    return list(comps.values())


def plan(res: LayoutResult, sites: Sequence[LinearSite], bd_qk: bool, bd_vo: bool):
    p = _Planner(res, sites, bd_qk, bd_vo)
    p.collect_qk()
    p.collect_vo()
    groups = p.legal_groups()
    return _components(groups), list(p.skips.values())


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
            dtype = site.weight.tensor.dtype
            by_g: dict[int, list[Group]] = defaultdict(list)
            for g in gs:
                by_g[len(g.cols)].append(g)
            res = []
            for gsz, members in sorted(by_g.items()):
                Wh = torch.stack([W[:, list(g.cols)] for g in members])
                bh = None if b is None else torch.stack([b[list(g.cols)] for g in members])
                f = bd_factors(Wh, bh, dtype=dtype, error_budget=self.budget)
                res.append((members, f))
            out[s] = res
        return out

    def tensors(self, args, fac=None) -> list[torch.Tensor | None]:
        fac = fac if fac is not None else self.factors(args)
        basis = {}
        for s, lst in fac.items():
            for members, f in lst:
                for h, g in enumerate(members):
                    basis[g.gid] = f.basis64[h]
        out: list[torch.Tensor | None] = []
        for lin in self.comp.linears:
            site = self.sites[lin]
            dev = site.weight.tensor.device
            dtype = site.weight.tensor.dtype
            W = site.weight_matrix(args).detach().to("cpu", torch.float64).clone()
            b = site.bias_vector(args)
            b = None if b is None else b.detach().to("cpu", torch.float64).clone()
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
            out.append(W[:, dense].t().contiguous().to(dev, dtype) if dense else None)
            out.append(b[dense].to(dev, dtype) if (b is not None and dense) else None)
            for members, f in fac.get(lin, []):
                rows = f.rows
                rest = f.rest_rows
                out.append(rows.reshape(-1).to(dev))
                out.append(rest.reshape(-1).to(dev))
                out.append(f.w_rest.to(dev, dtype))
                out.append(None if f.bias is None else f.bias.reshape(-1).to(dev, dtype))
            if lin in self.bd_by_source:
                order = dense + [c for members, _ in fac[lin] for g in members for c in g.cols]
                inv = torch.empty(site.d_out, dtype=torch.long)
                inv[torch.tensor(order, dtype=torch.long)] = torch.arange(site.d_out)
                out.append(inv.to(dev))
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
    initial = math_.tensors(editor.example_inputs, fac)
    sources = sorted({i for lin in comp.linears for i in
                      ([sites[lin].weight.index] + ([sites[lin].bias.index] if sites[lin].bias else []))})
    editor.current_rewrite = first_index
    nodes = editor.add_derived(f"bd{first_index}", sources, lambda a: math_.tensors(a), initial)
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
        target.replace_all_uses_with(y)
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
