"""Random attention blocks and low-rank chains for the bd backend.

    python tests/fuzz.py --cases 500 [--seed 0] [--lowering aot_eager]

Each case builds a random module, compiles it with ``backend="bd"`` (cost model off, so
every legal rewrite is applied) and checks: compilation succeeds; the output's error
against a float64 eager run is within the rewrites' error bound times the fp32 eager
error (floored at 8 units of roundoff, the rounding level the bound refers to); the
report agrees with what the module contains (which pairs are legal, weight counts).
Exit status is non-zero if any case fails; failing seeds are printed.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(__file__))

import bdpass  # noqa: E402
from attention_models import MHA  # noqa: E402
from helpers import rel_l2  # noqa: E402
from lowrank_models import AsvdLinear, Conv1DChain, MatmulChain, SvdLinear  # noqa: E402


def make_case(seed: int):
    """(module, inputs, expected kinds) for one seed."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    if rng.random() < 0.6:
        head_dim = rng.choice([4, 6, 8, 12, 16])
        kvh = rng.choice([1, 2, 3])
        gqa = rng.choice([1, 2, 3])
        heads = kvh * gqa
        d = rng.choice([head_dim * heads + rng.randint(1, 24), 2 * head_dim + rng.randint(0, 16)])
        d = max(d, head_dim + 1)
        rope = rng.choice(["none", "full", "partial"])
        if rope == "partial" and head_dim % 4:
            rope = "none"
        if rope == "full" and head_dim % 2:
            rope = "none"
        attn = rng.choice(["sdpa", "eager", "sdpa_gqa"])
        kw = dict(d=d, heads=heads, head_dim=head_dim, gqa=gqa, bias=rng.random() < 0.5, attn=attn,
                  rope=rope, fused=rng.random() < 0.3, qk_norm=rng.random() < 0.15,
                  causal=rng.random() < 0.7, gqa_style=rng.choice(["expand", "repeat_interleave"]))
        model = MHA(**kw)
        x = torch.randn(rng.randint(1, 3), rng.randint(2, 12), d)
        expected = {"bd_vo"}
        if rope != "full" and not kw["qk_norm"]:
            expected.add("bd_qk")
        return model, (x,), expected, kw
    d_in, d_out = rng.randint(4, 96), rng.randint(4, 96)
    r = rng.randint(1, min(d_in, d_out) - 1) if min(d_in, d_out) > 1 else 1
    kind = rng.choice(["svd", "asvd", "conv1d", "matmul"])
    model = {"svd": lambda: SvdLinear(d_in, r, d_out, bias_v=rng.random() < 0.5, bias_u=rng.random() < 0.5),
             "asvd": lambda: AsvdLinear(d_in, r, d_out, bias=rng.random() < 0.5),
             "conv1d": lambda: Conv1DChain(d_in, r, d_out),
             "matmul": lambda: MatmulChain(d_in, r, d_out)}[kind]()
    x = torch.randn(rng.randint(1, 3), rng.randint(1, 9), d_in)
    expected = {"pifa"} if r < min(d_in, d_out) else set()
    return model, (x,), expected, {"chain": kind, "d_in": d_in, "r": r, "d_out": d_out}


def run_case(seed: int, lowering: str = "aot_eager") -> str | None:
    """None if the case passes, else a description of the failure."""
    model, args, expected, desc = make_case(seed)
    model = model.eval()
    opts = {"lowering": lowering, "cost_model": False, "min_saving": 0.0, "strict": True}
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(*[a.double() for a in args])
        eager = model(*args)
        torch._dynamo.reset()
        try:
            with bdpass.collect_reports() as rep:
                out = torch.compile(model, backend="bd", options=opts)(*args)
        except Exception as e:  # noqa: BLE001 - a fuzz failure to report
            return f"seed {seed} {desc}: compile failed: {type(e).__name__}: {e}"
        finally:
            torch._dynamo.reset()
    kinds = set(Counter(r.kind for r in rep.rewrites))
    # a rewrite over budget or for an ill-conditioned basis is a legitimate skip
    budget_skips = {s.kind for s in rep.skipped if "budget" in s.reason or "singular" in s.reason}
    if not (expected - budget_skips <= kinds <= expected):
        return f"seed {seed} {desc}: rewrites {sorted(kinds)} != expected {sorted(expected)}; report:\n{rep}"
    saved = sum(r.params_before - r.params_after for r in rep.rewrites)
    if rep.params_before - rep.params_after != saved:
        return f"seed {seed} {desc}: report totals inconsistent"
    bound = max([r.error_bound for r in rep.rewrites] + [1.5])
    e_bd, e_eager = rel_l2(out, ref), rel_l2(eager, ref)
    # error_bound is a first-order growth factor of rounding error, i.e. relative to the
    # rounding level of the computation (a few units of roundoff u), not to one run's
    # realized error, which can by chance be far smaller; hence the floor of 8u.
    floor = 8 * torch.finfo(torch.float32).eps / 2
    if not e_bd <= bound * max(e_eager, floor):
        return f"seed {seed} {desc}: error {e_bd:.3g} > bound {bound:.3g} x eager {e_eager:.3g}"
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lowering", default="aot_eager")
    a = p.parse_args()
    failures = []
    for s in range(a.seed, a.seed + a.cases):
        f = run_case(s, a.lowering)
        if f:
            failures.append(f)
            print(f, flush=True)
    print(f"{a.cases - len(failures)} passed, {len(failures)} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
