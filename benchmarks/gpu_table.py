#!/usr/bin/env python
"""The README's GPU table (markdown) from a ``gpu.json`` written by ``benchmarks/gpu_suite.py``.

    python benchmarks/gpu_table.py [path/to/gpu.json]      # default: benchmarks/results/gpu.json

Prints a one-line provenance, the checks, one row per measured entry (Inductor and bd
times, speed ratio, FLOP-model ideal, the form the report says was applied) and the
targets. Standard library only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

SECTION_TITLES = {
    "bd_kv_projection": "BD K/V projection",
    "bd_kv_module": "MLA decode step (K/V from latent)",
    "pifa_layer": "PIFA layer",
    "mla_block": "MLA block prefill",
}
DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _num(x, fmt: str) -> str:
    if isinstance(x, (int, float)) and math.isfinite(x):
        return format(x, fmt)
    return "-"


def _shape(section: str, e: dict) -> str:
    if section == "bd_kv_projection":
        return f"{e.get('d_in', '?')} -> {e.get('heads_in_dry_run', e.get('heads'))}x{e.get('d_h', '?')}"
    dims = e.get("dims") or {}
    if section == "bd_kv_module":
        return (f"{e.get('heads_in_dry_run', e.get('heads'))} heads, latent {dims.get('latent', '?')}, "
                f"{dims.get('nope', '?')}+{dims.get('v', '?')}")
    if section == "pifa_layer":
        return f"d={e.get('d', '?')}, r={e.get('r', '?')}"
    return (f"hidden {dims.get('hidden', '?')}, {dims.get('heads', '?')} heads, latent {dims.get('latent', '?')}")


def _form(section: str, e: dict) -> str:
    rf = e.get("report_form") or {}
    parts = []
    if section == "bd_kv_projection":
        parts.append(e.get("form", "?").replace("_", "-") + " (bd_project)")
        bl = e.get("bd_linear") or {}
        if isinstance(bl.get("ratio_vs_inductor"), (int, float)):
            parts.append(f"bd_linear {bl['ratio_vs_inductor']:.2f}x")
        bf = e.get("backend_form") or {}
        if bf.get("lowering"):
            parts.append(f"backend=bd: {bf['lowering']}")
    else:
        if rf.get("bd_basis"):
            parts.append("/".join(b.replace("_", "-") for b in rf["bd_basis"]))
        if rf.get("kinds"):
            parts.append("+".join(rf["kinds"]))
        if rf.get("lowering"):
            parts.append(rf["lowering"])
        if not e.get("rewrites") and "rewrites" in e:
            parts.append("NOT REWRITTEN")
    return "; ".join(parts)


def _m(e: dict):
    return e.get("M", e.get("tokens"))


def render(data: dict) -> str:
    out = []
    prov = (f"{data.get('device')}, torch {data.get('torch')}, triton {data.get('triton')}"
            f" (`python benchmarks/gpu_suite.py`, {str(data.get('started', ''))[:10]}"
            f"{', commit ' + str(data['git_commit'])[:10] if data.get('git_commit') else ''})")
    if data.get("dry_run"):
        prov += " -- DRY RUN on the CPU: plumbing only, these figures mean nothing"
    if data.get("status") != "complete":
        prov += f" -- status: {data.get('status')} (partial record)"
    out.append(prov)
    out.append("")
    kc = data.get("kernel_checks") or {}
    cc = data.get("compile_checks") or {}
    gp = data.get("gpu_pytest") or {}
    out.append(f"Checks: kernels {kc.get('passed', 0)} passed, {kc.get('failed', 0)} failed; "
               f"torch.compile (bd vs Inductor vs float64) {cc.get('passed', 0)} passed, {cc.get('failed', 0)} failed"
               f"{', ' + str(cc['skipped']) + ' skipped' if cc.get('skipped') else ''}; "
               f"`pytest -m gpu`: {gp.get('summary') or 'not run'}.")
    out.append("")
    out.append("| measurement | shape | dtype | M / tokens | Inductor ms | bd ms | speed vs Inductor | "
               "FLOP-model ideal | form |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for section, title in SECTION_TITLES.items():
        entries = [e for e in data.get(section) or [] if "ratio_vs_inductor" in e]
        entries.sort(key=lambda e: (e.get("heads", 0), e.get("dtype", ""), _m(e) or 0))
        for e in entries:
            out.append(f"| {title} | {_shape(section, e)} | {DTYPES.get(e.get('dtype'), e.get('dtype'))} | "
                       f"{_m(e)} | {_num(e.get('ms_inductor'), '.4f')} | {_num(e.get('ms_bd'), '.4f')} | "
                       f"{_num(e.get('ratio_vs_inductor'), '.2f')}x | {_num(e.get('ideal_gain'), '.3f')}x | "
                       f"{_form(section, e)} |")
        for e in data.get(section) or []:
            if "ratio_vs_inductor" not in e and e.get("error"):
                out.append(f"| {title} | {e.get('params')} | | | | | error: {str(e['error'])[:80]} | | |")
    skipped = data.get("skipped") or []
    if skipped:
        out.append("")
        out.append(f"{len(skipped)} entries skipped (time budget or checks budget).")
    out.append("")
    out.append("| target | met | worst | entries |")
    out.append("|---|---|---|---|")
    for t in data.get("targets") or []:
        met = {True: "yes", False: "**no**", None: "not measured"}[t.get("met")]
        if t.get("met") is not None and not t.get("complete", True):
            met += " (incomplete)"
        worst = _num(t.get("worst"), ".3f") if isinstance(t.get("worst"), float) else str(t.get("worst"))
        where = ", ".join(f"{k}={v}" for k, v in (t.get("worst_entry") or {}).items())
        out.append(f"| {t.get('description')} | {met} | {worst}{' (' + where + ')' if where else ''} | {t.get('n')} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    a = p.parse_args(argv)
    data = json.loads(Path(a.path).read_text())
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
