"""Measured decisions: the timing cache (per machine and problem, on disk, shared by
concurrent processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from bdpass import timing


def _fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})


def test_measures_once_then_reads_the_cache(monkeypatch, tmp_path):
    _fresh(monkeypatch, tmp_path)
    calls = {"a": 0, "b": 0}

    def cand(name):
        def f():
            calls[name] += 1
            return torch.ones(4).sum()
        return f
    problem = {"op": "test", "M": 8}
    got = timing.measure(torch.device("cpu"), problem, {"a": cand("a"), "b": cand("b")})
    assert set(got) == {"a", "b"} and all(v > 0 for v in got.values())
    assert calls["a"] >= timing.WARMUP + timing.MIN_REPEATS and calls["a"] == calls["b"]   # interleaved
    n = dict(calls)
    monkeypatch.setattr(timing, "_memory", {})            # a new process: only the file remains
    again = timing.measure(torch.device("cpu"), problem, {"a": cand("a"), "b": cand("b")})
    assert again == got and calls == n
    data = json.loads((tmp_path / "timings.json").read_text())
    (key,) = data
    assert key.startswith(timing.machine(torch.device("cpu"))) and '"M": 8' in key
    timing.measure(torch.device("cpu"), {"op": "test", "M": 9}, {"a": cand("a")})
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
    got = timing.measure(torch.device("cpu"), {"op": "x"}, {"a": lambda: None})
    assert timing.lookup(timing.key(torch.device("cpu"), {"op": "x"})) == got
