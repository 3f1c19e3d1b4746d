"""Timing helpers shared by the benchmarks.

* :func:`entry` gives each compiled function its own code object. Dynamo keeps its compiled
  entries per code object, so two ``torch.compile`` wrappers of one module share one list of
  entries and each call walks the other's guards first, depending on compile order: measured
  on the zoo's tiny models, that alone moved ratios of identical graphs by up to 8%.
* :func:`interleaved` times functions in rounds, the order rotated and reversed from round to
  round (``bdpass.timing.round_order``: each function runs in every position; the first call
  of a round ran 1-2% slower, and with three functions merely reversing the order kept the
  middle one in the middle, which put an Inductor graph at 0.95-0.99x of its twin), and
  returns medians.

* :func:`warm_compiler` compiles and runs a throwaway function: the first function compiled
  in a process runs slower for good (2 us of 25 us on a 2-linear graph, 2000 interleaved
  calls; 3-9% on the zoo's DeepSeek-V3 at 0.5 ms per call), whichever backend compiled it,
  and a warm-up before any measured compilation takes that out (after ``torch._dynamo.reset()``
  too). Later compilations keep a smaller trend (on the zoo's sub-millisecond models, the
  earlier of two identical Inductor compilations ran 0-12% slower), so a comparison puts the
  function under test between two compilations of the reference (``zoo_speed.py``: Inductor,
  bd, Inductor, compared with their geometric mean). Compiled first, bd came out at
  0.92-1.01x of Inductor on unchanged graphs; in the middle, 0.95-1.04x (median 1.00x).

Measured floor: two Inductor compilations of the same tiny model, timed this way, differ by
up to ~2.5% on the 2-core CPU machine (``benchmarks/zoo_speed.py`` prints that control).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from bdpass.timing import round_order


def warm_compiler() -> None:
    """Compile and run a throwaway function once (see the module docstring)."""
    import torch

    f = torch.compile(entry("warm_compiler"), backend="inductor")
    with torch.no_grad():
        f(torch.nn.Linear(8, 8), torch.randn(2, 8))


def entry(tag: str) -> Callable:
    """``run(m, *args, **kwargs) -> m(*args, **kwargs)`` with a code object of its own."""
    ns: dict = {}
    exec(f"def run_{tag}(m, *args, **kwargs):\n    return m(*args, **kwargs)\n", ns)
    return ns[f"run_{tag}"]


def interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each zero-argument function in ``fns``."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    ts: dict = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(repeats):
        for k, f in round_order(items, i):
            t0 = time.perf_counter()
            f()
            ts[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in ts.items()}
