"""Machine-readable form of a Diff.

Plain JSON (no NaN/Infinity literals): non-finite floats are written as the strings
``"inf"``, ``"-inf"`` and ``"nan"``. The backend's own report is included verbatim under
``"report"`` (``bdpass.Report.from_dict`` reads it back)."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .model import Diff, GraphDiff, Row

FORMAT = "bdpass-diff"
VERSION = 1


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _row(r: "Row") -> dict:
    return {
        "before": r.before.name if r.before else None,
        "after": r.after.name if r.after else None,
        "status": r.status, "region": r.region, "role": r.role,
        "ref": r.ref, "ref_kind": r.ref_kind, "shape": r.shape,
        "orig": r.orig.to_dict() if r.orig else None,
        "new": r.new.to_dict() if r.new else None,
        "dev64": r.dev64, "basis_changed": r.basis_changed,
        "diverged": r.diverged, "returned": r.returned,
    }


def _graph(d: "Diff", g: "GraphDiff") -> dict:
    return {
        "position": g.position, "index": g.report.index, "rewritten": g.rewritten,
        "dtype": g.dtype, "numerics_error": g.numerics_error,
        "flops_before": g.flops_before, "flops_after": g.flops_after,
        "first_divergence": g.first_divergence,
        "regions": [{"tag": reg.tag, "records": reg.records, "kinds": reg.kinds, "sites": reg.sites,
                     "label": reg.label(g.report.rewrites)} for reg in g.regions],
        "rows": [_row(r) for r in g.rows],
    }


def diff_to_dict(d: "Diff") -> dict:
    fd = d.first_divergence
    first = None
    if fd is not None:
        g, row = fd
        first = {"graph": g.position, "row": g.first_divergence, **_row(row)}
    wg = d.worst_growth()
    growth = None if wg is None else {"ratio": wg[0], "graph": wg[1].position, **_row(wg[2])}
    opts = dataclasses.asdict(d.options)
    opts["inductor"] = dict(opts.get("inductor") or {})
    out = {
        "format": FORMAT, "version": VERSION,
        "dtype": d.dtype, "unit_roundoff": d.unit_roundoff, "floor": d.floor,
        "error_budget": d.options.error_budget,     # None: per-dtype default (floor holds the value used)
        "divergence_rule": "new.rel_l2 > max(2 * orig.rel_l2, error_budget * unit_roundoff)",
        "options": opts,
        "nothing_matched": d.nothing_matched(),
        "first_divergence": first,
        "worst_growth": growth,
        "rules": [{"kind": r.kind, "enabled": r.enabled, "matched": r.matched, "applied": r.applied,
                   "skipped": r.skipped, "reasons": [{"reason": s, "count": c} for s, c in r.reasons]}
                  for r in d.rules()],
        "totals": d.totals(),
        "graphs": [_graph(d, g) for g in d.graphs],
        "report": d.report.to_dict(),
    }
    return _clean(out)


def diff_to_json(d: "Diff", **kw: Any) -> str:
    kw.setdefault("indent", 1)
    return json.dumps(diff_to_dict(d), allow_nan=False, default=str, **kw)
