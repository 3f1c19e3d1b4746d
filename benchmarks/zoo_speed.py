"""Zoo with default options: is any model slower under ``bd`` than under plain Inductor?

    python benchmarks/zoo_speed.py [--families gpt2,llama,...] [--dtypes float32,bfloat16] [--repeats 100]

Each family of ``tests/zoo.py`` (tiny random models) is compiled with ``backend="bd"``
(default options: the cost model times every candidate rewrite on this machine and keeps
only those that pay) and with ``backend="inductor"``; the speed ratio inductor / bd is the
median of interleaved calls (``_bench``: one code object per compiled function, order
alternating), next to a control: two Inductor compilations of the same model, timed the
same way (their ratio is the measurement's noise floor); bd is compared with the geometric
mean of the two. Also lists what bd applied.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

import bdpass  # noqa: E402
import zoo  # noqa: E402
from _bench import entry, interleaved, warm_compiler  # noqa: E402


def _cast(v, dtype):
    return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(zoo.FAMILIES))
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=100)
    a = p.parse_args()
    warm_compiler()             # no measured function is the first one compiled (_bench)
    print("| model | dtype | bd applied | speed bd / Inductor | control: Inductor / Inductor |")
    print("|---|---|---|---|---|")
    worst, control = [], []
    for fam in a.families.split(","):
        for dt in a.dtypes.split(","):
            dtype = getattr(torch, dt)
            kw = {"experts_implementation": "batched_mm"} if fam.startswith("deepseek") else {}
            model, args, kwargs = zoo.build(fam, dtype=torch.float32, **kw)
            model = model.to(dtype)
            args = tuple(_cast(x, dtype) for x in args)
            kwargs = {k: _cast(v, dtype) for k, v in kwargs.items()}
            with torch.no_grad():
                torch._dynamo.reset()
                fns = {"ind": torch.compile(entry("ind"), backend="inductor"),
                       "bd": torch.compile(entry("bd"), backend="bd"),
                       "ind2": torch.compile(entry("ind2"), backend="inductor")}
                # compiled in this order (torch.compile is lazy: the first call compiles), so
                # that bd sits between the two Inductor compilations it is compared with
                fns["ind"](model, *args, **kwargs)
                with bdpass.collect_reports() as rep:
                    fns["bd"](model, *args, **kwargs)
                fns["ind2"](model, *args, **kwargs)
                t = interleaved({k: (lambda f=f: f(model, *args, **kwargs)) for k, f in fns.items()}, a.repeats,
                                warmup=3)
                torch._dynamo.reset()
            # bd against both Inductor compilations (their geometric mean): either one alone
            # carries its own compile-order and position effects, which the control shows
            ratio, ctl = (t["ind"] * t["ind2"]) ** 0.5 / t["bd"], t["ind"] / t["ind2"]
            worst.append(ratio)
            control.append(ctl)
            kinds = ", ".join(f"{k} x{v}" for k, v in sorted(Counter(r.kind for r in rep.rewrites).items())) or "none"
            print(f"| {fam} | {dt} | {kinds} | {ratio:.2f}x | {ctl:.2f}x |", flush=True)
    print(f"\nbd / Inductor: slowest {min(worst):.2f}x, median {statistics.median(worst):.2f}x; "
          f"control (two Inductor compilations): {min(control):.2f}x-{max(control):.2f}x")


if __name__ == "__main__":
    main()
