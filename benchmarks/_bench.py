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

Measured floor: two Inductor compilations of the same tiny model, timed this way, differ by
up to ~2.5% on the 2-core CPU machine (``benchmarks/zoo_speed.py`` prints that control).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

from bdpass.timing import round_order


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
