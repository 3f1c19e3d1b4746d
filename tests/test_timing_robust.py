"""Measured decisions on a busy machine: a decision taken while other processes load the
machine must not slow the model down once the machine is quiet, a wrong cache entry must not
be trusted, and an unsure decision must not keep a later, quiet process from the gain.

The decision logic is tested with injected timings (``Scripted`` of ``test_timing``: busy =
every call slowed by a random factor in [1, 4]); the real-timing tests assert only what a
shared 2-core machine measures reliably: a speed floor of 0.97x of Inductor, from medians of
interleaved calls (``benchmarks/_bench.py``; each compiled function its own code object).
The models are ``benchmarks/bd_speed.py``'s: its MLA attention block and its rank-50% pair.
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import bdpass
from bdpass import timing

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import bd_speed  # noqa: E402
from _bench import entry, interleaved  # noqa: E402
from test_timing import Scripted  # noqa: E402
from timing_noise import burners  # noqa: E402

FLOOR = 0.97          # bd may not be slower than this fraction of Inductor's speed
FAST = {"lowering": "aot_eager", "validate": False}     # decisions only


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})


def _pifa(dtype, d=1024, tokens=128):
    torch.manual_seed(0)
    return bd_speed.init_(bd_speed.LowRank(d, d // 2)).to(dtype).eval(), torch.randn(tokens, d, dtype=dtype)


def _mla(dtype, hidden=256, tokens=128, **kw):
    """bd_speed's MLA block; the default is a quarter of DeepSeek-V2-Lite's latent width
    (hidden and latent 256, 8 heads x (64 + 32 RoPE), V 64)."""
    torch.manual_seed(0)
    kw = kw or ({"heads": 8, "latent": 256, "nope": 64, "rope_dim": 32, "v_dim": 64} if hidden == 256 else {})
    model = bd_speed.init_(bd_speed.MLA(hidden=hidden, **kw)).to(dtype).eval()
    return model, torch.randn(1, tokens, hidden, dtype=dtype)


def _tiny_pifa():
    return _pifa(torch.float32, d=64, tokens=16)


def _tiny_mla():
    torch.manual_seed(0)
    m = bd_speed.init_(bd_speed.MLA(hidden=64, heads=4, latent=64, nope=16, rope_dim=8, v_dim=16)).eval()
    return m, torch.randn(1, 16, 64)


def _entries(tmp_path) -> dict:
    p = tmp_path / "timings.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _skip_reasons(rep, kind_prefix):
    return [s.reason for s in rep.skipped if s.kind.startswith(kind_prefix)]


# ---------------------------------------------------------------------------- injected timings
BD_QUIET = {"original": 1e-3, "per_head": 4e-3, "groups": 1.1e-3, "shared": 0.8e-3}
BD_BUSY = {"original": 1e-3, "per_head": 4e-3, "groups": 1.1e-3, "shared": 1e-3}


@pytest.mark.parametrize("case", ["pifa", "mla"])
def test_busy_decisions_are_declined_with_the_unsure_ratio(monkeypatch, tmp_path, case):
    """Under load the candidate looks no faster than the original and every call is slowed:
    no verdict can be sure, so nothing is applied and the reason says so with the ratio."""
    _fresh(monkeypatch, tmp_path)
    model, x = _tiny_pifa() if case == "pifa" else _tiny_mla()
    base = {"original": 1e-3, "pifa": 1e-3} if case == "pifa" else BD_BUSY
    monkeypatch.setattr(timing, "_rounds", Scripted(base, busy=True))
    rep = bdpass.explain(model, x, options=FAST)
    assert rep.rewrites == [], str(rep)
    reasons = _skip_reasons(rep, "pifa" if case == "pifa" else "bd")
    assert reasons and all("cost model" in r and ("unsure" in r or "implausible" in r) for r in reasons), reasons
    assert all(e["final"] is False for e in _entries(tmp_path).values())


def test_an_implausible_speedup_is_not_applied_nor_cached_as_final(monkeypatch, tmp_path):
    """A measurement whose original ran twice as slow as it does (the machine was busy while it
    ran) claims 2.5x for a pair whose FLOPs allow 1.33x: measured again, still implausible, not
    applied."""
    _fresh(monkeypatch, tmp_path)
    s = Scripted({"original": 2.5e-3, "pifa": 1e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    rep = bdpass.explain(*_tiny_pifa(), options=FAST)
    assert rep.rewrites == [] and len(s.calls) == 1 + timing.EXTRA_BATCHES
    (reason,) = _skip_reasons(rep, "pifa")
    assert "2.50x (implausible: its FLOPs and bytes allow 1.33x" in reason, reason
    (e,) = _entries(tmp_path).values()
    assert e["final"] is False and e["verdicts"]["pifa"]["state"] == "implausible"


@pytest.mark.parametrize("slower", [2.0, 1.44])
def test_a_wrong_cache_entry_is_revalidated_and_declined(monkeypatch, tmp_path, slower):
    """(b) with injected timings: the pair runs at 0.87x of its original; the cache entry says
    the original ran ``slower`` times as slow as it does (sure, final). Twice as slow claims
    1.74x, beyond the 1.33x the pair's FLOPs allow: stale at once. 1.44 times claims a
    plausible 1.25x: the first use confirms it, the confirmation disagrees. Either way a later
    process measures afresh and declines."""
    _fresh(monkeypatch, tmp_path)
    model, x = _tiny_pifa()
    truth = {"original": 0.87e-3, "pifa": 1e-3}
    monkeypatch.setattr(timing, "_rounds", Scripted(truth))
    first = bdpass.explain(model, x, options=FAST)
    assert first.rewrites == [] and "0.87x" in _skip_reasons(first, "pifa")[0]
    (k, e), = _entries(tmp_path).items()
    e["seconds"]["original"] *= slower
    e["stats"]["original"] = {n: v * slower if n != "n" else v for n, v in e["stats"]["original"].items()}
    v = e["verdicts"]["pifa"]
    v.update(ratio=v["ratio"] * slower, lo=v["lo"] * slower, hi=v["hi"] * slower, state="pays")
    (tmp_path / "timings.json").write_text(json.dumps({k: e}))
    problem = json.loads("{" + k.partition(" | {")[2])
    trusted, why = timing.parse_entry(e, problem)
    assert (trusted is None and "implausible" in why) if slower == 2.0 else trusted is not None
    monkeypatch.setattr(timing, "_memory", {})                  # a later process
    s = Scripted(truth)
    monkeypatch.setattr(timing, "_rounds", s)
    rep = bdpass.explain(model, x, options=FAST)
    assert len(s.calls) == (1 if slower == 2.0 else 2)         # (the confirmation, then) a measurement
    assert rep.rewrites == [] and "0.87x" in _skip_reasons(rep, "pifa")[0], str(rep)
    assert _entries(tmp_path)[k]["verdicts"]["pifa"]["state"] == "slower"


def test_an_unsure_decision_does_not_keep_a_quiet_process_from_the_gain(monkeypatch, tmp_path):
    """(c) with injected timings: decided under load (unsure: declined, not final), then a
    quiet process measures again and applies the pair that pays 1.25x."""
    _fresh(monkeypatch, tmp_path)
    model, x = _tiny_pifa()
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 1e-3}, busy=True))
    busy = bdpass.explain(model, x, options=FAST)
    assert busy.rewrites == [] and all(e["final"] is False for e in _entries(tmp_path).values())
    monkeypatch.setattr(timing, "_memory", {})                  # a later, quiet process
    s = Scripted({"original": 1e-3, "pifa": 0.8e-3})
    monkeypatch.setattr(timing, "_rounds", s)
    quiet = bdpass.explain(model, x, options=FAST)
    assert s.calls == [["original", "pifa"]]                    # measured, not read from the cache
    assert [r.kind for r in quiet.rewrites] == ["pifa"], str(quiet)
    (e,) = _entries(tmp_path).values()
    assert e["final"] is True and e["verdicts"]["pifa"]["state"] == "pays"


def test_bd_forms_take_the_surely_paying_one(monkeypatch, tmp_path):
    """The fastest BD form unsure, the next surely paying: the sure one is taken."""
    _fresh(monkeypatch, tmp_path)

    class ShakyShared(Scripted):
        def __call__(self, device, candidates, names, min_rounds, max_rounds, warmup):
            self.calls.append(list(names))
            return [{n: self.base[n] * (1 + self.rng.uniform(0, 3.0 if n == "shared" else 0.005)) for n in names}
                    for _ in range(max_rounds)]
    monkeypatch.setattr(timing, "_rounds", ShakyShared({**BD_QUIET, "shared": 0.5e-3, "groups": 0.85e-3}))
    rep = bdpass.explain(*_tiny_mla(), options={**FAST, "error_budget": 1e4})
    assert {r.details["form"] for r in rep.rewrites} == {"groups"}, str(rep)


# ---------------------------------------------------------------------------- real timings
def _speed(bd, ind, model, x, repeats=15, attempts=4) -> float:
    """Inductor time / bd time, medians of interleaved calls. Other jobs of the machine can slow
    either function during one measurement, so a ratio under the floor is measured again (up
    to ``attempts`` times, the best kept): a real slowdown shows in every attempt."""
    best = 0.0
    for _ in range(attempts):
        t = interleaved({"bd": lambda: bd(model, x), "ind": lambda: ind(model, x)}, repeats)
        best = max(best, t["ind"] / t["bd"])
        if best >= FLOOR:
            break
    return best


def _decided_and_timed(model, x, tag, busy: bool):
    """Compile with bd (under 3 bursty burners when ``busy``), then, quiet, with Inductor;
    (report, Inductor time / bd time, or None where bd applied nothing).

    Where nothing was applied, bd handed Inductor the graph unchanged (no rewrite, no
    fallback): the same compiled code as plain Inductor's, 1.0x by construction, and timing it
    would measure only the machine (on the shared 2-core machine, two such compilations timed
    as above differed by up to 24% while other jobs ran)."""
    with torch.no_grad():
        torch._dynamo.reset()
        bd = torch.compile(entry(f"bd_{tag}"), backend="bd")
        with bdpass.collect_reports() as rep:
            if busy:
                with burners(3):
                    bd(model, x)
            else:
                bd(model, x)
        ratio = None
        if rep.rewrites:
            ind = torch.compile(entry(f"ind_{tag}"), backend="inductor")
            ind(model, x)
            ratio = _speed(bd, ind, model, x)
        else:
            assert all(g.fallback is None and not g.nodes_after for g in rep.graphs), str(rep)
        torch._dynamo.reset()
    return rep, ratio


def _not_slower(ratio, rep):
    assert ratio is None or ratio >= FLOOR, (ratio, str(rep))


def _applied_only_where_sure(rep):
    paying = [n for m in timing._memory.values() for n, v in m.verdicts.items() if v.state == "pays"]
    assert not rep.rewrites or paying, (str(rep), {k: m.verdicts for k, m in timing._memory.items()})


CASES = [("pifa", torch.float32), ("pifa", torch.bfloat16), ("mla", torch.float32), ("mla", torch.bfloat16)]


@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_decided_under_bursty_load_not_slower_when_quiet(monkeypatch, tmp_path, case, dtype):
    """(a) Decisions made while 3 processes alternate busy and idle bursts of 50-200 ms on
    this machine's cores, timed once they stopped: never below 0.97x of Inductor."""
    _fresh(monkeypatch, tmp_path)
    model, x = _pifa(dtype) if case == "pifa" else _mla(dtype)
    rep, ratio = _decided_and_timed(model, x, f"{case}_{str(dtype)[6:]}", busy=True)
    assert rep.graphs and rep.graphs[0].timing_seconds > 0          # decided by measuring, under load
    _applied_only_where_sure(rep)
    _not_slower(ratio, rep)


@pytest.mark.slow
@pytest.mark.parametrize("case,dtype", CASES, ids=[f"{c}-{str(d)[6:]}" for c, d in CASES])
def test_decided_under_bursty_load_not_slower_when_quiet_large(monkeypatch, tmp_path, case, dtype):
    """(a) at the reported shapes: the MLA block on the latent width at 1024 tokens, the
    pair d=2048, r=1024."""
    _fresh(monkeypatch, tmp_path)
    model, x = _pifa(dtype, d=2048, tokens=1024) if case == "pifa" else _mla(dtype, hidden=512, tokens=1024)
    rep, ratio = _decided_and_timed(model, x, f"{case}_{str(dtype)[6:]}_large", busy=True)
    _applied_only_where_sure(rep)
    _not_slower(ratio, rep)


def _later_process(monkeypatch):
    """Forget this process's results (the file stays) and record what gets timed."""
    monkeypatch.setattr(timing, "_memory", {})
    calls = []
    real = timing._rounds

    def recording(device, candidates, names, *a):
        calls.append(list(names))
        return real(device, candidates, names, *a)
    monkeypatch.setattr(timing, "_rounds", recording)
    return calls


def test_a_wrong_cache_entry_does_not_slow_a_later_process(monkeypatch, tmp_path):
    """(b) The bf16 pair's cache entry is rewritten as if its original had run twice as slow
    (claiming a sure win, final); a later process does not act on it unconfirmed (an
    implausible claim is measured afresh, a plausible one confirmed first, and kept only if
    this machine is sure of the same verdict) and is not slower than Inductor."""
    _fresh(monkeypatch, tmp_path)
    model, x = _pifa(torch.bfloat16)
    bdpass.explain(model, x, options=FAST)                 # the real measurement, then the lie
    (k, e), = _entries(tmp_path).items()
    e["seconds"]["original"] *= 2
    e["stats"]["original"] = {n: v * 2 if n != "n" else v for n, v in e["stats"]["original"].items()}
    v = e["verdicts"]["pifa"]
    v.update(ratio=2 * v["ratio"], lo=2 * v["lo"], hi=2 * v["hi"], state="pays")   # what it would claim
    e["final"] = True
    (tmp_path / "timings.json").write_text(json.dumps({k: e}))
    calls = _later_process(monkeypatch)
    rep, ratio = _decided_and_timed(model, x, "wrong_entry", busy=False)
    assert calls, "the cached entry was used without being confirmed"
    (m,) = timing._memory.values()
    assert m.origin in ("measured", "confirmed")
    if m.origin == "confirmed":           # this machine agreed, surely, with the entry's verdict
        assert calls == [["original", "pifa"]] and m.verdicts["pifa"].sure
    assert bool(rep.rewrites) == timing.pays(m, "pifa"), str(rep)
    _not_slower(ratio, rep)


def test_an_unsure_entry_is_measured_again_by_a_quiet_process(monkeypatch, tmp_path):
    """(c) The fp32 pair decided under bursty load; its entry, if unsure, is not final and a
    later quiet process measures again, and acts on its own verdict; not slower than Inductor."""
    _fresh(monkeypatch, tmp_path)
    model, x = _pifa(torch.float32)
    with burners(3):
        bdpass.explain(model, x, options=FAST)
    (k, e), = _entries(tmp_path).items()
    calls = _later_process(monkeypatch)
    rep, ratio = _decided_and_timed(model, x, "unsure_entry", busy=False)
    (m,) = timing._memory.values()
    if not e["final"]:
        assert m.origin == "measured" and calls[0] == ["original", "pifa"]
        assert _entries(tmp_path)[k]["measured_at"] > e["measured_at"]
    else:
        assert calls and m.origin in ("measured", "confirmed")
    assert bool(rep.rewrites) == timing.pays(m, "pifa"), str(rep)
    _not_slower(ratio, rep)
