"""How the measured decisions of ``bdpass.timing`` behave on a busy machine.

    python benchmarks/timing_noise.py [--tokens 1024] [--reps 4] [--scenarios quiet,bursty,steady]
                                      [--out FILE]

The candidates are the ones the backend itself times (captured from ``bdpass.explain`` on
``bd_speed``'s blocks: the PIFA pair d=1024, r=512 and the MLA block's ``kv_b_proj`` on the
latent width, fp32 and bf16). Each scenario samples every site ``--reps`` times:

* ``quiet``: nothing added (other jobs of the machine may run);
* ``bursty``: 3 processes alternating busy and idle bursts of 50-200 ms (more busy processes
  than cores on a 2-core machine);
* ``steady``: 3 processes busy all the time.

For each sample it prints the ratio (original / candidate) of the medians, of the floors
(fastest calls), the verdict of :func:`bdpass.timing.judge` on those rounds (``MAX_REPEATS``
interleaved rounds), and the verdict of a whole measurement as the backend makes it (its
first batch bounded in time, then extra batches while unsure; no cache). ``--out`` also keeps
every round's seconds.

    python benchmarks/timing_noise.py --judge FILE [FILE ...]

judges the recorded rounds of ``--out`` files again with the current
:func:`bdpass.timing.judge`, against the truth of each site (the median of its quiet samples'
median ratios): per scenario, how many verdicts were sure and right, unsure, or on the wrong
side, next to the verdicts recorded when the rounds were taken (the rule of that time).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

BURNER = """
import random, sys, time
steady = sys.argv[1] == "steady"
rng = random.Random()
while True:
    end = time.perf_counter() + rng.uniform(0.05, 0.2)
    while time.perf_counter() < end:
        pass
    if not steady:
        time.sleep(rng.uniform(0.05, 0.2))
"""


@contextlib.contextmanager
def burners(n: int = 3, steady: bool = False):
    """``n`` CPU-burning processes for the duration of the block (bursts of 50-200 ms busy,
    then as long idle; ``steady``: busy all the time)."""
    procs = [subprocess.Popen([sys.executable, "-c", BURNER, "steady" if steady else "bursty"])
             for _ in range(n)]
    try:
        time.sleep(0.2)
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def capture(models) -> dict:
    """{problem (JSON): (problem, candidates)} of every measurement ``bdpass.explain`` makes."""
    import bdpass
    from bdpass import timing

    got = {}

    def record(device, problem, candidates, **kw):
        got[json.dumps(problem, sort_keys=True)] = (problem, dict(candidates))
        return {n: (1.0 if n == "original" else 2.0) for n in candidates}
    real = timing.measure
    timing.measure = record
    try:
        for model, x in models:
            bdpass.explain(model, x, options={"validate": False, "lowering": "aot_eager"})
    finally:
        timing.measure = real
    return got


def judge_again(paths) -> int:
    """See the module docstring (``--judge``)."""
    from collections import Counter

    from bdpass import timing

    th = timing.threshold()
    table: Counter = Counter()
    for path in paths:
        with open(path) as f:
            rows = json.load(f)["rows"]
        quiet: dict = {}
        for r in rows:
            if r["scenario"] == "quiet":
                quiet.setdefault((r["op"], r["dtype"], r["candidate"]), []).append(r["median_ratio"])
        truth = {k: statistics.median(v) for k, v in quiet.items()}
        for r in rows:
            t = truth.get((r["op"], r["dtype"], r["candidate"]))
            if t is None:
                continue
            side = "pays" if t >= th else "slower"
            now = timing.judge(r["rounds"], r["candidate"], bound=r.get("bound")).state
            for rule, state in (("recorded", r["verdict"]), ("current", now)):
                out = ("right" if state == side else "unsure" if state in ("unsure", "implausible")
                       else "WRONG")
                table[(r["scenario"], rule, out)] += 1
            if now in ("pays", "slower") and now != side:
                print(f"wrong: {path} {r['scenario']} {r['rep']} {r['op']} {r['dtype']} {r['candidate']}: "
                      f"{now}, truth {t:.2f}x")
    print(f"{'scenario':8s} {'rule':9s} {'right':>6s} {'unsure':>7s} {'WRONG':>6s}")
    for scen in ("quiet", "bursty", "steady"):
        for rule in ("recorded", "current"):
            c = [table[(scen, rule, o)] for o in ("right", "unsure", "WRONG")]
            if any(c):
                print(f"{scen:8s} {rule:9s} {c[0]:6d} {c[1]:7d} {c[2]:6d}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--scenarios", default="quiet,bursty,steady")
    p.add_argument("--out", default=None)
    p.add_argument("--judge", nargs="+", default=None, metavar="FILE",
                   help="judge the rounds recorded in these --out files again, then exit")
    a = p.parse_args()
    if a.judge:
        return judge_again(a.judge)
    os.environ.setdefault("BDPASS_CACHE_DIR", tempfile.mkdtemp(prefix="bdpass-noise-"))
    import bd_speed
    from bdpass import timing

    M = a.tokens
    models = []
    for dt in (torch.float32, torch.bfloat16):
        models.append((bd_speed.init_(bd_speed.LowRank(1024, 512)).to(dt), torch.randn(M, 1024, dtype=dt)))
        models.append((bd_speed.init_(bd_speed.MLA(hidden=512)).to(dt), torch.randn(1, M, 512, dtype=dt)))
    sites = capture(models)
    rec = {"machine": timing.machine(torch.device("cpu")), "command": " ".join(["python"] + sys.argv), "rows": []}
    print(rec["machine"])
    cpu = torch.device("cpu")
    for scen in a.scenarios.split(","):
        ctx = contextlib.nullcontext() if scen == "quiet" else burners(3, steady=(scen == "steady"))
        with ctx:
            for rep in range(a.reps):
                for k, (problem, cands) in sites.items():
                    cands = {n: f for n, f in cands.items() if n != "per_head"}   # always far slower
                    names = list(cands)
                    rounds = timing._rounds(cpu, cands, names, timing.MAX_REPEATS, timing.MAX_REPEATS, timing.WARMUP)
                    timing._memory.clear()
                    full = timing._measure_fresh(cpu, cands, names, "original",
                                                 {n: timing.ideal(problem, n) for n in names})
                    for n in names[1:]:
                        med = (statistics.median(r["original"] for r in rounds)
                               / statistics.median(r[n] for r in rounds))
                        v = timing.judge(rounds, n, bound=timing.ideal(problem, n))
                        row = {"scenario": scen, "rep": rep, "op": problem["op"], "dtype": problem["dtype"],
                               "candidate": n, "bound": timing.ideal(problem, n), "median_ratio": med, "floor_ratio": v.ratio, "lo": v.lo, "hi": v.hi,
                               "verdict": v.state, "measure": full.verdicts[n].state,
                               "measure_ratio": full.verdicts[n].ratio, "measure_rounds": full.verdicts[n].rounds}
                        rec["rows"].append({**row, "rounds": [{k: r[k] for k in ("original", n)} for r in rounds]})
                        print(f"{scen:6s} {rep} {problem['op']:9s} {problem['dtype'][6:]:8s} {n:7s} "
                              f"median {med:.2f}x floor {v.ratio:.2f}x [{v.lo:.2f}, {v.hi:.2f}] {v.state:11s} | "
                              f"measure {full.verdicts[n].ratio:.2f}x {full.verdicts[n].state} "
                              f"({full.verdicts[n].rounds} rounds)", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rec, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
