"""One low-rank chain ``u(v(x))`` (d -> r -> d, bias on the second): bd against Inductor.

    python benchmarks/pifa_chain.py [--d 2048] [--rank 0.5] [--tokens 64,512,2048] [--dtype float32]

For each token count: weights before/after, relative-L2 error against a float64 eager run
for bd and for plain Inductor (same process, same inputs), and the speed ratio
inductor_time / bd_time (medians of interleaved runs; CPU times are indicative only).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import bdpass


class Chain(torch.nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.v_proj = torch.nn.Linear(d, r, bias=False)
        self.u_proj = torch.nn.Linear(r, d)

    def forward(self, x):
        return self.u_proj(self.v_proj(x))


def rel(a, ref):
    return float(torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--rank", type=float, default=0.5)
    p.add_argument("--tokens", default="64,512,2048")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--reps", type=int, default=15)
    a = p.parse_args()
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    r = int(a.d * a.rank)
    model = Chain(a.d, r).eval()
    ref_model = copy.deepcopy(model).double()
    model = model.to(dt)
    print(f"chain d={a.d} r={r} {a.dtype} torch {torch.__version__} threads {torch.get_num_threads()}")
    for M in [int(t) for t in a.tokens.split(",")]:
        x = torch.randn(M, a.d)
        with torch.no_grad():
            ref = ref_model(x.double())
            x = x.to(dt)
            torch._dynamo.reset()
            fi = torch.compile(model, backend="inductor")
            yi = fi(x)
            with bdpass.collect_reports() as rep:
                fb = torch.compile(copy.deepcopy(model), backend="bd")
                yb = fb(x)
            ti, tb = [], []
            for _ in range(3):
                fi(x), fb(x)
            for i in range(a.reps):
                # the order alternates: the first call of a round runs measurably slower (~1-2%)
                for f, ts in (((fi, ti), (fb, tb)) if i % 2 == 0 else ((fb, tb), (fi, ti))):
                    t = time.perf_counter(); f(x); ts.append(time.perf_counter() - t)
        applied = [rw.kind for rw in rep.rewrites]
        skipped = [s.reason for s in rep.skipped]
        mi, mb = statistics.median(ti), statistics.median(tb)
        print(f"M={M:6d} rewrites={applied or skipped} weights {rep.params_before:,} -> {rep.params_after:,} "
              f"err bd {rel(yb, ref):.2e} inductor {rel(yi, ref):.2e} (ratio {rel(yb, ref) / rel(yi, ref):.2f}) "
              f"speed {mi / mb:.3f}x (inductor {mi * 1e3:.2f} ms, bd {mb * 1e3:.2f} ms)", flush=True)


if __name__ == "__main__":
    main()
