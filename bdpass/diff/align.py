"""Alignment of one graph: the original and the rewritten node lists paired by name, the
nodes only one side has grouped into rewritten regions, each replacement on the row of the
original node it replaces (see "Alignment" in :mod:`bdpass.diff.core`).
"""
from __future__ import annotations

import difflib
import re
from typing import Any, Sequence

import torch
import torch.fx

from ..report import NodeRecord
from .model import GraphDiff, Region, Row

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _arg_names(rec: NodeRecord) -> set[str]:
    return set(_IDENT.findall(rec.args or ""))


def _users(gm: torch.fx.GraphModule | None, records: Sequence[NodeRecord]) -> dict[str, list[str]]:
    """name -> names of its users (from the live graph when there is one)."""
    users: dict[str, list[str]] = {r.name: [] for r in records}
    if gm is not None:
        for n in gm.graph.nodes:
            users.setdefault(n.name, [])
            for a in n.all_input_nodes:
                users.setdefault(a.name, []).append(n.name)
        return users
    for r in records:
        for a in _arg_names(r):
            if a in users and a != r.name:
                users[a].append(r.name)
    return users


def align_graph(gd: GraphDiff) -> None:
    """Fill ``gd.rows`` and ``gd.regions`` from the node records of ``gd.report`` (see
    "Alignment" in :mod:`bdpass.diff.core`)."""
    g = gd.report
    kept = g.graphs_kept
    before = list(g.nodes_before)
    rewritten = bool(g.rewrites) and bool(g.nodes_after)
    if not rewritten:
        # nothing rewritten (or the rewrite was abandoned): the compiled graph is the original
        returned = _output_names(kept[0] if kept else None)
        for rec in before:
            clean = NodeRecord(**{**rec.__dict__, "rewrite": None})
            gd.rows.append(Row(before=clean, after=clean, status="same", ref=rec.name, shape=rec.shape,
                               returned=rec.name in returned))
        return
    after = list(g.nodes_after)
    new_gm = kept[1] if kept is not None else None
    orig_gm = kept[0] if kept is not None else None
    bnames = [r.name for r in before]
    anames = [r.name for r in after]
    bset, aset = set(bnames), set(anames)
    brec = {r.name: r for r in before}
    arec = {r.name: r for r in after}
    users_after = _users(new_gm, after)
    users_before = _users(orig_gm, before)

    # rewrite tag of every node that only one side has
    tag: dict[tuple[str, str], int | None] = {}
    for r in after:
        if r.name not in bset:
            tag[("a", r.name)] = r.rewrite
    for r in before:
        if r.name not in aset:
            tag[("b", r.name)] = r.rewrite
    # derived-weight placeholders: the region of their users
    for r in after:
        if r.name not in bset and r.rewrite is None:
            ts = [arec[u].rewrite for u in users_after.get(r.name, []) if u in arec and arec[u].rewrite is not None]
            tag[("a", r.name)] = ts[0] if ts else None
    # removed nodes without a tag (e.g. dead weight views): the region of their users
    for r in before:
        if r.name not in aset and r.rewrite is None:
            ts = [brec[u].rewrite for u in users_before.get(r.name, []) if u in brec and brec[u].rewrite is not None]
            tag[("b", r.name)] = ts[0] if ts else None

    # regions: tag t covers records [t, next tag)
    tags = sorted({t for t in tag.values() if t is not None})
    region_of: dict[int, int] = {}
    for k, t in enumerate(tags):
        end = tags[k + 1] if k + 1 < len(tags) else len(g.rewrites)
        recs = [i for i in range(t, max(end, t + 1)) if i < len(g.rewrites)]
        region_of[t] = len(gd.regions)
        gd.regions.append(Region(tag=t, records=recs, kinds=[g.rewrites[i].kind for i in recs],
                                 sites=[g.rewrites[i].site for i in recs]))

    def role_of(r: NodeRecord) -> tuple[str | None, str | None]:
        """(role, ref) of a node only the rewritten graph has."""
        if r.op == "placeholder":
            return "derived weight", None
        t = tag.get(("a", r.name))
        outside = [u for u in users_after.get(r.name, []) if u in bset or tag.get(("a", u)) != t]
        if outside and r.origin:
            return "replacement", r.origin
        return "internal", None

    sm = difflib.SequenceMatcher(None, bnames, anames, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                b, a = before[i], after[j]
                gd.rows.append(Row(before=b, after=a, status="same", ref=a.name, shape=a.shape or b.shape))
            continue
        left, right = before[i1:i2], after[j1:j2]
        roles = {r.name: role_of(r) for r in right}
        # new inputs (derived weights) get rows of their own, ahead of the computation
        for r in right:
            if r.op == "placeholder":
                gd.rows.append(_region_row(None, r, "added", tag, region_of, roles))
        right = [r for r in right if r.op != "placeholder"]
        lkeys = [r.name for r in left]
        rkeys: list[Any] = []
        for r in right:
            role, ref = roles[r.name]
            rkeys.append(ref if role == "replacement" and ref in lkeys else object())
        inner = difflib.SequenceMatcher(None, lkeys, rkeys, autojunk=False)
        for iop, a1, a2, b1, b2 in inner.get_opcodes():
            if iop == "equal":
                for x, y in zip(range(a1, a2), range(b1, b2)):
                    lb, ra = left[x], right[y]
                    gd.rows.append(_region_row(lb, ra, "replaced", tag, region_of, roles))
                continue
            ls, rs = left[a1:a2], right[b1:b2]
            for k in range(max(len(ls), len(rs))):
                lb = ls[k] if k < len(ls) else None
                ra = rs[k] if k < len(rs) else None
                status = "added" if lb is None else "removed" if ra is None else "removed+added"
                gd.rows.append(_region_row(lb, ra, status, tag, region_of, roles))
    returned = _output_names(new_gm)
    for row in gd.rows:
        row.returned = row.after is not None and row.after.name in returned


def _region_row(lb, ra, status, tag, region_of, roles) -> Row:
    t = None
    if ra is not None:
        t = tag.get(("a", ra.name))
    if t is None and lb is not None:
        t = tag.get(("b", lb.name))
    role, ref = roles[ra.name] if ra is not None else (None, None)
    if status == "replaced":
        ref = lb.name
    shape = (ra.shape if ra is not None else None) or (lb.shape if lb is not None else None)
    return Row(before=lb, after=ra, status=status, region=region_of.get(t) if t is not None else None,
               role=role, ref=ref, shape=shape)


def _output_names(gm: torch.fx.GraphModule | None) -> set[str]:
    if gm is None:
        return set()
    out = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            out.update(a.name for a in n.all_input_nodes)
    return out
