"""Zoo: what ``bd`` does to tiny Hugging Face models built from configs (random weights).

    python benchmarks/zoo.py [--families gpt2,llama,...] [--dtypes float32,bfloat16,float16]
                             [--markdown]

Every legal rewrite is applied (cost_model off). Per model: rewrites applied by kind, weights saved, and the relative-L2 error of bd and of
plain Inductor against a float64 eager run of the same weights (same process), with
their ratio. Models come from ``tests/zoo.py`` (2 layers, hidden 64, 4 heads of 16).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import bdpass  # noqa: E402
import zoo  # noqa: E402
from helpers import first_tensor, rel_l2, to64  # noqa: E402


def run(family: str, dtype: torch.dtype) -> dict:
    kw = {"experts_implementation": "batched_mm"} if family.startswith("deepseek") else {}
    model, args, kwargs = zoo.build(family, dtype=torch.float32, **kw)
    model = model.to(dtype)
    ref_model = copy.deepcopy(model).double()     # the same (rounded) weights, in float64
    args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    kwargs = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
              for k, v in kwargs.items()}
    with torch.no_grad():
        ref = first_tensor(ref_model(*to64(args), **to64(kwargs)))
        torch._dynamo.reset()
        ind = first_tensor(torch.compile(model, backend="inductor")(*args, **kwargs))
        torch._dynamo.reset()
        with bdpass.collect_reports() as rep:
            bd = first_tensor(torch.compile(model, backend="bd", options={"cost_model": False})(*args, **kwargs))
        torch._dynamo.reset()
    kinds = Counter(r.kind for r in rep.rewrites)
    e_bd, e_ind = rel_l2(bd, ref), rel_l2(ind, ref)
    return {"family": family, "dtype": str(dtype).replace("torch.", ""), "rewrites": dict(kinds),
            "params_before": rep.params_before, "params_after": rep.params_after,
            "err_bd": e_bd, "err_inductor": e_ind, "ratio": e_bd / e_ind if e_ind else float("nan"),
            "skipped": sorted({s.reason for s in rep.skipped})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(zoo.FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16,float16")
    p.add_argument("--markdown", action="store_true")
    a = p.parse_args()
    rows = []
    for fam in a.families.split(","):
        for dt in a.dtypes.split(","):
            try:
                rows.append(run(fam, getattr(torch, dt)))
            except Exception as e:  # report, keep going
                rows.append({"family": fam, "dtype": dt, "error": f"{type(e).__name__}: {e}"[:120]})
            r = rows[-1]
            if "error" in r:
                print(f"{fam:12s} {dt:9s} ERROR {r['error']}", flush=True)
            else:
                rw = " ".join(f"{k}x{v}" for k, v in sorted(r["rewrites"].items())) or "-"
                saved = r["params_before"] - r["params_after"]
                print(f"{fam:12s} {r['dtype']:9s} {rw:24s} saved {saved:6d} "
                      f"bd {r['err_bd']:.2e} ind {r['err_inductor']:.2e} ratio {r['ratio']:.2f}", flush=True)
    if a.markdown:
        print()
        print("| model | dtype | rewrites | weights saved | bd err | inductor err | ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['family']} | {r['dtype']} | error: {r['error']} | | | | |")
                continue
            rw = ", ".join(f"{k} x{v}" for k, v in sorted(r["rewrites"].items())) or "none"
            saved = r["params_before"] - r["params_after"]
            pct = 100 * saved / r["params_before"] if r["params_before"] else 0
            print(f"| {r['family']} | {r['dtype']} | {rw} | {saved:,} ({pct:.1f}%) | {r['err_bd']:.2e} | "
                  f"{r['err_inductor']:.2e} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
