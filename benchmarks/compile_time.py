"""Compile time of ``backend="bd"`` against ``backend="inductor"`` on an MLA attention block at
DeepSeek-V2-Lite's widths (``bd_speed.MLA``), and what it is spent on.

    BDPASS_CACHE_DIR=$(mktemp -d) python benchmarks/compile_time.py [--tokens 1024]

Per dtype: Inductor's compile (first call), bd's with a cold timing cache (the measured
decisions time each candidate lowering once per site shape and machine) and again with the
cache warm; the report's ``timing_seconds`` and ``validate_seconds`` (the float64 check of
the rewritten graph on the example inputs). Point ``BDPASS_CACHE_DIR`` at an empty
directory for a cold first compile.

Measured (2-core AMD EPYC, torch 2.13, 1024 tokens): fp32 Inductor 3.5 s, bd cold 5.5 s
(timing 0.82 s, validation 2.02 s; bd_qk and bd_vo applied), bd warm 4.4 s; bf16 (BD
declined, nothing to validate) Inductor 0.4 s, bd cold 1.3 s (timing 0.82 s), warm 0.5 s.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import bdpass  # noqa: E402
from bd_speed import MLA, init_  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args()
    for dt in (torch.float32, torch.bfloat16):
        m = init_(MLA()).to(dt).eval()
        x = torch.randn(1, a.tokens, 2048, dtype=dt)
        with torch.no_grad():
            torch._dynamo.reset()
            t0 = time.perf_counter()
            torch.compile(m, backend="inductor")(x)
            ti = time.perf_counter() - t0
            times, reps = [], []
            for _ in range(2):               # cold, then warm timing cache
                torch._dynamo.reset()
                with bdpass.collect_reports() as rep:
                    t0 = time.perf_counter()
                    torch.compile(m, backend="bd")(x)
                    times.append(time.perf_counter() - t0)
                reps.append(rep)
            torch._dynamo.reset()
        g = [r.graphs[0] for r in reps]
        print(f"{str(dt)[6:]}: inductor {ti:.1f} s; bd {times[0]:.1f} s (timing {g[0].timing_seconds:.2f} s, "
              f"validation {g[0].validate_seconds:.2f} s), again {times[1]:.1f} s (timing {g[1].timing_seconds:.2f} s, "
              f"validation {g[1].validate_seconds:.2f} s); applied {[r.kind for r in reps[0].rewrites] or 'nothing'}")


if __name__ == "__main__":
    main()
