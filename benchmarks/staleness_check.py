"""Per-call cost of the stale-weight check (``bdpass.runtime.RewrittenGraph``).

    python benchmarks/staleness_check.py [--params 8,64,512]

Times the check alone, on unchanged weights, for graphs whose factors come from the
given number of source parameters; prints microseconds per call and per parameter.
"""
from __future__ import annotations

import argparse
import time

import torch

from bdpass.runtime import DerivedGroup, RewrittenGraph


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="8,64,512")
    p.add_argument("--calls", type=int, default=20000)
    a = p.parse_args()
    for n in [int(v) for v in a.params.split(",")]:
        args = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(n)]
        groups = [DerivedGroup(f"g{i}", (2 * i, 2 * i + 1), lambda a: [], []) for i in range(n // 2)]
        g = RewrittenGraph(lambda *a: None, groups, lambda *a: None, 0)
        g.snapshot(args)
        t = time.perf_counter()
        for _ in range(a.calls):
            g._refresh(args)
        dt = (time.perf_counter() - t) / a.calls
        print(f"{n:5d} source parameters: {dt * 1e6:8.2f} us per call, {dt * 1e6 / n:.3f} us per parameter")


if __name__ == "__main__":
    main()
