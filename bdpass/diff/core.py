"""Graph diff: the graph before and after the ``bd`` backend, aligned, with numerics.

``bdpass.diff(model, *args, options=None, **kwargs)`` compiles ``model`` with the ``bd``
backend (inference, ``no_grad``, ``torch._dynamo.reset()`` before and after), keeps every
compiled Dynamo graph (several with graph breaks) and returns a :class:`Diff`:

Alignment
    Nodes that a rewrite did not touch keep their name in the rewritten graph, so the two
    node lists are aligned by name (an LCS over the names in graph order). What is left
    are rewritten regions: nodes of the original graph a rewrite removed (tagged with the
    rewrite in ``GraphReport.nodes_before``) and nodes it created (tagged with
    ``bdpass_rewrite`` / ``bdpass_origin``; new weight inputs take the region of their
    users), shown side by side. One region is one rewrite step: a PIFA chain, or a BD
    attention component (its ``bd_qk``/``bd_vo`` records). Inside a region, the node that
    *replaces* an original node - a new node whose value leaves the region (used by an
    untouched node, another region, or returned) - is paired with its ``origin`` on one
    row. Other new nodes are *internal* (pivot rows, partial products, concatenations):
    they compute other quantities than any original node, even where the shapes agree.

Numerics
    Each graph is run through an ``fx.Interpreter`` that records every node: the original
    graph in float64 (floating inputs, parameters included, cast to float64: the
    reference), the original graph in the model dtype, the rewritten graph in the model
    dtype (its derived weights as the backend computed them) and, when it differs, the
    rewritten graph in float64 (same derived weights, cast). Each graph is measured on the
    inputs the model fed it (after a graph break: the model-dtype values of the previous
    graph). For every node with a floating tensor value, the model-dtype value is compared
    with the float64 value of the original node of the same name; a replacement with the
    float64 value of its ``origin``. Internal nodes are compared with the float64 run of
    the rewritten graph (marked ``*`` / ``ref_kind == "new64"``). Measures, on the finite
    entries (a mismatch in the pattern of inf/nan counts as an infinite error):

    * ``max_abs``  = max |y - y64|
    * ``rel_l2``   = ||y - y64||_2 / ||y64||_2
    * ``sqnr_db``  = 10 log10(||y64||^2 / ||y - y64||^2)   (inf when exact)

    ``dev64`` is ``rel_l2`` between the two float64 runs at a node: the effect of rounding
    the derived weights to the model dtype, or a value that is not the original one.

BD spans
    BD replaces a q/k/v projection by one whose output is the original in another
    per-head basis; the basis cancels in the attention scores (q, k) or in the output
    projection (v). Between the two, untouched nodes carry values that legitimately
    differ from the original graph. Such nodes (``basis_changed``: ``dev64 > 0.1``, fed
    from a BD replacement whose own inputs are in the original basis, and not returned
    by the graph) are compared with the float64 run of the rewritten graph instead, so
    their error is rounding error only; the key comparison is where the basis cancels
    (the output-projection replacement, the scores), which is against the original.

Divergence rule
    The backend's error budget for the model dtype (``B``: option ``error_budget``, by default
    100 in float32 and 8 in bfloat16/float16) is the largest factor by which a rewrite may
    multiply the rounding error of the computation it replaces. With ``u``
    the unit roundoff of the model dtype (``finfo.eps / 2``: 6.0e-8 for float32, 3.9e-3
    for bfloat16, 4.9e-4 for float16), a node (untouched, or a replacement paired with its
    origin) *diverges* when::

        rel_l2(rewritten) > max(2 * rel_l2(original), B * u)

    i.e. the rewritten graph is more than twice as far from float64 as the original graph
    at the same node, and further than one rounding amplified by the full budget (the
    floor keeps exact or near-exact nodes, where twice the original error is 0 or
    noise, from being flagged). A non-finite rewritten error where the original one is
    finite always diverges. ``Diff.first_divergence`` is the first diverging node in
    graph order (graphs in compile order), or None. ``Diff.worst_growth`` is the largest
    ratio rewritten / original error over those nodes, whether or not it diverges.

Costs
    Parameter bytes are weight elements (``GraphReport.params_*``) times the element size
    of the model dtype. FLOPs: the matmul-class FLOPs of each run counted by
    ``torch.utils.flop_counter`` (this input, whole graph, before and after), and the
    per-token saving the rewrites claim (``RewriteRecord.flops_saved``).

The tool is meant for small models and inputs: the float64 values of every node are kept
in memory while the diff is built.
"""
from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx

from ..api import collect_reports
from ..backend import bd_backend
from ..graph.exact import LocalInterpreter
from ..options import BDOptions
from ..report import GraphReport, NodeRecord, Report, RewriteRecord

RULES = ("pifa", "bd_qk", "bd_vo")
BASIS_DEV = 0.1   # dev64 above which a value in a BD span counts as in a changed basis
NOTHING_FOUND = "no linear chains or attention found"


# ---------------------------------------------------------------------------- data
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
        kinds = list(RULES)
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


# ---------------------------------------------------------------------------- entry point
def diff(model: Any, *args: Any, options: Any = None, **kwargs: Any) -> Diff:
    """Compile ``model`` with the ``bd`` backend on these inputs and diff every compiled graph.

    The model is run once (inference, ``no_grad``); then each graph is re-run through an
    interpreter in float64 and in the model dtype (see the module docstring)."""
    opts = BDOptions.parse(options)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=lambda gm, ex: bd_backend(gm, ex, options=opts),
                                 dynamic=False)
        with collect_reports(keep_graphs=True) as report, torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return build_diff(report, opts)


def build_diff(report: Report, options: Any = None) -> Diff:
    """A Diff from a Report collected with ``collect_reports(keep_graphs=True)``."""
    opts = BDOptions.parse(options)
    graphs = []
    numels: Counter = Counter()
    for pos, g in enumerate(report.graphs):
        gd = GraphDiff(position=pos, report=g)
        _align(gd)
        kept = g.graphs_kept
        if kept is None:
            gd.numerics_error = "graphs were not kept (collect_reports(keep_graphs=True))"
        else:
            for t in kept[2]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    numels[t.dtype] += t.numel()
            gd.dtype = _dominant_dtype(kept[2])
        graphs.append(gd)
    dtype = max(numels, key=lambda d: numels[d]) if numels else None
    u = float(torch.finfo(dtype).eps) / 2 if dtype is not None else None
    floor = opts.budget_for(dtype) * u if u is not None else None
    for gd in graphs:
        if gd.report.graphs_kept is not None:
            try:
                _numerics(gd, floor)
            except Exception as e:  # a graph the interpreter cannot re-run: diff without numerics
                for r in gd.rows:
                    r.orig = r.new = None
                    r.diverged = False
                gd.first_divergence = None
                msg = str(e).strip().splitlines()
                gd.numerics_error = f"{type(e).__name__}: {msg[0] if msg else ''}"
    return Diff(report=report, graphs=graphs, options=opts,
                dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
                unit_roundoff=u, floor=floor)


def _dominant_dtype(inputs: Sequence[Any]) -> str | None:
    c: Counter = Counter()
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            c[t.dtype] += t.numel()
    if not c:
        return None
    return str(max(c, key=lambda d: c[d])).replace("torch.", "")


# ---------------------------------------------------------------------------- alignment
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


def _align(gd: GraphDiff) -> None:
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


# ---------------------------------------------------------------------------- numerics
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


def _numerics(gd: GraphDiff, floor: float | None) -> None:
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


def _output_names(gm: torch.fx.GraphModule | None) -> set[str]:
    if gm is None:
        return set()
    out = set()
    for n in gm.graph.nodes:
        if n.op == "output":
            out.update(a.name for a in n.all_input_nodes)
    return out


def _diverged(row: Row, floor: float | None) -> bool:
    if row.orig is None or row.new is None or row.status not in ("same", "replaced"):
        return False
    o, n = row.orig.rel_l2, row.new.rel_l2
    if not math.isfinite(n):
        return math.isfinite(o)
    if not math.isfinite(o):
        return False
    return n > max(2.0 * o, floor or 0.0)
