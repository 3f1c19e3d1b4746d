"""Quickstart: compile a small low-rank model with plain Inductor and with ``bd``.

    python examples/quickstart.py [--d 1024] [--rank 0.5] [--tokens 256] [--layers 4] [--all]

Builds the model offline (random weights), then prints the parameters saved, the relative
L2 error of both compiled models against a float64 eager run, the speed ratio
bd / inductor (medians over repeated runs in this process), and bd's report table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bdpass


class LowRankLinear(nn.Module):
    """A linear layer stored as two factors (as SVD-compressed checkpoints are)."""

    def __init__(self, d_in: int, r: int, d_out: int):
        super().__init__()
        self.v_proj = nn.Linear(d_in, r, bias=False)
        self.u_proj = nn.Linear(r, d_out, bias=True)

    def forward(self, x):
        return self.u_proj(self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d: int, r: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = LowRankLinear(d, r, 2 * d)
        self.down = LowRankLinear(2 * d, r, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Model(nn.Module):
    def __init__(self, d: int, r: int, layers: int):
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d, r) for _ in range(layers)])

    def forward(self, x):
        return self.blocks(x)


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - ref) / torch.linalg.vector_norm(ref))


def bench(fns: dict, x, reps: int) -> dict:
    """Median seconds per call of each function, calls interleaved (one of each per round),
    so that a machine that changes speed affects all of them alike."""
    for _ in range(3):
        for fn in fns.values():
            fn(x)
    times: dict = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(reps):
        # the order alternates: the first call of a round runs measurably slower (~1-2%)
        for k, fn in (items if i % 2 == 0 else items[::-1]):
            t0 = time.perf_counter()
            fn(x)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--rank", type=float, default=0.5, help="r as a fraction of d")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--all", action="store_true",
                   help="apply every legal rewrite (cost_model off), even where estimated slower")
    args = p.parse_args()

    torch.manual_seed(0)
    r = max(1, int(args.d * args.rank))
    model = Model(args.d, r, args.layers).eval()
    x = torch.randn(1, args.tokens, args.d)

    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
        torch._dynamo.reset()
        # the first function compiled in a process runs slower for good: a throwaway first,
        # so that neither measured model is it
        torch.compile(lambda t: t * 2, backend="inductor")(torch.randn(2))
        f_ind = torch.compile(model, backend="inductor")
        y_ind = f_ind(x)
        with bdpass.collect_reports() as report:
            f_bd = torch.compile(copy.deepcopy(model), backend="bd",
                                 options={"cost_model": False} if args.all else None)
            y_bd = f_bd(x)
        t = bench({"inductor": f_ind, "bd": f_bd}, x, args.reps)
        t_ind, t_bd = t["inductor"], t["bd"]

    before, after = report.params_before, report.params_after
    print(f"model: {args.layers} blocks, d={args.d}, rank={r}, tokens={args.tokens}, torch {torch.__version__}")
    print(f"weights: {before:,} -> {after:,} ({100 * (before - after) / before:.1f}% saved)")
    print(f"relative L2 error vs float64: inductor {rel_l2(y_ind, ref):.3e}   bd {rel_l2(y_bd, ref):.3e}")
    print(f"speed: bd / inductor = {t_ind / t_bd:.3f}x  (inductor {t_ind * 1e3:.2f} ms, bd {t_bd * 1e3:.2f} ms, "
          f"medians of {args.reps} interleaved calls, CPU times are indicative only)")
    print()
    print(report)


if __name__ == "__main__":
    main()
