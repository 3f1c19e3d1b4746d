"""What validating the rewritten graph adds to compile time, on the zoo.

    python benchmarks/validate_overhead.py [--families gpt2,llama,...] [--lowering inductor]

Each family of ``tests/zoo.py`` is compiled with ``backend="bd"`` (every legal rewrite,
``cost_model`` off) and run once; the first call's wall time is the compile time. The
float64 validation's own time (``GraphReport.validate_seconds``, summed over graphs) is
reported as a share of it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import bdpass  # noqa: E402
import zoo  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(zoo.FAMILIES))
    p.add_argument("--lowering", default="inductor")
    a = p.parse_args()
    shares = []
    print("| model | graphs | rewrites | compile s | validation s | share |")
    print("|---|---|---|---|---|---|")
    for fam in a.families.split(","):
        model, args, kwargs = zoo.build(fam)
        torch._dynamo.reset()
        f = torch.compile(model, backend="bd", options={"cost_model": False, "lowering": a.lowering})
        with torch.no_grad(), bdpass.collect_reports() as rep:
            t0 = time.perf_counter()
            f(*args, **kwargs)
            total = time.perf_counter() - t0
        torch._dynamo.reset()
        val = sum(g.validate_seconds for g in rep.graphs)
        shares.append(val / total)
        print(f"| {fam} | {len(rep.graphs)} | {len(rep.rewrites)} | {total:.2f} | {val:.3f} | {100 * val / total:.1f}% |")
    print(f"\nmax share {100 * max(shares):.1f}%, mean {100 * sum(shares) / len(shares):.1f}%")


if __name__ == "__main__":
    main()
