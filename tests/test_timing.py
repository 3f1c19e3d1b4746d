"""Measured decisions: the timing cache (per machine and problem, on disk, shared by
concurrent processes), the verdicts of a comparison (sure or not, plausible or not) and the
re-validation policy of cached entries. Timings are injected (``Scripted``) wherever the
logic, not the machine, is under test."""
from __future__ import annotations

import json
import os
import random
from collections import Counter
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bdpass import cost, timing

CPU = torch.device("cpu")


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})


class Scripted:
    """Stands in for ``timing._rounds``: each call of candidate ``n`` takes ``base[n]``
    seconds, with 0.5% jitter on a quiet machine; ``busy``: every call is slowed by a random
    factor in [1, 4] (no quiet window), and only ``min_rounds`` rounds fit the time bound."""

    def __init__(self, base: dict, busy: bool = False, seed: int = 0):
        self.base, self.busy = dict(base), busy
        self.rng = random.Random(seed)
        self.calls: list[list[str]] = []

    def __call__(self, device, candidates, names, min_rounds, max_rounds, warmup):
        self.calls.append(list(names))
        n = min_rounds if self.busy else max_rounds
        out = []
        for _ in range(n):
            r = {}
            for k in names:
                f = 1.0 + (self.rng.uniform(0.0, 3.0) if self.busy else self.rng.uniform(0.0, 0.005))
                r[k] = self.base[k] * f
            out.append(r)
        return out


def _cands(*names):
    return {n: (lambda: None) for n in names}


PIFA = {"op": "pifa", "M": 16, "d_in": 64, "r": 32, "d_out": 64, "dtype": "torch.float32", "bias": True,
        "restore_order": True}


# ---------------------------------------------------------------------------- the file
def test_measures_once_then_reads_the_cache(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    calls = {"a": 0, "b": 0}

    def cand(name):
        def f():
            calls[name] += 1
            return torch.ones(4).sum()
        return f
    problem = {"op": "test", "M": 8}
    got = timing.measure(CPU, problem, {"a": cand("a"), "b": cand("b")})
    assert set(got) == {"a", "b"} and all(v > 0 for v in got.values())
    assert calls["a"] >= timing.WARMUP + timing.MIN_REPEATS and calls["a"] == calls["b"]   # interleaved
    assert got["a"] == got.stats["a"]["min"] <= got.stats["a"]["q25"] <= got.stats["a"]["median"]
    n = dict(calls)
    monkeypatch.setattr(timing, "_memory", {})            # a new process: only the file remains
    again = timing.measure(CPU, problem, {"a": cand("a"), "b": cand("b")})
    assert again == got and calls == n                    # nothing to compare: nothing to confirm
    data = json.loads((tmp_path / "timings.json").read_text())
    (key,) = data
    assert key.startswith(timing.machine(CPU)) and '"M": 8' in key
    timing.measure(CPU, {"op": "test", "M": 9}, {"a": cand("a")})
    assert calls["a"] > n["a"] and len(json.loads((tmp_path / "timings.json").read_text())) == 2


def test_concurrent_processes_share_the_file(tmp_path):
    script = textwrap.dedent("""
        import sys, torch
        from bdpass import timing
        k = int(sys.argv[1])
        for m in range(5):
            timing.measure(torch.device("cpu"), {"op": "p", "proc": k, "M": m}, {"a": lambda: torch.ones(2).sum()})
    """)
    env = {**os.environ, "BDPASS_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env) for k in range(3)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    data = json.loads((tmp_path / "timings.json").read_text())
    assert len(data) == 15
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".timings.")]   # no temporary left over


def test_unwritable_cache_keeps_results_in_memory(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(blocked))
    monkeypatch.setattr(timing, "_memory", {})
    got = timing.measure(CPU, {"op": "x"}, {"a": lambda: None})
    assert timing.lookup(timing.key(CPU, {"op": "x"})) == got


def test_entry_records_spread_sureness_versions_and_time(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 0.8e-3}))
    t0 = time.time()
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert timing.pays(got, "pifa") and got.final
    (entry,) = json.loads((tmp_path / "timings.json").read_text()).values()
    assert entry["format"] == timing.FORMAT and entry["final"] is True and entry["margin"] == cost.MARGIN
    assert entry["versions"] == timing.versions() and set(entry["versions"]) == {"torch", "bdpass", "ops"}
    assert t0 <= entry["measured_at"] <= time.time()
    st = entry["stats"]["pifa"]
    assert st["n"] == timing.MAX_REPEATS and st["min"] <= st["q25"] <= st["median"]
    v = entry["verdicts"]["pifa"]
    assert v["state"] == "pays" and v["lo"] <= v["ratio"] <= v["hi"] and abs(v["ratio"] - 1.25) < 0.01
    assert v["bound"] == pytest.approx(cost.pifa_ideal(16, 64, 32, 64))


# ---------------------------------------------------------------------------- verdicts
def _rounds_of(o, c, n=25, jitter=0.005, seed=0):
    rng = random.Random(seed)
    return [{"original": o * (1 + rng.uniform(0, jitter)), "c": c * (1 + rng.uniform(0, jitter))} for _ in range(n)]


def test_verdicts_of_quiet_runs_are_sure():
    th = timing.threshold()
    assert th == pytest.approx(1 / (1 - cost.MARGIN))
    assert timing.judge(_rounds_of(1.0, 0.8), "c").state == "pays"
    assert timing.judge(_rounds_of(1.0, 1.0), "c").state == "slower"
    assert timing.judge(_rounds_of(1.0, 1.2), "c").state == "slower"
    # right at the margin, the jitter leaves it open
    assert timing.judge(_rounds_of(1.0, 1 / th, jitter=0.02), "c").state == "unsure"


def test_noisy_runs_are_unsure_and_too_few_rounds_are_unsure():
    rng = random.Random(1)
    busy = [{"original": 1.0 * (1 + rng.uniform(0, 1.5)), "c": 0.8 * (1 + rng.uniform(0, 1.5))} for _ in range(25)]
    v = timing.judge(busy, "c")
    assert v.state == "unsure" and v.lo < timing.threshold() <= v.hi and not v.sure
    assert "unsure" in timing.describe(_as_measured(busy), "c")
    few = _rounds_of(1.0, 0.8, n=timing.SURE_ROUNDS - 1)
    assert timing.judge(few, "c").state == "unsure"
    assert timing.judge(_rounds_of(1.0, 2.5, n=5), "c").state == "slower"     # far slower: sure at once


def test_a_real_gain_under_per_call_jitter_is_sure_and_no_loss_is_ever_taken_for_one():
    """Calls that scatter by up to 20% each (a quiet shared VM): the median interval of the
    per-round ratios resolves a real 11% gain in nearly every run of 25 rounds, and never calls
    a candidate that is no faster a gain (the rule before it was sure of such a gain about half
    the time: ``python benchmarks/timing_noise.py --judge``)."""
    def states(o, seeds=200):
        return Counter(timing.judge(_rounds_of(o, 1.0, jitter=0.2, seed=s), "c").state for s in range(seeds))

    gain = states(1.11)
    assert gain["pays"] >= 190 and gain["slower"] == 0, gain
    for o in (1.0, 0.95, 0.8):
        assert states(o)["pays"] == 0, o


def test_median_interval_is_the_order_statistics_around_the_median():
    lo, hi = timing.median_interval([float(i) for i in range(1, 101)])     # n=100: k = floor((100-19.6)/2) = 40
    assert (lo, hi) == (41.0, 60.0)
    assert timing.median_interval([2.0]) == (2.0, 2.0)


def _as_measured(rounds):
    return timing._result(rounds, ["original", "c"], "original", {})


def test_a_speedup_beyond_flops_and_bytes_is_implausible():
    bound = cost.pifa_ideal(1024, 1024, 512, 1024)
    assert bound == pytest.approx((1024 * 512 * 2) / (1024 * 512 + 512 * 512))      # the FLOP ratio, 4/3
    assert timing.judge(_rounds_of(1.0, 0.8), "c", bound=bound).state == "pays"       # 1.25x
    v = timing.judge(_rounds_of(1.0, 0.5), "c", bound=bound)                          # 2x
    assert v.state == "implausible" and "implausible" in v.describe() and "1.33x" in v.describe()
    # BD: the identity rows of a head cost nothing, so d_in / (d_in - d_h) on the BD columns
    assert cost.bd_ideal(1024, 512, 4096, [(128, 4096)]) == pytest.approx(512 / 384)
    assert cost.bd_ideal(1024, 512, 6144, [(0, 2048), (128, 4096)]) == pytest.approx(
        512 * 6144 / (512 * 2048 + 384 * 4096))
    problem = {"op": "bd_linear", "M": 1024, "d_in": 512, "d_out": 4096, "blocks": {"shared": [[128, 4096]]}}
    assert timing.ideal(problem, "shared") == pytest.approx(512 / 384)
    # the reported defect: 9.84 ms against 6.17 ms for kv_b_proj is not a win but a bad measurement
    assert 9.84 / 6.17 > timing.ideal(problem, "shared") * cost.PLAUSIBLE
    assert timing.ideal({"op": "other"}, "x") is None


def test_plain_mappings_are_taken_at_their_word():
    secs = {"original": 1.0, "a": 0.5, "b": 0.99}
    assert timing.pays(secs, "a") and not timing.pays(secs, "b")
    assert timing.describe(secs, "a") == "2.00x"


# ---------------------------------------------------------------------------- measuring again
def test_unsure_candidates_are_measured_again_then_declined(monkeypatch, tmp_path):
    """Under load the candidate looks no faster (ratio 1 under heavy noise: no verdict can be
    sure); quiet, it pays 1.25x."""
    _fresh(monkeypatch, tmp_path)
    s = Scripted({"original": 1e-3, "pifa": 1e-3}, busy=True)
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert len(s.calls) == 1 + timing.EXTRA_BATCHES and all(c == ["original", "pifa"] for c in s.calls)
    assert not timing.pays(got, "pifa") and not got.final
    assert got.verdicts["pifa"].state in ("unsure", "implausible")      # neither is applied
    assert got.verdicts["pifa"].rounds == timing.MIN_REPEATS * (1 + timing.EXTRA_BATCHES)
    (entry,) = json.loads((tmp_path / "timings.json").read_text()).values()
    assert entry["final"] is False
    # the same process keeps its verdict (the other layers of the model share it) ...
    assert timing.measure(CPU, PIFA, _cands("original", "pifa")).origin == "memory" and len(s.calls) == 4
    # ... a later process measures again
    monkeypatch.setattr(timing, "_memory", {})
    q = Scripted({"original": 1e-3, "pifa": 0.8e-3})
    monkeypatch.setattr(timing, "_rounds", q)
    again = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert q.calls == [["original", "pifa"]] and again.origin == "measured" and timing.pays(again, "pifa")
    (entry,) = json.loads((tmp_path / "timings.json").read_text()).values()
    assert entry["final"] is True


def test_only_the_unsure_candidates_run_again(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)

    class Mixed(Scripted):       # 'far' is 3x slower, sure at once; 'near' stays noisy
        def __call__(self, device, candidates, names, min_rounds, max_rounds, warmup):
            self.calls.append(list(names))
            return [{n: self.base[n] * (1 + self.rng.uniform(0, 1.5 if n == "near" else 0.005)) for n in names}
                    for _ in range(min_rounds)]
    s = Mixed({"original": 1e-3, "far": 3e-3, "near": 0.9e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, {"op": "t"}, _cands("original", "far", "near"))
    assert s.calls[0] == ["original", "far", "near"] and len(s.calls) >= 2      # 5 rounds: 'near' unsure
    assert all(c == ["original", "near"] for c in s.calls[1:])
    assert got.verdicts["far"].state == "slower" and got.verdicts["far"].rounds == timing.MIN_REPEATS
    assert got.verdicts["near"].rounds == timing.MIN_REPEATS * len(s.calls)


# ---------------------------------------------------------------------------- re-validation
def _write_entry(tmp_path, problem, seconds, verdicts, **over):
    k = timing.key(CPU, problem)
    value = {"format": timing.FORMAT, "seconds": seconds,
             "stats": {n: {"n": 25, "min": s, "q25": s * 1.01, "median": s * 1.02} for n, s in seconds.items()},
             "verdicts": verdicts, "final": True, "margin": cost.MARGIN, "versions": timing.versions(),
             "measured_at": time.time()}
    value.update(over)
    (tmp_path / "timings.json").write_text(json.dumps({k: value}))
    return k


PAYS = {"pifa": {"ratio": 1.25, "lo": 1.2, "hi": 1.3, "state": "pays", "bound": 1.33, "rounds": 25}}


def test_a_wrong_cache_entry_is_not_trusted(monkeypatch, tmp_path):
    """An entry that says the rewrite pays 1.25x, where it runs at 0.87x: the first use in a
    process confirms it, the confirmation disagrees, the problem is measured afresh and the
    rewrite declined; the file then holds the new measurement."""
    _fresh(monkeypatch, tmp_path)
    k = _write_entry(tmp_path, PIFA, {"original": 1.25e-3, "pifa": 1e-3}, PAYS)
    s = Scripted({"original": 0.87e-3, "pifa": 1e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert s.calls == [["original", "pifa"], ["original", "pifa"]]        # confirmation, then measurement
    assert got.origin == "measured" and not timing.pays(got, "pifa") and got.verdicts["pifa"].state == "slower"
    assert json.loads((tmp_path / "timings.json").read_text())[k]["verdicts"]["pifa"]["state"] == "slower"


def test_a_right_cache_entry_is_confirmed_once_per_process(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    _write_entry(tmp_path, PIFA, {"original": 1.25e-3, "pifa": 1e-3}, PAYS)
    s = Scripted({"original": 1.25e-3, "pifa": 1e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert got.origin == "confirmed" and timing.pays(got, "pifa") and got["original"] == 1.25e-3
    assert len(s.calls) == 1
    timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert len(s.calls) == 1                                              # once per process


def test_a_busy_confirmation_does_not_keep_an_entry(monkeypatch, tmp_path):
    """A confirmation that cannot be sure is no confirmation: measured afresh (and, the
    machine still busy, declined and stored as not final). The candidate is 4% faster, just
    over the margin: under this noise no number of rounds that fits the time bound is sure."""
    _fresh(monkeypatch, tmp_path)
    k = _write_entry(tmp_path, PIFA, {"original": 1.04e-3, "pifa": 1e-3}, PAYS)
    s = Scripted({"original": 1.04e-3, "pifa": 1e-3}, busy=True)
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert got.origin == "measured" and not timing.pays(got, "pifa")
    assert json.loads((tmp_path / "timings.json").read_text())[k]["final"] is False


@pytest.mark.parametrize("stale", ["old_format", "unsure", "versions", "margin", "expired", "implausible",
                                   "garbage"])
def test_stale_entries_are_measured_again(monkeypatch, tmp_path, stale):
    _fresh(monkeypatch, tmp_path)
    over = {"unsure": {"final": False}, "versions": {"versions": {**timing.versions(), "ops": "0" * 12}},
            "margin": {"margin": 0.1}, "expired": {"measured_at": time.time() - 86400 * (timing.MAX_AGE_DAYS + 1)},
            "garbage": {"stats": {"pifa": "x"}}}.get(stale, {})
    verdicts = PAYS
    if stale == "garbage":
        verdicts = {"pifa": {"ratio": "x"}}
    if stale == "implausible":       # original twice as slow as it is: 2.5x, beyond the pair's 1.33x
        verdicts = {"pifa": {**PAYS["pifa"], "ratio": 2.5, "lo": 2.4, "hi": 2.6}}
    k = _write_entry(tmp_path, PIFA, {"original": 2.5e-3, "pifa": 1e-3}, verdicts, **over)
    if stale == "old_format":        # what earlier versions wrote: medians only
        (tmp_path / "timings.json").write_text(json.dumps({k: {"original": 9.84e-3, "pifa": 6.17e-3}}))
    _, why = timing.parse_entry(json.loads((tmp_path / "timings.json").read_text())[k], PIFA)
    assert why
    s = Scripted({"original": 1.25e-3, "pifa": 1e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    got = timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert s.calls == [["original", "pifa"]] and got.origin == "measured"        # no confirmation: measured
    assert got["original"] == pytest.approx(1.25e-3, rel=0.01)
    assert json.loads((tmp_path / "timings.json").read_text())[k]["format"] == timing.FORMAT


def test_clear(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 0.8e-3}))
    timing.measure(CPU, PIFA, _cands("original", "pifa"))
    assert len(timing.entries()) == 1 and timing._memory
    assert timing.clear() == 1 and timing.entries() == {} and not timing._memory
    assert timing.clear() == 0
