"""How fast are BD's projection forms without a fused kernel? (calibrates bdpass.cost)

    python benchmarks/bd_cpu_forms.py [--tokens 1024] [--dtype float32]

At DeepSeek-V2-Lite's K projection (d_in=512, 16 heads of d_h=128), each compiled with
Inductor in this process: the dense projection ``x @ W``; per-head pivots as two gathers
and a batched matmul plus the identity add; a shared row block as a GEMM over the other
rows plus a broadcast add. Prints the medians and ratios against the dense projection.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from bdpass.identities import bd_factors


def bench(f, *a, n=20):
    for _ in range(3):
        f(*a)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        f(*a)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--dtype", default="float32")
    a = p.parse_args()
    dt = getattr(torch, a.dtype)
    torch.manual_seed(0)
    d_in, H, g = 512, 16, 128
    W = torch.randn(d_in, H * g) / d_in ** 0.5
    heads = W.reshape(d_in, H, g).permute(1, 0, 2)
    f = bd_factors(heads, dtype=dt)
    fs = bd_factors(heads, dtype=dt, shared_slack=1e9)
    x, W = torch.randn(a.tokens, d_in, dtype=dt), W.to(dt)
    rows, rest, wr = f.rows.reshape(-1), f.rest_rows.reshape(-1), f.w_rest
    S, R = fs.rows[0], fs.rest_rows[0]
    wcat = fs.w_rest.permute(1, 0, 2).reshape(d_in - g, H * g)

    def dense(x, W):
        return x @ W

    def per_head(x, rows, rest, wr):
        xs = torch.index_select(x, -1, rows)
        xr = torch.index_select(x, -1, rest).unflatten(-1, (H, d_in - g))
        return torch.einsum("...hr,hrg->...hg", xr, wr).flatten(-2) + xs

    def shared(x, S, R, wcat):
        return ((x[..., R] @ wcat).unflatten(-1, (H, g)) + x[..., S].unsqueeze(-2)).flatten(-2)

    with torch.no_grad():
        t0 = bench(torch.compile(dense), x, W)
        t1 = bench(torch.compile(per_head), x, rows, rest, wr)
        t2 = bench(torch.compile(shared), x, S, R, wcat)
    print(f"tokens={a.tokens} {a.dtype} torch {torch.__version__}: dense {t0 * 1e3:.2f} ms; "
          f"per-head gather+bmm {t1 * 1e3:.2f} ms ({t0 / t1:.2f}x); shared block {t2 * 1e3:.2f} ms ({t0 / t2:.2f}x)")


if __name__ == "__main__":
    main()
