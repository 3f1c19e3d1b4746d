"""One self-contained HTML page for a Diff: inline CSS and JS, no network access.

The two graphs are shown side by side (original left, rewritten right), one row per
aligned node; rows of a rewritten region carry the class ``rewritten`` (and a colour per
region), diverging rows the class ``diverged``."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .formatting import escape as _e
from .formatting import fmt_bytes, fmt_db, fmt_err, node_text
from .model import NOTHING_FOUND
from .render_text import LEGEND, derived_summary, plan, summary_lines

if TYPE_CHECKING:  # pragma: no cover
    from .model import Diff, GraphDiff, Row

_CSS = """
:root { --fg:#1d2330; --muted:#667085; --line:#e4e7ec; --del:#fdecec; --add:#e8f6ec; --bad:#c62828; }
* { box-sizing: border-box; }
body { font: 13px/1.45 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; color: var(--fg);
       margin: 0; padding: 18px 22px 40px; background: #fafbfc; }
h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 16px; margin: 26px 0 8px; }
pre.summary { background: #fff; border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px;
              white-space: pre-wrap; margin: 0; font: 12.5px/1.5 ui-monospace, Menlo, Consolas, monospace; }
.nothing { color: #8a5300; font-weight: 600; }
table { border-collapse: collapse; background: #fff; }
table.rules td, table.rules th, table.recs td, table.recs th { border: 1px solid var(--line); padding: 3px 8px;
       text-align: left; vertical-align: top; }
table.rules td.n, table.recs td.n { text-align: right; font-variant-numeric: tabular-nums; }
.reasons { color: var(--muted); font-size: 12px; margin: 0; padding-left: 16px; }
.chips { margin: 6px 0 8px; display: flex; flex-wrap: wrap; gap: 6px; }
.chip { border-radius: 12px; padding: 2px 10px; cursor: pointer; border: 1px solid rgba(0,0,0,.12);
        background: var(--rc); font-size: 12px; }
.controls { margin: 6px 0; color: var(--muted); font-size: 12px; }
table.diff { width: 100%; table-layout: fixed; font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; }
table.diff th { position: sticky; top: 0; background: #f2f4f7; border-bottom: 1px solid var(--line);
                text-align: left; padding: 4px 6px; font-weight: 600; z-index: 1; }
table.diff td { padding: 2px 6px; border-bottom: 1px solid #f0f1f3; vertical-align: top; }
table.diff col.mark { width: 44px; } table.diff col.num { width: 76px; }
td.node { word-break: break-all; }
td.num { text-align: right; font-variant-numeric: tabular-nums; color: #344054; }
td.mark { color: var(--muted); white-space: nowrap; }
.name { font-weight: 600; } .op { color: #175cd3; } .shape { color: var(--muted); }
.eq { color: #98a2b3; }
tr.rewritten td.node { background: var(--rc); }
tr.rewritten td.node.del { box-shadow: inset 3px 0 0 #e57373; }
tr.rewritten td.node.add { box-shadow: inset 3px 0 0 #66bb6a; }
tr.rewritten td.node.empty { background: repeating-linear-gradient(45deg, #fff, #fff 4px, #f5f5f5 4px, #f5f5f5 8px); }
tr.replaced td.node { font-weight: 600; }
tr.rewired td.node.add { background: #fff8e1; }
tr.diverged td { background: #ffebee !important; } tr.diverged td.mark { color: var(--bad); font-weight: 700; }
tr.region-start td { border-top: 2px solid rgba(0,0,0,.25); }
tr.gap td { color: var(--muted); text-align: center; background: #f9fafb; font-style: italic; display: none; }
table.hide-far tr.far { display: none; } table.hide-far tr.gap { display: table-row; }
table.hide-far tr.gap td { display: table-cell; }
.basis { color: #6941c6; } tr.basis td.mark { box-shadow: inset 3px 0 0 #b692f6; } .legend { color: var(--muted); font-size: 12px; max-width: 1100px; }
.flash td { animation: flash 1.2s ease-out; }
@keyframes flash { from { outline: 2px solid #f79009; } to { outline: 0; } }
"""

_JS = """
document.querySelectorAll('input.ctx').forEach(function (box) {
  box.addEventListener('change', function () {
    document.getElementById(box.dataset.table).classList.toggle('hide-far', box.checked);
  });
});
document.querySelectorAll('.chip').forEach(function (chip) {
  chip.addEventListener('click', function () {
    var row = document.querySelector('#' + chip.dataset.table + ' tr[data-region="' + chip.dataset.region + '"]');
    if (!row) return;
    row.scrollIntoView({behavior: 'smooth', block: 'center'});
    row.classList.remove('flash'); void row.offsetWidth; row.classList.add('flash');
  });
});
"""


def _hue(k: int) -> int:
    return (k * 137 + 200) % 360


def _stat_cells(row: "Row") -> str:
    o, n = row.orig, row.new
    new_rel = fmt_err(n.rel_l2 if n else None)
    title = ""
    if n is not None and row.ref_kind == "new64":
        new_rel = f'<span class="basis">{new_rel}*</span>'
        title = ' title="vs the float64 run of the rewritten graph"'
    elif n is not None and row.ref and row.after is not None and row.ref != row.after.name:
        title = f' title="vs float64 {_e(row.ref)}"'
    cells = [fmt_err(o.rel_l2 if o else None), None,
             fmt_err(n.max_abs if n else (o.max_abs if o else None)),
             fmt_db(n.sqnr_db if n else (o.sqnr_db if o else None)),
             fmt_err(row.dev64)]
    out = [f'<td class="num">{cells[0]}</td>', f'<td class="num"{title}>{new_rel}</td>']
    out += [f'<td class="num">{c}</td>' for c in cells[2:]]
    return "".join(out)


def _graph(d: "Diff", g: "GraphDiff") -> str:
    rep = g.report
    tid = f"g{g.position}"
    n_b = len(rep.nodes_before)
    n_a = len(rep.nodes_after) if g.rewritten else n_b
    parts = [f'<section class="graph" id="sec-{tid}"><h2>Graph {g.position} '
             f'<small>(backend graph #{rep.index}): {n_b} &rarr; {n_a} nodes, {len(g.regions)} rewritten '
             f'region{"s" if len(g.regions) != 1 else ""}, lowering {_e(rep.lowering)}</small></h2>']
    if rep.fallback:
        parts.append(f'<p class="nothing">fell back: {_e(rep.fallback)}</p>')
    if g.numerics_error:
        parts.append(f'<p class="nothing">numerics unavailable: {_e(g.numerics_error)}</p>')
    if not g.rewritten:
        why = "; ".join(f"{s.kind} {s.site}: {s.reason}" for s in rep.skipped) or NOTHING_FOUND
        parts.append(f'<p class="nothing">no rewrites: {_e(why)}</p>')
    if g.regions:
        chips = "".join(
            f'<span class="chip" style="--rc:hsl({_hue(k)},75%,90%)" data-table="{tid}" data-region="{k}">'
            f'R{k}: {_e(reg.label(rep.rewrites))}</span>' for k, reg in enumerate(g.regions))
        parts.append(f'<div class="chips">{chips}</div>')
        recs = []
        for k, reg in enumerate(g.regions):
            for i in reg.records:
                r = rep.rewrites[i]
                recs.append(f'<tr><td>R{k}</td><td>{_e(r.kind)}</td><td>{_e(r.site)}</td>'
                            f'<td class="n">{r.params_before:,}</td><td class="n">{r.params_after:,}</td>'
                            f'<td class="n">{r.flops_saved:,}</td><td class="n">{r.cond:.3g}</td>'
                            f'<td class="n">{r.error_bound:.3g}</td></tr>')
        parts.append('<table class="recs"><tr><th>region</th><th>kind</th><th>site</th><th>params before</th>'
                     '<th>after</th><th>FLOPs/token saved</th><th>cond</th><th>error bound</th></tr>'
                     + "".join(recs) + "</table>")
    parts.append(f'<div class="controls"><label><input type="checkbox" class="ctx" data-table="{tid}" checked> '
                 f'hide unchanged nodes far from a rewrite</label></div>')
    parts.append(f'<table class="diff hide-far" id="{tid}"><colgroup><col class="mark"><col><col>'
                 + '<col class="num">' * 5 + '</colgroup><thead><tr><th></th><th>original graph</th>'
                 '<th>rewritten graph</th><th>orig rel</th><th>rewr rel</th><th>max abs</th>'
                 '<th>SQNR dB</th><th>dev64</th></tr></thead><tbody>')
    prev = None
    anchored: set[int] = set()
    first = g.rows[g.first_divergence] if g.first_divergence is not None else None
    for item in plan(g, 3):
        if item[0] == "gap":
            parts.append(f'<tr class="gap"><td colspan="8">&hellip; {item[1]} unchanged '
                         f'node{"s" if item[1] != 1 else ""} &hellip;</td></tr>')
            continue
        if item[0] == "derived":
            rows = item[1]
            reg = rows[0].region
            style = f' style="--rc:hsl({_hue(reg)},75%,90%)"' if reg is not None else ""
            mark = f"R{reg} +" if reg is not None else "+"
            parts.append(f'<tr class="gap derived rewritten"{style}><td class="mark">{mark}</td>'
                         f'<td class="node empty"></td><td class="node add">{_e(derived_summary(rows))}</td>'
                         f'<td colspan="5"></td></tr>')
            continue
        _, row, far = item
        cls = ["row", row.status.replace("+", "-")]
        style = ""
        if row.region is not None:
            cls.append("rewritten")
            cls.append(f"region-{row.region}")
            style = f' style="--rc:hsl({_hue(row.region)},75%,90%)"'
            if row.region != prev:
                cls.append("region-start")
        prev = row.region
        if row.diverged:
            cls.append("diverged")
        if row.basis_changed:
            cls.append("basis")
        if far:
            cls.append("far")
        rewired = row.status == "same" and row.before is not None and row.after is not None \
            and row.before.args != row.after.args
        if rewired:
            cls.append("rewired")
        mark = {"same": "", "replaced": "~", "removed": "&minus;", "added": "+", "removed+added": "&minus;+"}[row.status]
        if row.region is not None:
            mark = f"R{row.region} {mark}"
        if row.diverged:
            mark = "! " + mark
        left_cls = "node del" if row.status != "same" and row.before is not None else "node"
        right_cls = "node add" if (row.status != "same" or rewired) and row.after is not None else "node"
        if row.before is None:
            left_cls += " empty"
        if row.after is None:
            right_cls += " empty"
        right = node_text(row.after, html=True) if (row.status != "same" or rewired) \
            else '<span class="eq">=</span>'
        attrs = f' data-region="{row.region}"' if row.region is not None else ""
        if row.region is not None and row.region not in anchored and not far:
            anchored.add(row.region)
            attrs += f' id="{tid}-r{row.region}"'
        if row is first:
            attrs += f' id="{tid}-first-divergence"' if "id=" not in attrs else ""
        parts.append(f'<tr class="{" ".join(cls)}"{style}{attrs}><td class="mark">{mark}</td>'
                     f'<td class="{left_cls}">{node_text(row.before, html=True)}</td>'
                     f'<td class="{right_cls}">{right}</td>'
                     f'{_stat_cells(row)}</tr>')
    parts.append("</tbody></table></section>")
    return "\n".join(parts)


def _rules(d: "Diff") -> str:
    rows = []
    for r in d.rules():
        reasons = "".join(f"<li>{c}&times; {_e(s)}</li>" for s, c in r.reasons)
        rows.append(f'<tr><td>{_e(r.kind)}</td><td>{"yes" if r.enabled else "no"}</td>'
                    f'<td class="n">{r.matched}</td><td class="n">{r.applied}</td><td class="n">{r.skipped}</td>'
                    f'<td>{"<ul class=reasons>" + reasons + "</ul>" if reasons else ""}</td></tr>')
    t = d.totals()
    cost = [f'<tr><td>weights (elements)</td><td class="n">{t["params_before"]:,}</td>'
            f'<td class="n">{t["params_after"]:,}</td></tr>',
            f'<tr><td>weights ({_e(d.dtype or "-")} bytes)</td><td class="n">{fmt_bytes(t["bytes_before"])}</td>'
            f'<td class="n">{fmt_bytes(t["bytes_after"])}</td></tr>']
    if t["flops_before"] is not None:
        cost.append(f'<tr><td>matmul FLOPs (this input)</td><td class="n">{t["flops_before"]:,}</td>'
                    f'<td class="n">{t["flops_after"]:,}</td></tr>')
    cost.append(f'<tr><td>FLOPs saved per token (rewrites)</td><td class="n" colspan="2">'
                f'{t["flops_saved_per_token"]:,}</td></tr>')
    return ('<h2>Rules</h2><table class="rules"><tr><th>rule</th><th>enabled</th><th>matched</th>'
            '<th>applied</th><th>skipped</th><th>skip reasons</th></tr>' + "".join(rows) + "</table>"
            '<h2>Costs</h2><table class="rules"><tr><th></th><th>before</th><th>after</th></tr>'
            + "".join(cost) + "</table>")


def render_html(d: "Diff") -> str:
    summary = "\n".join(summary_lines(d, width=10_000))
    nothing = d.nothing_matched()
    body = ["<h1>bdpass diff</h1>",
            f'<p class="nothing">{_e(nothing)}</p>' if nothing else "",
            f'<pre class="summary">{_e(summary)}</pre>', _rules(d)]
    body += [_graph(d, g) for g in d.graphs]
    body.append(f'<p class="legend">{_e(LEGEND)} dev64: relative L2 distance between the float64 runs of '
                f'the rewritten and the original graph (factor rounding; large inside a BD span). '
                f'Purple bar: value in a changed basis (BD span).</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>bdpass diff</title><style>{_CSS}</style></head><body>\n"
            + "\n".join(body) + f"\n<script>{_JS}</script></body></html>\n")

