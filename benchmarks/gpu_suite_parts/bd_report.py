"""What a ``bdpass.collect_reports`` report says was applied, as recorded in the JSON."""
from __future__ import annotations


def custom_ops(rep) -> set:
    """The bdpass custom ops the rewritten graphs call."""
    return {n.target for g in rep.graphs for n in (g.nodes_after or []) if "bdpass" in str(n.target)
            or "bd_project" in str(n.target) or "pivot_linear" in str(n.target)}


def report_form(rep) -> dict:
    """What the report says was applied: kinds, shared or per-head bases, and whether the
    rewritten graph calls the custom ops or plain aten ops."""
    bases = sorted({("shared" if r.details.get("shared_basis") else "per_head")
                    for r in rep.rewrites if r.kind.startswith("bd")})
    ops = sorted(custom_ops(rep))
    return {"kinds": sorted({r.kind for r in rep.rewrites}), "bd_basis": bases,
            "lowering": ("custom ops: " + ", ".join(ops)) if ops else "aten ops",
            "column_order": sorted({r.details.get("column_order") for r in rep.rewrites
                                    if r.details.get("column_order")})}
