"""Zoo with default options: is any model slower under ``bd`` than under plain Inductor?

    python benchmarks/zoo_speed.py [--families gpt2,llama,...] [--dtypes float32,bfloat16] [--repeats 30]

Each family of ``tests/zoo.py`` (tiny random models) is compiled with ``backend="bd"``
(default options: the cost model times every candidate rewrite on this machine and keeps
only those that pay) and with ``backend="inductor"``; the speed ratio inductor / bd is the
median of interleaved calls. Also lists what bd applied.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import bdpass  # noqa: E402
import zoo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(zoo.FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    print("| model | dtype | bd applied | speed bd / Inductor |")
    print("|---|---|---|---|")
    worst = []
    for fam in a.families.split(","):
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            kw = {"experts_implementation": "batched_mm"} if fam.startswith("deepseek") else {}
            model, args, kwargs = zoo.build(fam, dtype=torch.float32, **kw)
            model = model.to(dtype)
            args = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)
            with torch.no_grad():
                torch._dynamo.reset()
                ind = torch.compile(model, backend="inductor")
                with bdpass.collect_reports() as rep:
                    bd = torch.compile(model, backend="bd")
                    bd(*args, **kwargs)
                ind(*args, **kwargs)
                ts = {"bd": [], "ind": []}
                for _ in range(3):
                    bd(*args, **kwargs)
                    ind(*args, **kwargs)
                for i in range(a.repeats):
                    # the order alternates: the first call of a round runs measurably slower (~1-2%)
                    for k, f in ((("bd", bd), ("ind", ind)) if i % 2 == 0 else (("ind", ind), ("bd", bd))):
                        t0 = time.perf_counter()
                        f(*args, **kwargs)
                        ts[k].append(time.perf_counter() - t0)
                torch._dynamo.reset()
            ratio = statistics.median(ts["ind"]) / statistics.median(ts["bd"])
            worst.append(ratio)
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(Counter(r.kind for r in rep.rewrites).items())) or "none"
            print(f"| {fam} | {dt} | {kinds} | {ratio:.2f}x |", flush=True)
    print(f"\nslowest {min(worst):.2f}x, median {statistics.median(worst):.2f}x")


if __name__ == "__main__":
    main()
