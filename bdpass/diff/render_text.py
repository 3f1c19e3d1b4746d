"""Terminal rendering of a Diff (fits ``width`` columns, 100 by default)."""
from __future__ import annotations

import textwrap
from typing import TYPE_CHECKING

from .formatting import fmt_bytes, fmt_db, fmt_err, node_text, short_name
from .model import NOTHING_FOUND

if TYPE_CHECKING:  # pragma: no cover
    from .model import Diff, GraphDiff, Row


def _fit(s: str, w: int) -> str:
    if len(s) <= w:
        return s.ljust(w)
    return s[: max(w - 3, 0)] + "..."


def _pct(before: int, after: int) -> str:
    if not before:
        return ""
    return f" ({100.0 * (after - before) / before:+.1f}%)"


def summary_lines(d: "Diff", width: int = 100) -> list[str]:
    rep = d.report
    kinds: dict[str, int] = {}
    for r in rep.rewrites:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    applied = ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) or "none"
    n = len(d.graphs)
    out = [f"bdpass diff: {n} graph{'s' if n != 1 else ''}; rewrites {applied}; "
           f"skipped {len(rep.skipped)}; dtype {d.dtype or '-'}"]
    why = d.nothing_matched()
    if why:
        out.append(why)
    t = d.totals()
    out.append(f"weights   {t['params_before']:,} -> {t['params_after']:,} elements"
               f"{_pct(t['params_before'], t['params_after'])}; "
               f"{fmt_bytes(t['bytes_before'])} -> {fmt_bytes(t['bytes_after'])}")
    if t["flops_before"] is not None:
        out.append(f"FLOPs     {t['flops_before']:,} -> {t['flops_after']:,} matmul FLOPs on this input"
                   f"{_pct(t['flops_before'], t['flops_after'])}; rewrites save "
                   f"{t['flops_saved_per_token']:,} per token")
    else:
        out.append(f"FLOPs     rewrites save {t['flops_saved_per_token']:,} per token")
    for g in d.graphs:
        outs = [r for r in g.outputs() if r.orig is not None or r.new is not None]
        if outs and g.numerics_error is None:
            worst_o = max((r.orig.rel_l2 for r in outs if r.orig), default=None)
            worst_n = max((r.new.rel_l2 for r in outs if r.new), default=None)
            out.append(f"graph {g.position} outputs: rel-err vs float64 original {fmt_err(worst_o)}, "
                       f"rewritten {fmt_err(worst_n)}")
    wg = d.worst_growth()
    if wg is not None:
        ratio, g, row = wg
        out.append(f"largest error growth: {ratio:.2f}x at graph {g.position} node {short_name(row.name)} "
                   f"({fmt_err(row.orig.rel_l2)} -> {fmt_err(row.new.rel_l2)})")
    if d.floor is not None:
        rule = f"rule: rewritten rel-err > max(2 x original, error budget x u = {d.floor:.3g})"
        fd = d.first_divergence
        missing = [str(g.position) for g in d.graphs if g.numerics_error]
        if fd is None and missing:
            out.append(f"first divergence: unknown - no numerics for graph {', '.join(missing)} ({rule})")
        elif fd is None:
            out.append(f"first divergence: none ({rule})")
        else:
            g, row = fd
            out.append(f"first divergence: graph {g.position} node {short_name(row.name)}: rewritten "
                       f"{fmt_err(row.new.rel_l2 if row.new else None)} vs original "
                       f"{fmt_err(row.orig.rel_l2 if row.orig else None)} ({rule})")
    return [ln for x in out for ln in textwrap.wrap(x, width, subsequent_indent="  ")] or [""]


def rule_lines(d: "Diff", width: int = 100) -> list[str]:
    rows = d.rules()
    out = ["Rules", f"{'rule':<8}{'enabled':<9}{'matched':>8}{'applied':>9}{'skipped':>9}"]
    for r in rows:
        out.append(f"{r.kind:<8}{'yes' if r.enabled else 'no':<9}{r.matched:>8}{r.applied:>9}{r.skipped:>9}")
        for reason, cnt in r.reasons:
            out += textwrap.wrap(f"{cnt}x {reason}", width, initial_indent="    skipped: ",
                                 subsequent_indent=" " * 13)
    return out


def _row_marker(row: "Row") -> str:
    m = {"same": " ", "replaced": "~", "removed": "-", "added": "+", "removed+added": "-+"}[row.status]
    if row.region is not None:
        m = f"R{row.region}{m}"
    if row.diverged:
        m = "!" + m
    return m


def _is_derived(r: "Row") -> bool:
    return r.role == "derived weight"


def plan(g: "GraphDiff", context: int | None) -> list[tuple]:
    """Display items of a graph's rows: ``("row", row, far)`` for every row (``far``: hidden
    in the collapsed view), preceded by ``("gap", n)`` for a run of ``n`` far unchanged rows
    and ``("derived", rows)`` for a run of derived-weight inputs (shown collapsed instead)."""
    n = len(g.rows)
    if context is None or context < 0:
        return [("row", r, False) for r in g.rows]
    keep = [False] * n
    for i, r in enumerate(g.rows):
        if _is_derived(r):
            continue
        if r.status != "same" or r.diverged or r.returned or r.after is None or r.before is None \
                or (r.after.args != r.before.args):
            for j in range(max(0, i - context), min(n, i + context + 1)):
                keep[j] = True
    items: list[tuple] = []
    i = 0
    while i < n:
        r = g.rows[i]
        if _is_derived(r):
            j = i
            while j < n and _is_derived(g.rows[j]) and g.rows[j].region == r.region:
                j += 1
            items.append(("derived", g.rows[i:j]))
            items += [("row", x, True) for x in g.rows[i:j]]
            i = j
        elif not keep[i]:
            j = i
            while j < n and not keep[j] and not _is_derived(g.rows[j]):
                j += 1
            items.append(("gap", j - i))
            items += [("row", x, True) for x in g.rows[i:j]]
            i = j
        else:
            items.append(("row", r, False))
            i += 1
    return items


def derived_summary(rows: list) -> str:
    names = [r.after.name for r in rows]
    numel = 0
    for r in rows:
        if r.shape:
            k = 1
            for x in r.shape:
                k *= int(x) if str(x).isdigit() else 1
            numel += k
    span = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
    return f"{len(rows)} derived weight{'s' if len(rows) != 1 else ''} {span} ({numel:,} elements)"


def graph_lines(d: "Diff", g: "GraphDiff", width: int = 100, context: int | None = 3) -> list[str]:
    rep = g.report
    n_b = len(rep.nodes_before)
    n_a = len(rep.nodes_after) if g.rewritten else n_b
    head = (f"Graph {g.position} (backend graph #{rep.index}): {n_b} -> {n_a} nodes, "
            f"{len(g.regions)} rewritten region{'s' if len(g.regions) != 1 else ''}")
    out = ["", "=" * min(width, len(head)), head]
    if rep.fallback:
        out += textwrap.wrap(f"fell back: {rep.fallback}", width, subsequent_indent="  ")
    if g.numerics_error:
        out += textwrap.wrap(f"numerics unavailable: {g.numerics_error}", width, subsequent_indent="  ")
    for k, reg in enumerate(g.regions):
        for i in reg.records:
            r = rep.rewrites[i]
            out += textwrap.wrap(
                f"R{k}: {r.kind} {r.site}: params {r.params_before:,} -> {r.params_after:,}, "
                f"{r.flops_saved:,} FLOPs/token saved, cond {r.cond:.3g}, error bound {r.error_bound:.3g}",
                width, subsequent_indent="      ")
    for s in rep.skipped:
        out += textwrap.wrap(f"skipped {s.kind} {s.site}: {s.reason}", width, subsequent_indent="      ")
    if not g.rewritten and not rep.skipped and not rep.fallback:
        out.append(f"no rewrites: {NOTHING_FOUND}")

    num_w = 8 + 1 + 9 + 1 + 7          # orig rel, new rel, sqnr
    mark_w = 5
    side = max((width - mark_w - num_w - 3) // 2, 12)
    out.append("")
    out.append(f"{'':<{mark_w}}{_fit('original', side)} {_fit('rewritten', side)} "
               f"{'orig.rel':>8} {'rewr.rel':>9} {'SQNR dB':>7}")
    prev_region = None
    for item in plan(g, context):
        if item[0] == "gap":
            out.append(f"{'':<{mark_w}}... {item[1]} unchanged node{'s' if item[1] != 1 else ''} ...")
            prev_region = None
            continue
        if item[0] == "derived":
            rows = item[1]
            if rows[0].region is not None and rows[0].region != prev_region:
                reg = g.regions[rows[0].region]
                out.append(_fit(f"{'':<{mark_w}}@@ R{rows[0].region}: {reg.label(rep.rewrites)} @@", width).rstrip())
            prev_region = rows[0].region
            mark = f"R{rows[0].region}+" if rows[0].region is not None else "+"
            out.append(_fit(f"{mark:<{mark_w}}{'':<{side}} {derived_summary(rows)}", width - 1).rstrip())
            continue
        _, row, far = item
        if far:
            continue
        if row.region is not None and row.region != prev_region:
            reg = g.regions[row.region]
            out.append(_fit(f"{'':<{mark_w}}@@ R{row.region}: {reg.label(rep.rewrites)} @@", width).rstrip())
        prev_region = row.region
        left = node_text(row.before)
        if row.status == "same" and row.after is not None and row.before is not None \
                and row.after.args == row.before.args:
            right = "="
        else:
            right = node_text(row.after)
        new = fmt_err(row.new.rel_l2 if row.new else None)
        if row.new is not None and row.ref_kind == "new64":
            new += "*"
        elif row.new is not None:
            new += " "
        sq = fmt_db(row.new.sqnr_db if row.new else (row.orig.sqnr_db if row.orig else None))
        out.append(f"{_row_marker(row):<{mark_w}}{_fit(left, side)} {_fit(right, side)} "
                   f"{fmt_err(row.orig.rel_l2 if row.orig else None):>8} {new:>9} {sq:>7}".rstrip())
    return out


LEGEND = ("marks: ~ replaced (original node and its replacement)  - removed  + added  "
          "Rk rewrite region k  ! diverged;  '=' same node, same arguments.  rel: relative L2 error "
          "vs the float64 run of the original graph; *: vs the float64 run of the rewritten graph "
          "(nodes internal to a rewrite, and values in a changed basis inside a BD span).  "
          "u: unit roundoff of the model dtype.")


def render_text(d: "Diff", width: int = 100, context: int | None = 3) -> str:
    out = summary_lines(d, width)
    out.append("")
    out += rule_lines(d, width)
    for g in d.graphs:
        out += graph_lines(d, g, width, context)
    out.append("")
    out += textwrap.wrap(LEGEND, width)
    return "\n".join(line[:width].rstrip() for line in out)
