"""Planning BD on attention head pairs from the channel-layout analysis: which head
groups exist, which are legal, and which projections they connect.

A *group* is one head's channel set of a projection that BD rewrites:

* ``bd_qk``: the k channels one head contributes to a score contraction (only the
  positions where both q and k channels are untouched linear columns: the un-rotated part
  of partial-RoPE and MLA heads qualifies). Its basis ``B`` folds into the columns of every
  q head that meets it (all heads of a GQA group).
* ``bd_vo``: the v channels of one value head. Its basis folds into the rows of the output
  projection that read that head's attention output (every copy, for GQA).

Groups connected through shared projections form a :class:`Component`, rewritten together
by :mod:`bdpass.rewrites.bd_attention`.

Every attention of the graph (:func:`bdpass.graph.contractions.find_attention`) gets a
verdict for its score contraction (``bd_qk``) and its value contraction (``bd_vo``): a
group that goes on to the rewrite, or a skip with the reason. Groups and skips carry the
names of the contraction nodes they are about (``Group.nodes``, ``SkipRecord.nodes``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .._compat import module_path_of
from ..graph.layout import LayoutResult, decode
from ..graph.linears import LinearSite, common_module_path
from ..graph.params import weight_problem
from ..report import SkipRecord


@dataclass
class Group:
    gid: int
    kind: str                      # "bd_qk" | "bd_vo"
    source: int                    # linear index
    cols: tuple[int, ...]          # ordered channel columns of the head
    q_partners: set = field(default_factory=set)      # {(linear, cols)}
    o_partners: set = field(default_factory=set)      # {(linear, rows)}
    site: str = ""
    nodes: set = field(default_factory=set)           # names of the contraction nodes it pairs at


class _Planner:
    def __init__(self, res: LayoutResult, sites: Sequence[LinearSite], bd_qk: bool, bd_vo: bool,
                 min_saving: float = 0.0, reshaped_sites: bool = False):
        self.res = res
        self.sites = list(sites)
        self.bd_qk, self.bd_vo = bd_qk, bd_vo
        self.min_saving = min_saving
        self.reshaped_sites = reshaped_sites
        self.groups: dict[tuple, Group] = {}
        self.skips: dict[tuple, SkipRecord] = {}

    def skip(self, kind: str, site: str, reason: str, nodes=()) -> None:
        rec = self.skips.setdefault((kind, site, reason), SkipRecord(kind, site, reason))
        for n in nodes:
            if n not in rec.nodes:
                rec.nodes.append(n)

    def site_name(self, *linear_ids: int) -> str:
        return common_module_path([self.sites[i].module_path for i in linear_ids]) or \
            " / ".join(dict.fromkeys(self.sites[i].weight.name for i in linear_ids))

    def contraction_site(self, node, linear_ids) -> str:
        """Name of an attention: the module whose forward ran the contraction, else the
        common module of its projections (their weights' names at the root), else the node."""
        return module_path_of(node) or (self.site_name(*sorted(linear_ids)) if linear_ids else node.name)

    def reason_of_codes(self, codes: np.ndarray) -> str:
        touched = codes[codes <= -2]
        if touched.size:
            return self.res.reason_of(int(touched[0]))
        return "channels not produced by a linear projection"

    # ------------------------------------------------------------------ QK
    def collect_qk(self) -> None:
        for ev in self.res.qk:
            nodes = (ev.node.name,)
            for qrow, krow in zip(ev.q_rows, ev.k_rows):
                site = self.contraction_site(ev.node, self.res.sources_of(np.concatenate([qrow, krow])))
                ok = (qrow >= 0) & (krow >= 0)
                if not ok.any():
                    reason = self.reason_of_codes(np.concatenate([krow, qrow]))
                    self.skip("bd_qk", site, reason if "RoPE" not in reason else "RoPE on q/k channels", nodes)
                    continue
                if not self.bd_qk:
                    continue
                qc, kc = qrow[ok], krow[ok]
                qs, ks = {decode(c)[0] for c in qc}, {decode(c)[0] for c in kc}
                if len(qs) != 1 or len(ks) != 1:
                    self.skip("bd_qk", site, "a head's channels come from several projections", nodes)
                    continue
                qsrc, ksrc = qs.pop(), ks.pop()
                key = ("bd_qk", ksrc, tuple(decode(c)[1] for c in kc))
                g = self.groups.get(key)
                if g is None:
                    g = self.groups[key] = Group(len(self.groups), "bd_qk", ksrc, key[2], site=site)
                g.q_partners.add((qsrc, tuple(decode(c)[1] for c in qc)))
                g.nodes.add(ev.node.name)

    # ------------------------------------------------------------------ VO
    def collect_vo(self) -> None:
        if not self.bd_vo:
            return
        vheads: dict[tuple, Group] = {}
        for ev in self.res.av:
            nodes = (ev.node.name,)
            for row in ev.v_rows:
                srcs = {decode(c)[0] for c in row if c >= 0}
                site = self.contraction_site(ev.node, self.res.sources_of(row))
                if not srcs:
                    if (row <= -2).any():
                        self.skip("bd_vo", site, self.reason_of_codes(row), nodes)
                    continue
                if (row < 0).any() or len(srcs) != 1:
                    why = "a value head mixes projected and other channels"
                    if (row <= -2).any():
                        why += f" ({self.reason_of_codes(row)})"
                    self.skip("bd_vo", site, why, nodes)
                    continue
                s = srcs.pop()
                key = ("bd_vo", s, tuple(decode(c)[1] for c in row))
                if key not in self.groups:
                    self.groups[key] = Group(len(self.groups), "bd_vo", s, key[2], site=site)
                self.groups[key].nodes.add(ev.node.name)
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

    # ------------------------------------------------------------------ unmatched attention
    def collect_unmatched(self) -> None:
        for u in self.res.unmatched:
            if (u.kind == "bd_qk" and not self.bd_qk) or (u.kind == "bd_vo" and not self.bd_vo):
                continue
            reason = u.reason
            if u.kind == "bd_qk" and "RoPE" in reason:
                reason = "RoPE on q/k channels"
            self.skip(u.kind, self.contraction_site(u.node, u.sources), reason, (u.node.name,))

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
            if reason is None and len(g.cols) < self.min_saving * site.d_in:
                reason = (f"saves {100 * len(g.cols) / site.d_in:.2g}% of the head's projection weights "
                          f"(d_h={len(g.cols)} of d_in={site.d_in}), below min_saving={100 * self.min_saving:.2g}%")
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
            involved = [self.sites[g.source]] + [self.sites[i] for i, _ in g.q_partners | g.o_partners]
            if reason is None and not self.reshaped_sites:
                odd = [s for s in involved if s.reshaped]
                if odd:
                    reason = (f"{odd[0].weight.name} is applied by an einsum that reshapes its operand or result "
                              f"(several contracted or output dims); BD does not rewrite that form yet")
            if reason is None:
                reason = weight_problem([p for s in involved for p in (s.weight, s.bias) if p is not None])
            if reason is not None:
                self.skip(kind, g.site, reason, sorted(g.nodes))
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


def plan(res: LayoutResult, sites: Sequence[LinearSite], bd_qk: bool, bd_vo: bool,
         min_saving: float = 0.02, reshaped_sites: bool = False):
    """Components to rewrite and skips. ``min_saving`` (the option of that name): a head
    saves ``d_h / d_in`` of its projection's weights and is skipped below it.
    ``reshaped_sites``: the rewrite applies ``LinearSite.prologue``/``epilogue`` (einsum
    projections over several dims); until it does, pairs involving such sites are skipped
    with that reason."""
    p = _Planner(res, sites, bd_qk, bd_vo, min_saving, reshaped_sites)
    p.collect_qk()
    p.collect_vo()
    p.collect_unmatched()
    groups = p.legal_groups()
    return _components(groups), list(p.skips.values())
