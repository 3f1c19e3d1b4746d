"""What the backend did to each compiled graph: rewrites applied, sites skipped (with the
rule that blocked them), savings and numerics. The same object feeds the log line,
``bdpass.explain`` and the graph-diff tool.

Units: ``params_*`` count weight elements (biases included); ``flops_saved`` is floating
point operations per token (2 x multiply-adds) of the site; ``cond`` is the largest
2-norm condition number of the pivot block(s); ``error_bound`` is the first-order growth
factor of rounding error (see ``BDOptions.error_budget``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# The reason of a pair whose K or V is concatenated with earlier positions (a KV cache), and
# what to do about it: said once per graph in its summary line.
KV_CACHE = "concatenated along a non-channel dimension (e.g. a KV cache)"
KV_CACHE_HINT = ("{n} site(s) skipped where K/V are concatenated with other positions, as a KV cache does; "
                 "torch.compile cannot rewrite those, a model prepared on a cache-free run can "
                 "(bdpass.prepare(model, ..., use_cache=False), then generate with the cache: docs/prepare.md)")


@dataclass
class RewriteRecord:
    kind: str                 # one of bdpass.rules.kinds(): "pifa", "bd_qk", "bd_vo"
    site: str                 # module path of the site
    params_before: int
    params_after: int
    flops_saved: int          # per token
    cond: float
    error_bound: float                # worst-case first-order growth of rounding error
    details: dict = field(default_factory=dict)
    expected_growth: float = float("nan")   # typical growth of rounding error (what the budget limits)

    @property
    def params_saved(self) -> int:
        return self.params_before - self.params_after


@dataclass
class SkipRecord:
    kind: str
    site: str
    reason: str
    # names of the graph nodes the verdict is about: the attention contractions (score node
    # for bd_qk, value node for bd_vo) or a chain's two linear nodes (pifa); empty if unknown
    nodes: list = field(default_factory=list)


@dataclass
class NodeRecord:
    """One FX node as the diff tool shows it."""
    name: str
    op: str
    target: str
    args: str
    shape: list | None = None
    dtype: str | None = None
    rewrite: int | None = None      # index into GraphReport.rewrites that produced/removed it
    origin: str | None = None       # for new nodes: the node of the original graph it replaces


@dataclass
class GraphReport:
    index: int
    rewrites: list[RewriteRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    fallback: str | None = None     # reason the graph was lowered without rewrites
    lowering: str = "inductor"
    params_before: int = 0          # weight elements the graph reads
    params_after: int = 0
    derived_bytes: int = 0          # bytes of the factors the compiled graph holds
    released_bytes: int = 0         # bytes of replaced weights freed (release_weights=True)
    validation: str | None = None   # outcome of the float64 check of the rewritten graph
    validate_seconds: float = 0.0   # time that check took while compiling
    measured_error: dict | None = None   # output error vs float64: original, rewritten, growth
    timing_seconds: float = 0.0     # time spent timing candidate lowerings while compiling
    nodes_before: list[NodeRecord] = field(default_factory=list)
    nodes_after: list[NodeRecord] = field(default_factory=list)
    # not serialized: set by the backend when a collector asks for graphs
    graphs_kept: tuple | None = field(default=None, repr=False, compare=False)

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for r in self.rewrites:
            kinds[r.kind] = kinds.get(r.kind, 0) + 1
        applied = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"
        saved = self.params_before - self.params_after
        pct = 100.0 * saved / self.params_before if self.params_before else 0.0
        line = (f"bdpass: graph {self.index}: rewrites {applied}; skipped {len(self.skipped)}; "
                f"weights {self.params_before:,} -> {self.params_after:,} (-{pct:.1f}%); "
                f"lowering={self.lowering}")
        if self.fallback:
            line += f"; fell back: {self.fallback}"
        cached = sum(1 for sk in self.skipped if KV_CACHE in sk.reason)
        if cached:
            line += "; " + KV_CACHE_HINT.format(n=cached)
        return line


@dataclass
class Report:
    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def rewrites(self) -> list[RewriteRecord]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def skipped(self) -> list[SkipRecord]:
        return [s for g in self.graphs for s in g.skipped]

    @property
    def params_before(self) -> int:
        return sum(g.params_before for g in self.graphs)

    @property
    def params_after(self) -> int:
        return sum(g.params_after for g in self.graphs)

    @property
    def derived_bytes(self) -> int:
        return sum(g.derived_bytes for g in self.graphs)

    @property
    def flops_saved(self) -> int:
        return sum(r.flops_saved for r in self.rewrites)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict:
        out = []
        for g in self.graphs:
            d = {f.name: getattr(g, f.name) for f in fields(g) if f.name != "graphs_kept"}
            for k in ("rewrites", "skipped", "nodes_before", "nodes_after"):
                d[k] = [asdict(x) for x in d[k]]
            out.append(d)
        return {"graphs": out}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, data: dict) -> "Report":
        graphs = []
        for g in data.get("graphs", []):
            g = dict(g)
            g["rewrites"] = [RewriteRecord(**r) for r in g.get("rewrites", [])]
            g["skipped"] = [SkipRecord(**s) for s in g.get("skipped", [])]
            g["nodes_before"] = [NodeRecord(**n) for n in g.get("nodes_before", [])]
            g["nodes_after"] = [NodeRecord(**n) for n in g.get("nodes_after", [])]
            graphs.append(GraphReport(**g))
        return cls(graphs=graphs)

    @classmethod
    def from_json(cls, text: str) -> "Report":
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ text
    def __str__(self) -> str:
        return format_report(self)


def _fmt_num(x: float) -> str:
    if x != x:  # nan
        return "nan"
    if x == float("inf"):
        return "inf"
    return f"{x:.3g}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return out


def format_report(report: Report) -> str:
    lines = []
    for g in report.graphs:
        lines.append(g.summary())
    if report.rewrites:
        lines.append("")
        lines.append("Rewrites")
        rows = [[r.kind, r.site, f"{r.params_before:,}", f"{r.params_after:,}",
                 f"{100.0 * r.params_saved / max(r.params_before, 1):.1f}%",
                 f"{r.flops_saved:,}", _fmt_num(r.cond), _fmt_num(r.error_bound), _fmt_num(r.expected_growth),
                 str(r.details.get("form", ""))]
                for r in report.rewrites]
        lines += _table(["kind", "site", "params before", "after", "saved", "flops saved/token",
                         "cond", "error bound", "growth", "form"], rows)
    if report.skipped:
        lines.append("")
        lines.append("Skipped")
        lines += _table(["kind", "site", "reason"], [[s.kind, s.site, s.reason] for s in report.skipped])
    if not report.graphs:
        lines.append("bdpass: no graph was compiled")
    b, a = report.params_before, report.params_after
    if b:
        lines.append("")
        lines.append(f"Total weights {b:,} -> {a:,} ({100.0 * (b - a) / b:.1f}% saved); "
                     f"{report.flops_saved:,} FLOPs saved per token")
    return "\n".join(lines)
