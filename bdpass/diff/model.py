"""The data of a graph diff: :class:`Diff` (all graphs, the per-rule table, the costs, the
summaries and the renderers), :class:`GraphDiff` (one compiled graph: its aligned rows,
:class:`Row`, and rewritten regions, :class:`Region`), :class:`Stats` (one node's error
against float64) and :class:`RuleRow` (one line of the per-rule table).

:mod:`bdpass.diff.core` builds them (:mod:`.align` fills the rows and regions,
:mod:`.numerics` the errors); its docstring says what is measured and how.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..options import BDOptions
from ..report import GraphReport, NodeRecord, Report, RewriteRecord

NOTHING_FOUND = "no linear chains or attention found"


@dataclass
class Stats:
    """Error of one node's value against its float64 reference."""
    max_abs: float
    rel_l2: float
    sqnr_db: float

    def to_dict(self) -> dict:
        return {"max_abs": self.max_abs, "rel_l2": self.rel_l2, "sqnr_db": self.sqnr_db}


@dataclass
class Row:
    """One line of the side-by-side view.

    status: ``same`` (untouched node, both sides), ``replaced`` (an original node and the
    node that replaces it), ``removed`` / ``added`` (one side only), ``removed+added`` (in
    a region: a removed and an added node that are not related, shown side by side)."""
    before: NodeRecord | None
    after: NodeRecord | None
    status: str
    region: int | None = None        # index into GraphDiff.regions
    role: str | None = None          # role of the after-node: replacement | internal | derived weight
    ref: str | None = None           # original node whose float64 value the after-node is compared to
    shape: list | None = None        # shape of the value (after side, else before side)
    orig: Stats | None = None        # original graph, model dtype, vs float64
    new: Stats | None = None         # rewritten graph, model dtype, vs float64 at ``ref``
    diverged: bool = False
    returned: bool = False           # the graph returns this value
    ref_kind: str | None = None      # what ``new`` is measured against: orig64 | new64
    dev64: float | None = None       # rel. L2 of rewritten vs original graph, both in float64
    basis_changed: bool = False      # value legitimately in another basis (BD span)

    @property
    def name(self) -> str:
        n = self.after or self.before
        return n.name if n is not None else ""


@dataclass
class Region:
    """One rewrite step: a PIFA chain, or a BD attention component (several records)."""
    tag: int                          # rewrite index the nodes are tagged with
    records: list[int]                # indices into GraphReport.rewrites
    kinds: list[str]
    sites: list[str]

    def label(self, rewrites: Sequence[RewriteRecord]) -> str:
        parts = [f"{rewrites[i].kind} {rewrites[i].site}" for i in self.records]
        return "; ".join(parts)


@dataclass
class GraphDiff:
    position: int                     # position in compile order within this diff
    report: GraphReport
    rows: list[Row] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    numerics_error: str | None = None
    flops_before: int | None = None   # matmul-class FLOPs of the run, original graph
    flops_after: int | None = None
    dtype: str | None = None          # dominant floating dtype of the graph's inputs
    first_divergence: int | None = None   # index into rows

    @property
    def rewritten(self) -> bool:
        return bool(self.report.rewrites) and bool(self.report.nodes_after)

    def outputs(self) -> list[Row]:
        """Rows of the values the graph returns (after side when rewritten)."""
        return [r for r in self.rows if r.returned]


@dataclass
class RuleRow:
    kind: str
    enabled: bool
    applied: int
    skipped: int
    reasons: list[tuple[str, int]]    # (reason, count), most frequent first

    @property
    def matched(self) -> int:
        return self.applied + self.skipped


@dataclass
class Diff:
    report: Report
    graphs: list[GraphDiff]
    options: BDOptions
    dtype: str | None                 # model dtype (dominant floating dtype of all graphs' inputs)
    unit_roundoff: float | None
    floor: float | None               # error_budget * unit roundoff

    # ------------------------------------------------------------------ summaries
    @property
    def first_divergence(self) -> tuple[GraphDiff, Row] | None:
        for g in self.graphs:
            if g.first_divergence is not None:
                return g, g.rows[g.first_divergence]
        return None

    def worst_growth(self) -> tuple[float, GraphDiff, Row] | None:
        """Largest ratio rewritten / original relative error over the compared nodes."""
        best = None
        for g in self.graphs:
            if not g.rewritten:
                continue
            for r in g.rows:
                if r.status not in ("same", "replaced") or r.orig is None or r.new is None:
                    continue
                o, n = r.orig.rel_l2, r.new.rel_l2
                if not (o > 0 and math.isfinite(o) and math.isfinite(n)):
                    continue
                if best is None or n / o > best[0]:
                    best = (n / o, g, r)
        return best

    def rules(self) -> list[RuleRow]:
        from .. import rules

        kinds = list(rules.kinds())
        for r in self.report.rewrites:
            if r.kind not in kinds:
                kinds.append(r.kind)
        for s in self.report.skipped:
            if s.kind not in kinds:
                kinds.append(s.kind)
        out = []
        for k in kinds:
            reasons = Counter(s.reason for s in self.report.skipped if s.kind == k)
            out.append(RuleRow(kind=k, enabled=bool(getattr(self.options, k, True)),
                               applied=sum(r.kind == k for r in self.report.rewrites),
                               skipped=sum(reasons.values()),
                               reasons=sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))))
        return out

    @property
    def element_size(self) -> int:
        if self.dtype is None:
            return 4
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    def totals(self) -> dict:
        rep = self.report
        fb = [g.flops_before for g in self.graphs]
        fa = [g.flops_after for g in self.graphs]
        es = self.element_size
        return {
            "params_before": rep.params_before, "params_after": rep.params_after,
            "bytes_before": rep.params_before * es, "bytes_after": rep.params_after * es,
            "flops_before": sum(fb) if fb and None not in fb else None,
            "flops_after": sum(fa) if fa and None not in fa else None,
            "flops_saved_per_token": rep.flops_saved,
        }

    def nothing_matched(self) -> str | None:
        """Why nothing was rewritten, or None when something was."""
        if any(g.rewritten for g in self.graphs):
            return None
        if not self.graphs:
            return "no graph was compiled"
        parts = []
        fallbacks = [f"graph {g.position}: {g.report.fallback}" for g in self.graphs if g.report.fallback]
        if self.report.skipped:
            n = len(self.report.skipped)
            parts.append(f"no rewrites: {n} site{'s' if n != 1 else ''} matched and skipped")
        else:
            parts.append(f"no rewrites: {NOTHING_FOUND}")
        if fallbacks:
            parts.append("fell back (" + "; ".join(fallbacks) + ")")
        return "; ".join(parts)

    # ------------------------------------------------------------------ renderers
    def to_text(self, width: int = 100, context: int | None = 3) -> str:
        from .render_text import render_text
        return render_text(self, width=width, context=context)

    def __str__(self) -> str:
        return self.to_text()

    def to_dict(self) -> dict:
        from .render_json import diff_to_dict
        return diff_to_dict(self)

    def to_json(self, **kw: Any) -> str:
        from .render_json import diff_to_json
        return diff_to_json(self, **kw)

    def to_html(self) -> str:
        from .render_html import render_html
        return render_html(self)

    def save_html(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
