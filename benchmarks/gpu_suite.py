#!/usr/bin/env python
"""bdpass GPU suite: every GPU-specific check and the speed targets, in one command.

On the GPU machine, from the repository root (nothing to install: torch, triton,
transformers and scipy must be importable; the ``bd`` backend is registered by the suite
when the package's entry point is absent)::

    python benchmarks/gpu_suite.py --out $OUT/gpu.json

then, for the README::

    python benchmarks/gpu_table.py $OUT/gpu.json

Time budget (one H200; estimates until a run records ``section_seconds`` in the JSON):

* start-up (imports, CUDA, Inductor's compile workers): ~15 s;
* kernel checks: ~60 s (54 cases, about 100 Triton compiles; the autotuned ops dominate);
* compile checks: no case starts after ``--checks-budget-s`` (200 s from the start);
  ~150 s, the max-autotune MLA case last;
* ``pytest -m gpu`` runs in a subprocess beside both (limit ``--pytest-timeout``, 240 s
  from its start); measurements wait for it;
* measurements: whatever is left of ``--budget-s`` (420 s from the start): no entry
  starts that its section's running estimate says would end past it (skipped ones are
  listed under ``skipped``). Core entries first (13, ~5-15 s each, compilation
  included), then the full grid round-robin over the sections;
* plot and JSON: ~2 s.

So the command ends within ~420 s plus the entry in flight: give it 8 minutes
(``timeout_s=540`` on the device tool).

What it writes (next to ``--out``): ``gpu.json`` (rewritten after every section and
every measurement, so a timeout still leaves a partial record), ``gpu_ratio.png`` (speed
ratio against M; absent with the reason in the JSON when matplotlib is missing) and
``gpu_pytest.log``. The output path is ``--out`` when given, else ``$OUT/gpu.json`` when
``$OUT`` is set, else ``benchmarks/results/gpu.json``.

Sections:

1. Checks (each counted; a failure is recorded and the suite goes on):
   * ``kernel_checks``: the Triton launchers (``bd_project_triton``,
     ``pivot_linear_triton``) with explicit block configurations, the ops
     ``torch.ops.bdpass.bd_project`` / ``pivot_linear`` (autotuned kernels on CUDA) and the
     ops under ``torch.compile`` with dynamic token counts, against float64 references
     with the elementwise bounds of ``tests/test_kernels.py`` (unit roundoff of the dtype,
     length of the reduction; imported, not copied): odd shapes, M=1, bias and no bias,
     shared and per-head bases, fp16/bf16/fp32, output memory poisoned with NaN first;
   * ``compile_checks``: ``torch.compile`` with the ``bd`` backend of a DeepSeek-V2-shaped
     MLA model (transformers, random weights) and of a PIFA chain stack
     (``tests/lowrank_models.SvdLinear``), under ``dynamic=True`` with several sizes,
     ``mode="reduce-overhead"`` and ``mode="max-autotune"``, each against a float64 eager
     run and beside ``backend="inductor"`` (error ratio recorded); ``explain`` holds
     ``bdpass.explain``'s account of both models;
   * ``gpu_pytest``: ``python -m pytest -m gpu -q tests`` in a subprocess with a time
     limit (pass/fail/skip counts, log tail).
2. Measurements against Inductor in the same process (``triton.testing.do_bench``
   medians over CUDA-graph replays, bd and Inductor interleaved, several rounds):
   * ``bd_kv_projection``: the BD K/V projection at DeepSeek-V2-Lite shapes (latent 512 ->
     16 heads x 128, and 128 heads x 128 = 16384 wide), fp16/bf16, M = 16 ... 65536:
     ``bdpass::bd_project`` with the factors the backend computes
     (``bdpass.identities.bd_factors``) against the dense projection, each compiled by
     Inductor; calls rotate over enough input and weight copies to defeat the L2 cache.
     The projection is timed alone because BD needs a partner (a query or output
     projection) and in any module the attention reads K and V again, which dilutes the
     projection's gain (``bd_kv_module`` is that module-level view). When
     ``bdpass::bd_linear`` exists, the same projection through it is timed too
     (``bd_linear`` in each entry: its own interleaved timing against the dense one);
   * ``bd_kv_module``: an MLA decode step (query of one token, K/V expanded from a latent
     cache of M tokens) compiled with ``backend=bd`` (cost model off) against the same
     module with ``backend="inductor"``; the report's form (shared or per-head basis,
     custom op or aten lowering) is recorded -- and copied onto the projection entries of
     the same dtype and heads;
   * ``pifa_layer``: ``SvdLinear(4096, 2048, 4096)`` fp16, bd against Inductor;
   * ``mla_block``: a DeepSeek-V2-Lite-shaped MLA attention block (transformers' own
     ``DeepseekV2Attention``: hidden 2048, 16 heads, kv_lora_rank 512, qk_nope 128,
     qk_rope 64, v 128), causal prefill at several lengths, fp16/bf16.
   Every entry has ``ms_bd``, ``ms_inductor``, ``ratio_vs_inductor = ms_inductor / ms_bd``
   and the FLOP-model ideal gain ``ideal_gain``.
3. ``targets``: each speed target with the entries it covers, the worst entry and
   whether it is met (``null`` when nothing was measured for it): K/V projection >= 1.25x
   for M >= 1024 (fp16 and bf16) and >= 1.15x for M <= 16; PIFA layer >= 1.25x; MLA
   prefill realising >= 80% of the FLOP model's gain, ``(ratio - 1) / (ideal - 1)``, with
   the ideal of the intended rewrites (BD on QK's nope channels and on VO); no entry below
   0.98x; kernel checks 0 failed.

``--dry-run`` runs all of it on the CPU with tiny shapes: the Triton kernels through
``TRITON_INTERPRET=1`` (set before triton is imported), ``lowering="aot_eager"`` for both
sides of the compile checks and measurements (Dynamo, the backend's rewrites, float64
validation and the reports all run), ``time.perf_counter`` medians instead of
``do_bench``, and tiny M lists. It writes the same JSON with ``"dry_run": true``;
``tests/test_gpu_suite.py`` runs it in CI.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# The repository root (bdpass, inductor_lowerings: nothing needs installing) and tests/ (its
# model builders and kernel references) go first: benchmarks/ has a zoo.py of its own.
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)

SCHEMA_VERSION = 1
MEASUREMENT_SECTIONS = ("bd_kv_projection", "bd_kv_module", "pifa_layer", "mla_block")
DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}

# Speed targets (issue #13). Pure data, read by evaluate_targets and gpu_table.py.
KV_LARGE_M, KV_LARGE_RATIO = 1024, 1.25
KV_SMALL_M, KV_SMALL_RATIO = 16, 1.15
PIFA_RATIO = 1.25
MLA_GAIN_FRACTION = 0.80
FLOOR_RATIO = 0.98


# ============================================================================ targets
def _entry_key(e: dict) -> dict:
    return {k: e[k] for k in ("M", "tokens", "dtype", "heads") if k in e}


def _measured(data: dict, section: str) -> list[dict]:
    return [e for e in data.get(section) or []
            if isinstance(e.get("ratio_vs_inductor"), (int, float)) and math.isfinite(e["ratio_vs_inductor"])]


def _ratio_target(name: str, description: str, entries: list[dict], threshold: float,
                  required_dtypes: tuple = ()) -> dict:
    out = {"name": name, "description": description, "threshold": threshold, "n": len(entries),
           "met": None, "worst": None, "worst_entry": None, "complete": True}
    if required_dtypes:
        missing = sorted(set(required_dtypes) - {e.get("dtype") for e in entries})
        if missing:
            out["complete"] = False
            out["missing_dtypes"] = missing
    if not entries:
        return out
    worst = min(entries, key=lambda e: e["ratio_vs_inductor"])
    out["worst"] = worst["ratio_vs_inductor"]
    out["worst_entry"] = _entry_key(worst)
    out["met"] = bool(worst["ratio_vs_inductor"] >= threshold)
    return out


def gain_fraction(ratio: float, ideal: float) -> Optional[float]:
    """Share of the FLOP model's gain that was realised: (ratio - 1) / (ideal - 1)."""
    if ideal is None or not ideal > 1.0 or ratio is None:
        return None
    return (ratio - 1.0) / (ideal - 1.0)


def evaluate_targets(data: dict) -> list[dict]:
    """The issue's targets against the measured entries of ``data`` (a gpu.json dict).

    ``met`` is True/False, or None when no entry covers the target (not measured, or
    skipped for time); ``complete`` is False when a dtype the target names is missing."""
    kv = _measured(data, "bd_kv_projection")
    half = ("float16", "bfloat16")
    targets = [
        _ratio_target("bd_kv_projection_large_m",
                      f"BD K/V projection >= {KV_LARGE_RATIO}x Inductor for M >= {KV_LARGE_M} (fp16 and bf16)",
                      [e for e in kv if e["M"] >= KV_LARGE_M and e["dtype"] in half], KV_LARGE_RATIO, half),
        _ratio_target("bd_kv_projection_small_m",
                      f"BD K/V projection >= {KV_SMALL_RATIO}x Inductor for M <= {KV_SMALL_M}",
                      [e for e in kv if e["M"] <= KV_SMALL_M and e["dtype"] in half], KV_SMALL_RATIO, half),
        _ratio_target("pifa_layer", f"PIFA layer (d=4096, r=2048) >= {PIFA_RATIO}x Inductor",
                      _measured(data, "pifa_layer"), PIFA_RATIO),
    ]
    mla = [e for e in _measured(data, "mla_block") if e.get("ideal_gain")]
    t = {"name": "mla_block_flop_gain",
         "description": f"MLA block prefill realises >= {MLA_GAIN_FRACTION:.0%} of the FLOP-model gain "
                        "((ratio - 1) / (ideal - 1))",
         "threshold": MLA_GAIN_FRACTION, "n": len(mla), "met": None, "worst": None, "worst_entry": None,
         "complete": True}
    fracs = [(gain_fraction(e["ratio_vs_inductor"], e["ideal_gain"]), e) for e in mla]
    fracs = [(f, e) for f, e in fracs if f is not None]
    if fracs:
        f, e = min(fracs, key=lambda fe: fe[0])
        t.update(worst=f, worst_entry=_entry_key(e), met=bool(f >= MLA_GAIN_FRACTION))
    targets.append(t)
    every = [dict(e, section=s) for s in MEASUREMENT_SECTIONS for e in _measured(data, s)]
    floor = _ratio_target("no_entry_below_floor", f"no measured entry below {FLOOR_RATIO}x Inductor",
                          every, FLOOR_RATIO)
    if floor["worst_entry"] is not None:
        worst = min(every, key=lambda e: e["ratio_vs_inductor"])
        floor["worst_entry"]["section"] = worst["section"]
    targets.append(floor)
    kc = data.get("kernel_checks") or {}
    targets.append({"name": "kernel_checks", "description": "kernel checks: 0 failed",
                    "threshold": 0, "n": int(kc.get("passed", 0)) + int(kc.get("failed", 0)),
                    "met": (kc.get("failed") == 0 and kc.get("passed", 0) > 0) if kc else None,
                    "worst": kc.get("failed"), "worst_entry": None, "complete": bool(kc)})
    return targets


def all_targets_met(targets: list[dict]) -> bool:
    return bool(targets) and all(t["met"] is True and t.get("complete", True) for t in targets)


def interleave(lists: list[list], weights: list[int]) -> list:
    """Round-robin over ``lists``, taking ``weights[i]`` items of list i per turn, so that
    a budget cut leaves every section with part of its grid."""
    out, pos = [], [0] * len(lists)
    while any(p < len(lst) for p, lst in zip(pos, lists)):
        for i, lst in enumerate(lists):
            out.extend(lst[pos[i]:pos[i] + weights[i]])
            pos[i] += weights[i]
    return out


# ============================================================================ time budget
class Budget:
    """Seconds left of the suite's budget, and whether an entry estimated at ``cost``
    seconds still fits."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(seconds)
        self.clock = clock
        self.t0 = clock()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, cost: float) -> bool:
        return self.left() >= cost


class CostModel:
    """Running estimate of an entry's wall time per section (first guesses until one ran)."""

    def __init__(self, guesses: dict[str, float]):
        self.guesses = dict(guesses)
        self.seen: dict[str, list[float]] = {}

    def estimate(self, section: str) -> float:
        s = self.seen.get(section)
        return statistics.median(s) if s else self.guesses.get(section, 10.0)

    def record(self, section: str, seconds: float) -> None:
        self.seen.setdefault(section, []).append(seconds)


# ============================================================================ output
def default_out_path(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu.json"
    return ROOT / "benchmarks" / "results" / "gpu.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    os.replace(tmp, path)


def write_plot(data: dict, path: Path) -> tuple[Optional[str], str]:
    """Speed ratio against M (K/V projection, decode module, PIFA) and against prefill
    length (MLA block, with the FLOP model's ideal). Returns (path or None, note)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # matplotlib is optional
        return None, f"no plot: matplotlib unavailable ({type(e).__name__}: {e})"
    try:
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
        groups: dict[str, list] = {}
        for sec, label in (("bd_kv_projection", "K/V proj"), ("bd_kv_module", "decode step"),
                           ("pifa_layer", "PIFA layer")):
            for e in _measured(data, sec):
                key = f"{label} {e['heads']}h {e['dtype']}" if "heads" in e else f"{label} {e['dtype']}"
                groups.setdefault(key, []).append((e["M"], e["ratio_vs_inductor"]))
        for key, pts in sorted(groups.items()):
            pts.sort()
            style = "--" if key.startswith("decode") else (":" if key.startswith("PIFA") else "-")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", label=key)
        ax.set_xscale("log", base=2)
        for y, txt in ((KV_LARGE_RATIO, f"target K/V M>={KV_LARGE_M}, PIFA"), (KV_SMALL_RATIO, f"target K/V M<={KV_SMALL_M}"),
                       (FLOOR_RATIO, "floor"), (1.0, "")):
            ax.axhline(y, color="grey", lw=0.8, ls="-" if y == 1.0 else "--")
            if txt:
                ax.text(0.01, y, txt, fontsize=7, va="bottom", color="grey", transform=ax.get_yaxis_transform())
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("Inductor time / bd time")
        ax.set_title(f"bd vs Inductor: {data.get('device')}")
        if groups:
            ax.legend(fontsize=7)
        mla: dict[str, list] = {}
        for e in _measured(data, "mla_block"):
            mla.setdefault(e["dtype"], []).append((e["tokens"], e["ratio_vs_inductor"], e.get("ideal_gain")))
        for dt, pts in sorted(mla.items()):
            pts.sort()
            line, = ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"MLA block {dt}")
            if all(p[2] for p in pts):
                ax2.plot([p[0] for p in pts], [p[2] for p in pts], ":", marker="x", color=line.get_color(),
                         label=f"FLOP-model ideal {dt}")
        ax2.axhline(1.0, color="grey", lw=0.8)
        ax2.set_xscale("log", base=2)
        ax2.set_xlabel("prefill tokens")
        ax2.set_title("MLA block (DeepSeek-V2-Lite shapes)")
        if mla:
            ax2.legend(fontsize=7)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return str(path), "written"
    except Exception as e:
        return None, f"no plot: plotting failed ({type(e).__name__}: {e})"


# ============================================================================ pytest
_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's final summary line (the last line that has any)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0, "deselected": 0}
    for line in reversed(text.strip().splitlines()[-40:]):
        found = _PYTEST_COUNT.findall(line)
        if found and (" in " in line or "no tests ran" in line):
            for n, what in found:
                if what.startswith("warning"):
                    continue
                counts["errors" if what.startswith("error") else what] = int(n)
            counts["summary"] = line.strip(" =")
            return counts
    counts["summary"] = None
    return counts


def ensure_bd_registered() -> str:
    """Make ``backend="bd"`` resolvable without ``pip install`` (the entry point is then
    absent): register :func:`bdpass.bd_backend` under that name unless it resolves."""
    from torch._dynamo.backends import registry

    try:
        registry.lookup_backend("bd")
        return "found (entry point or earlier registration)"
    except Exception:
        import bdpass

        registry.register_backend(compiler_fn=bdpass.bd_backend, name="bd")
        return "registered by benchmarks/gpu_suite.py"


def pytest_configure(config):  # pytest plugin hook (``-p gpu_suite``, used by the suite's subprocess)
    ensure_bd_registered()


def start_gpu_pytest(log_path: Path) -> tuple[subprocess.Popen, Any, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("TRITON_INTERPRET", None)        # the gpu tests launch real kernels (or skip)
    env["PYTHONUNBUFFERED"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", "-p", "gpu_suite",
           "-p", "no:cacheprovider"]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log, time.monotonic()


def finish_gpu_pytest(proc: subprocess.Popen, log, started: float, limit: float, log_path: Path) -> dict:
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, limit - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)       # the process group this suite started
            proc.wait(timeout=10)
        except Exception:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except Exception:
                pass
    log.close()
    text = log_path.read_text(errors="replace")
    res = parse_pytest_summary(text)
    res.update({"command": "python -m pytest -m gpu -q tests -p gpu_suite -p no:cacheprovider",
                "returncode": proc.returncode, "timed_out": timed_out, "limit_s": limit,
                "seconds": round(time.monotonic() - started, 1), "log": str(log_path), "tail": text[-3000:]})
    res["ok"] = (not timed_out and proc.returncode in (0, 5) and res["failed"] == 0 and res["errors"] == 0
                 and res["summary"] is not None)
    return res


# ============================================================================ suite
class Suite:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dry = bool(args.dry_run)
        self.budget = Budget(args.budget_s)
        self.out = default_out_path(args.out)
        self.only = set(args.only.split(",")) if args.only else None
        self.torch = torch
        self.device = "cpu" if self.dry else "cuda"
        self.lowering = "aot_eager" if self.dry else "inductor"
        self.data: dict = {"suite": "bdpass gpu suite", "schema": SCHEMA_VERSION, "dry_run": self.dry,
                           "status": "running", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
                           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           "budget_s": args.budget_s, "section_seconds": {}, "skipped": [], "errors": []}
        for s in MEASUREMENT_SECTIONS:
            self.data[s] = []
        self._kv_factors: dict = {}
        self.costs = CostModel({"bd_kv_projection": 2.0 if self.dry else 5.0,
                                "bd_kv_module": 3.0 if self.dry else 10.0,
                                "pifa_layer": 2.0 if self.dry else 12.0,
                                "mla_block": 5.0 if self.dry else 15.0})

    # ------------------------------------------------------------------ plumbing
    def want(self, name: str) -> bool:
        return self.only is None or name in self.only

    def save(self) -> None:
        self.data["elapsed_s"] = round(self.budget.elapsed(), 1)
        self.data["targets"] = evaluate_targets(self.data)
        self.data["targets_met"] = all_targets_met(self.data["targets"])
        write_json(self.out, self.data)

    def log(self, msg: str) -> None:
        print(f"[{self.budget.elapsed():6.1f}s] {msg}", flush=True)

    def error(self, where: str, e: BaseException) -> str:
        text = f"{type(e).__name__}: {e}"[:2000]
        self.data["errors"].append({"where": where, "error": text, "traceback": traceback.format_exc()[-4000:]})
        self.log(f"ERROR in {where}: {text[:300]}")
        return text

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        t = time.monotonic()
        self.log(f"== {name}")
        try:
            fn()
        except Exception as e:          # a broken section must not stop the others
            self.error(name, e)
        self.data["section_seconds"][name] = round(time.monotonic() - t, 1)
        self.save()

    def bd(self, mode: Optional[str] = None, **options) -> Callable:
        """The ``bd`` backend with options and mode (``torch.compile`` takes one or the other,
        so they are bound here, as ``bdpass.explain`` does)."""
        import bdpass

        opts = {"cost_model": False, "lowering": self.lowering, **options}

        def bd_backend(gm, example_inputs):
            return bdpass.bd_backend(gm, example_inputs, options=opts, mode=mode)
        return bd_backend

    def compile_plain(self, fn, mode: Optional[str] = None, dynamic: Optional[bool] = False):
        """The baseline: Inductor (aot_eager in the dry run, where the bd side lowers with
        aot_eager too)."""
        torch = self.torch
        if self.dry:
            return torch.compile(fn, backend="aot_eager", dynamic=dynamic)
        return torch.compile(fn, backend="inductor", mode=mode, dynamic=dynamic)

    def sync(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    # ------------------------------------------------------------------ run
    def run(self) -> int:
        self.environment()
        self.save()
        pytest_job = None
        if self.want("pytest") and not self.args.skip_pytest:
            log_path = self.out.with_name(self.out.stem + "_pytest.log")
            pytest_job = start_gpu_pytest(log_path) + (log_path,)
            self.log("started pytest -m gpu in a subprocess")
        if self.want("kernels"):
            self.section("kernel_checks", self.kernel_checks)
        if self.want("compile"):
            self.section("compile_checks", self.compile_checks)
        if pytest_job is not None:
            def wait_pytest():
                limit = self.args.pytest_timeout
                self.data["gpu_pytest"] = finish_gpu_pytest(pytest_job[0], pytest_job[1], pytest_job[2],
                                                            limit, pytest_job[3])
                g = self.data["gpu_pytest"]
                self.log(f"pytest -m gpu: {g.get('summary')} (rc {g['returncode']}, timed out {g['timed_out']})")
            self.section("gpu_pytest", wait_pytest)
        self.data["checks"] = self.check_totals()
        if any(self.want(s) for s in ("kv", "kv_module", "pifa", "mla")):
            self.section("measurements", self.measurements)
        plot_path = self.out.with_name(self.out.stem + "_ratio.png")
        p, note = write_plot(self.data, plot_path)
        self.data["plot"], self.data["plot_note"] = p, note
        self.data["status"] = "complete"
        self.data["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.save()
        self.summary()
        return 0

    def environment(self) -> None:
        torch = self.torch
        d = self.data
        d["torch"] = torch.__version__
        try:
            import triton
            d["triton"] = triton.__version__
        except Exception as e:
            d["triton"] = None
            d["triton_error"] = f"{type(e).__name__}: {e}"
        try:
            import transformers
            d["transformers"] = transformers.__version__
        except Exception:
            d["transformers"] = None
        d["python"] = platform.python_version()
        d["cuda"] = torch.version.cuda
        if self.dry:
            d["device"] = f"cpu ({platform.machine()}, dry run)"
        else:
            if not torch.cuda.is_available():
                raise SystemExit("gpu_suite: no CUDA device (use --dry-run on a CPU machine)")
            d["device"] = torch.cuda.get_device_name()
            props = torch.cuda.get_device_properties(0)
            d["device_properties"] = {"sm_count": props.multi_processor_count,
                                      "memory_gib": round(props.total_memory / 2 ** 30, 1),
                                      "capability": f"{props.major}.{props.minor}",
                                      "l2_cache_bytes": getattr(props, "L2_cache_size", None)}
            torch.backends.cuda.matmul.allow_tf32 = False       # float32 checks are IEEE on both sides
            torch.backends.cudnn.allow_tf32 = False
        try:
            d["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=str(ROOT), capture_output=True,
                                             text=True, timeout=10).stdout.strip() or None
            d["git_dirty"] = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                                 cwd=str(ROOT), capture_output=True, text=True,
                                                 timeout=10).stdout.strip())
        except Exception:
            d["git_commit"] = None
        d["bd_backend"] = ensure_bd_registered()
        d["lowering"] = self.lowering
        d["timer"] = ("time.perf_counter median (dry run)" if self.dry else
                      "triton.testing.do_bench median over CUDA-graph replays (L2 flushed before each replay)")
        for k in ("TORCHINDUCTOR_MAX_AUTOTUNE", "TRITON_INTERPRET", "TORCHINDUCTOR_CACHE_DIR"):
            if os.environ.get(k):
                d.setdefault("env", {})[k] = os.environ[k]
        self.log(f"device {d['device']}, torch {d['torch']}, triton {d['triton']}, "
                 f"transformers {d['transformers']}, bd backend {d['bd_backend']}")

    def check_totals(self) -> dict:
        kc = self.data.get("kernel_checks") or {}
        cc = self.data.get("compile_checks") or {}
        gp = self.data.get("gpu_pytest") or {}
        return {"kernel_checks": {"passed": kc.get("passed", 0), "failed": kc.get("failed", 0)},
                "compile_checks": {"passed": cc.get("passed", 0), "failed": cc.get("failed", 0),
                                   "skipped": cc.get("skipped", 0)},
                "gpu_pytest": {k: gp.get(k) for k in ("passed", "failed", "errors", "skipped", "timed_out")},
                "all_passed": (kc.get("failed", 1) == 0 and kc.get("passed", 0) > 0
                               and cc.get("failed", 1) == 0 and cc.get("passed", 0) > 0
                               and (gp.get("ok", False) if gp else self.args.skip_pytest))}

    # ================================================================== kernel checks
    def kernel_checks(self) -> None:
        torch = self.torch
        import inductor_lowerings
        import test_kernels as tk

        res = {"passed": 0, "failed": 0, "cases": [],
               "has_triton_kernels": bool(inductor_lowerings.HAS_TRITON_KERNELS),
               "interpret": os.environ.get("TRITON_INTERPRET") == "1"}
        self.data["kernel_checks"] = res
        dev = self.device
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        # The ops run the Triton kernels on CUDA (one rounding in the epilogue), the aten
        # implementation elsewhere (up to three roundings).
        op_round = 1 if (dev == "cuda" and inductor_lowerings.HAS_TRITON_KERNELS) else 3

        def record(name: str, kind: str, dtype: str, fn: Callable[[], float]) -> None:
            entry = {"name": name, "kind": kind, "dtype": dtype}
            try:
                r = fn()
                entry["error_ratio"] = r
                entry["ok"] = bool(r <= 1.0)
            except Exception as e:
                entry["ok"] = False
                entry["error"] = f"{type(e).__name__}: {e}"[:500]
            res["cases"].append(entry)
            res["passed" if entry["ok"] else "failed"] += 1
            if not entry["ok"]:
                self.log(f"kernel check FAILED: {name}: {entry.get('error', entry.get('error_ratio'))}")

        def poison(numel: int, dtype) -> None:
            """Fill the allocator's next block of this size with NaN, so that an output
            element the kernel does not write fails the check."""
            if dev == "cuda":
                t = torch.full((max(numel, 1),), float("nan"), dtype=dtype, device=dev)
                del t

        bd_cases = list(tk.BD_CASES) + [
            tk.BdCase("odd_m33_g40_d100", (3, 11), 3, 40, 100, False),
            tk.BdCase("odd_shared_m5_g20_d59", (5,), 2, 20, 59, True, config=(16, 32, 16)),
        ]
        piv_cases = list(tk.PIVOT_CASES) + [tk.PivotCase("odd_m5_r33", (5,), 101, 33, 77)]
        if not self.dry:      # production shapes, odd token counts: too slow for the interpreter
            bd_cases += [tk.BdCase("dsv2_m1031_h16_g128", (1031,), 16, 128, 512, False),
                         tk.BdCase("dsv2_shared_m1031_khg", (1031,), 16, 128, 512, True, khg_weights=True)]
            piv_cases += [tk.PivotCase("m1031_d512_r256", (1031,), 512, 256, 640)]

        from inductor_lowerings.triton_kernels import INTERPRET, bd_project_triton, pivot_linear_triton

        default_cfg = None if INTERPRET else (64, 64, 32)   # explicit config: one compile per variant
        dnames = list(dtypes)

        def cfg_of(case):
            c = case.config or default_cfg
            return None if c is None else dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), c))

        # 1. launchers, every shape in every dtype; bias variants rotate over (shape, dtype)
        for i, case in enumerate(bd_cases):
            for j, dt in enumerate(dnames):
                b = list(tk.BIAS)[(i + j) % len(tk.BIAS)]

                def run(case=case, dt=dt, b=b, i=i):
                    p = tk.make_bd(case, dtypes[dt], tk.BIAS[b][0], seed=i)
                    ref, tol = tk.bd_reference(p, n_round=1, truncating=INTERPRET)
                    pd = tk._to(p, dev)
                    poison(math.prod(case.lead) * case.H * case.G, dtypes[dt])
                    y = bd_project_triton(*tk._bd_args(pd), config=cfg_of(case))
                    return tk.error_ratio(y, ref, tol)
                record(f"bd_project_triton/{case.name}/{b}/{dt}", "launcher", dt, run)
        for i, case in enumerate(piv_cases):
            for j, dt in enumerate(dnames):
                b = list(tk.PIVOT_BIAS)[(i + j) % len(tk.PIVOT_BIAS)]

                def run(case=case, dt=dt, b=b, i=i):
                    p = tk.make_pivot(case, dtypes[dt], tk.PIVOT_BIAS[b], seed=i)
                    ref, tol = tk.pivot_reference(p, n_round=1, truncating=INTERPRET)
                    pd = tk._to(p, dev)
                    poison(math.prod(case.lead) * case.d_out, dtypes[dt])
                    y = pivot_linear_triton(*tk._pivot_args(pd), config=cfg_of(case))
                    return tk.error_ratio(y, ref, tol)
                record(f"pivot_linear_triton/{case.name}/{b}/{dt}", "launcher", dt, run)
        self.save()

        # 2. the ops (autotuned kernels on CUDA: each variant compiles every configuration, so
        # the per-head BD projection in every dtype, the rest rotated over the dtypes)
        op_bd = [bd_cases[2] if self.dry else bd_cases[-2], tk.BD_CASES[5]]     # per-head bias, shared M=1
        op_piv = piv_cases[-1]
        for k, dt in enumerate(dnames):
            for case, bias in zip(op_bd, (True, False)):
                if case.shared and k != 1:
                    continue

                def run(case=case, dt=dt, bias=bias):
                    p = tk.make_bd(case, dtypes[dt], bias, seed=7)
                    ref, tol = tk.bd_reference(p, n_round=op_round)
                    pd = tk._to(p, dev)
                    poison(math.prod(case.lead) * case.H * case.G, dtypes[dt])
                    y = torch.ops.bdpass.bd_project(*tk._bd_args(pd))
                    return tk.error_ratio(y, ref, tol)
                record(f"op bd_project/{case.name}/{'bias' if bias else 'nobias'}/{dt}", "op", dt, run)

            def run_p(dt=dt):
                p = tk.make_pivot(op_piv, dtypes[dt], (True, False), seed=7)
                ref, tol = tk.pivot_reference(p, n_round=op_round)
                pd = tk._to(p, dev)
                poison(math.prod(op_piv.lead) * op_piv.d_out, dtypes[dt])
                y = torch.ops.bdpass.pivot_linear(*tk._pivot_args(pd))
                return tk.error_ratio(y, ref, tol)
            if k != 1:
                record(f"op pivot_linear/{op_piv.name}/bp_only/{dt}", "op", dt, run_p)
        self.save()

        # 3. the ops under torch.compile, one graph for several token counts
        sizes = (1, 7, 300) if self.dry else (1, 7, 1031)
        dt = "bf16"
        for which in ("bd_project", "bd_project_shared", "pivot_linear"):
            def run_c(which=which):
                torch._dynamo.reset()
                if which.startswith("bd"):
                    case = tk.BdCase("c", (1,), 4, 64, 256, which.endswith("shared")) if not self.dry \
                        else tk.BdCase("c", (1,), 2, 12, 40, which.endswith("shared"))
                    p = tk.make_bd(case, dtypes[dt], True, seed=3)
                    pd = tk._to(p, dev)
                    rest_args = tk._bd_args(pd)[1:]
                    op, ref_fn = torch.ops.bdpass.bd_project, tk.bd_reference
                else:
                    case = tk.PivotCase("c", (1,), 256, 96, 320) if not self.dry else tk.PivotCase("c", (1,), 40, 12, 30)
                    p = tk.make_pivot(case, dtypes[dt], (True, True), seed=3)
                    pd = tk._to(p, dev)
                    rest_args = tk._pivot_args(pd)[1:]
                    op, ref_fn = torch.ops.bdpass.pivot_linear, tk.pivot_reference
                f = self.compile_plain(lambda x: op(x, *rest_args), dynamic=True)
                worst = 0.0
                g = torch.Generator().manual_seed(11)
                for M in sizes:
                    x = torch.randn(M, p["x"].shape[-1], generator=g, dtype=torch.float64).to(dtypes[dt])
                    y = f(x.to(dev))
                    ref, tol = ref_fn({**p, "x": x}, n_round=op_round)
                    worst = max(worst, tk.error_ratio(y, ref, tol))
                return worst
            record(f"compiled {which}/M={','.join(map(str, sizes))}/{dt}", "compiled_op", dt, run_c)
        torch._dynamo.reset()
        self.log(f"kernel checks: {res['passed']} passed, {res['failed']} failed")

    # ================================================================== compile checks
    def _mla_model(self, layers: int):
        import zoo

        errors = []
        for experts in ("batched_mm", "eager"):     # both have float64 kernels; grouped_mm has none
            try:
                model, _, _ = zoo.build("deepseek_v2", layers=layers, experts_implementation=experts)
                return model, experts
            except Exception as e:
                errors.append(f"{experts}: {type(e).__name__}: {e}")
        try:   # a transformers without experts_implementation: dense layers only (no MoE)
            import transformers

            cfg = zoo.config_for("deepseek_v2", layers=layers, first_k_dense_replace=layers)
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
            zoo._rescale_init(model, 0)
            return model, f"none (dense layers only; {'; '.join(errors)[:300]})"
        except Exception as e:
            errors.append(f"dense: {type(e).__name__}: {e}")
        raise RuntimeError(f"could not build the DeepSeek-V2 model: {errors}")

    def _pifa_model(self):
        from lowrank_models import SvdLinear

        d, r = (64, 24) if self.dry else (256, 96)
        self.torch.manual_seed(5)
        return nn.Sequential(SvdLinear(d, r, d), nn.GELU(), SvdLinear(d, r, d)).eval(), d

    def compile_checks(self) -> None:
        torch = self.torch
        import bdpass

        res = {"passed": 0, "failed": 0, "skipped": 0, "cases": []}
        self.data["compile_checks"] = res
        self.data["explain"] = {}
        # (model, mode, dtype, dynamic, sizes, layers); ordered by importance: the rest is
        # skipped when the checks run past --checks-budget-s
        sizes = [(2, 12), (3, 17), (1, 33)]
        plan = [
            ("pifa", None, "fp32", True, sizes, None),
            ("mla", None, "fp32", True, sizes, 2),
            ("pifa", "reduce-overhead", "fp16", False, sizes[:1], None),
            ("mla", "reduce-overhead", "bf16", False, sizes[:1], 1),
            ("pifa", "max-autotune", "bf16", False, sizes[:1], None),
            ("pifa", None, "bf16", True, sizes, None),
            ("mla", None, "bf16", True, sizes, 1),
            ("mla", "max-autotune", "fp16", False, sizes[:1], 1),     # the slowest to compile: last
        ]
        if self.dry:   # Dynamo traces the transformers model in ~7 s per backend on a CI CPU
            plan = [c for c in plan if c[0] == "pifa" and not (c[2] == "bf16" and c[1] is None)]
            plan += [("mla", None, "fp32", True, sizes[:2], 1)]
        for name, mode, dt, dynamic, szs, layers in plan:
            cid = f"{name}/{mode or 'default'}/{dt}/{'dynamic' if dynamic else 'static'}"
            if self.budget.elapsed() > self.args.checks_budget_s:
                res["skipped"] += 1
                res["cases"].append({"name": cid, "skipped": "checks time budget (--checks-budget-s)"})
                self.data["skipped"].append({"section": "compile_checks", "entry": cid, "reason": "time budget"})
                continue
            self.log(f"compile check {cid}")
            t = time.monotonic()
            try:
                entry = self._compile_case(name, mode, dt, dynamic, szs, layers)
            except Exception as e:
                entry = {"name": cid, "ok": False, "error": self.error(f"compile check {cid}", e)}
                torch._dynamo.reset()
            entry["name"] = cid
            entry["seconds"] = round(time.monotonic() - t, 1)
            res["cases"].append(entry)
            res["passed" if entry["ok"] else "failed"] += 1
            if not entry["ok"]:
                self.log(f"compile check FAILED: {cid}: {entry.get('error') or entry.get('why')}")
            self.save()
        # bdpass.explain: which rewrites apply to each model (cost model off, as measured).
        # The lowering does not change what is rewritten: aot_eager saves Inductor's time.
        for name in ("mla", "pifa"):
            try:
                model, make = self._model_and_inputs(name, "fp32", 1 if self.dry else 2)
                args, kwargs = make((2, 12), 0)
                with torch.no_grad():
                    rep = bdpass.explain(model, *args, options={"cost_model": False, "lowering": "aot_eager"},
                                         **kwargs)
                self.data["explain"][name] = {"options": {"cost_model": False, "lowering": "aot_eager"},
                    "text": str(rep)[:8000],
                    "rewrites": [{"kind": r.kind, "site": r.site, "cond": r.cond, "error_bound": r.error_bound,
                                  "shared_basis": r.details.get("shared_basis")} for r in rep.rewrites],
                    "skipped": [{"kind": s.kind, "site": s.site, "reason": s.reason} for s in rep.skipped],
                    "params_before": rep.params_before, "params_after": rep.params_after}
            except Exception as e:
                self.data["explain"][name] = {"error": self.error(f"explain {name}", e)}
        torch._dynamo.reset()
        self.log(f"compile checks: {res['passed']} passed, {res['failed']} failed, {res['skipped']} skipped")

    def _model_and_inputs(self, name: str, dt: str, layers: Optional[int]):
        torch = self.torch
        dtype = getattr(torch, DTYPE_NAMES[dt])
        dev = self.device
        if name == "mla":
            model, experts = self._mla_model(layers)
            model = model.to(device=dev, dtype=dtype).eval()
            vocab = model.config.vocab_size

            def make(size, seed):
                g = torch.Generator().manual_seed(100 + seed)
                return (torch.randint(3, vocab, size, generator=g).to(dev),), {}
            model._suite_experts = experts
            return model, make
        model, d = self._pifa_model()
        model = model.to(device=dev, dtype=dtype)

        def make(size, seed):
            g = torch.Generator().manual_seed(200 + seed)
            return (torch.randn(*size, d, generator=g).to(device=dev, dtype=dtype),), {}
        return model, make

    def _compile_case(self, name, mode, dt, dynamic, sizes, layers) -> dict:
        torch = self.torch
        import bdpass
        from helpers import first_tensor, rel_l2, to64
        from torch._dynamo.utils import counters

        model, make = self._model_and_inputs(name, dt, layers)
        ref_model = copy.deepcopy(model).double()        # the same rounded weights, in float64
        inputs = [make(s, k) for k, s in enumerate(sizes)]
        graphs = mode in ("reduce-overhead", "max-autotune")   # both modes turn on CUDA graphs
        reps = 3 if graphs else 1                        # cudagraph trees: warm up, record, replay
        expect = {"pifa"} if name == "pifa" else {"bd_qk", "bd_vo"}

        def run(compiled):
            outs = []
            for args, kwargs in inputs:
                for _ in range(reps):
                    if graphs and hasattr(torch.compiler, "cudagraph_mark_step_begin"):
                        torch.compiler.cudagraph_mark_step_begin()
                    y = first_tensor(compiled(*args, **kwargs)).detach().clone()
                outs.append(y)
            return outs

        entry: dict = {"model": name, "mode": mode or "default", "dtype": DTYPE_NAMES[dt], "dynamic": dynamic,
                       "sizes": [list(s) for s in sizes], "layers": layers,
                       "experts_implementation": getattr(model, "_suite_experts", None),
                       "lowering": self.lowering}
        if self.dry and mode:
            entry["note"] = "dry run: aot_eager lowering on both sides, the mode is not exercised"
        with torch.no_grad():
            refs = [first_tensor(ref_model(*to64(a), **to64(k))) for a, k in inputs]
            del ref_model
            torch._dynamo.reset()
            n0 = counters["stats"]["unique_graphs"]
            t = time.monotonic()
            ind = run(self.compile_plain(model, mode=mode, dynamic=dynamic))
            entry["inductor_graphs"] = counters["stats"]["unique_graphs"] - n0
            entry["inductor_s"] = round(time.monotonic() - t, 1)
            torch._dynamo.reset()
            n0 = counters["stats"]["unique_graphs"]
            t = time.monotonic()
            with bdpass.collect_reports() as rep:
                bd = run(torch.compile(model, backend=self.bd(mode), dynamic=dynamic))
            entry["bd_graphs"] = counters["stats"]["unique_graphs"] - n0
            entry["bd_s"] = round(time.monotonic() - t, 1)
            torch._dynamo.reset()
        kinds = sorted({r.kind for r in rep.rewrites})
        fallbacks = [g.fallback for g in rep.graphs if g.fallback]
        bound = max([r.error_bound for r in rep.rewrites] or [1.0])
        per_size = []
        for s, y_b, y_i, ref in zip(sizes, bd, ind, refs):
            e_b, e_i = rel_l2(y_b, ref), rel_l2(y_i, ref)
            per_size.append({"size": list(s), "err_bd": e_b, "err_inductor": e_i,
                             "error_ratio": e_b / e_i if e_i > 0 else (1.0 if e_b == 0 else math.inf),
                             "finite": bool(torch.isfinite(y_b).all())})
        tol = VERIFY_TOL[DTYPE_NAMES[dt]]
        entry.update(rewrites=kinds, n_rewrites=len(rep.rewrites), fallbacks=fallbacks, max_error_bound=bound,
                     tolerance=tol, per_size=per_size,
                     err_bd=max(p["err_bd"] for p in per_size), err_inductor=max(p["err_inductor"] for p in per_size),
                     error_ratio=max(p["error_ratio"] for p in per_size),
                     validation=[g.validation for g in rep.graphs if g.validation],
                     custom_ops=sorted(_custom_ops(rep)))
        why = []
        if not all(p["finite"] for p in per_size):
            why.append("non-finite bd output")
        if not expect <= set(kinds):
            why.append(f"expected rewrites {sorted(expect)}, got {kinds}")
        if fallbacks:
            why.append(f"fell back: {fallbacks[0]}")
        if entry["err_bd"] > tol:
            why.append(f"bd error {entry['err_bd']:.3g} > {tol:g}")
        if entry["error_ratio"] > max(1.0, bound):
            why.append(f"bd/inductor error ratio {entry['error_ratio']:.3g} > the reported error bound {bound:.3g}")
        if dynamic and entry["bd_graphs"] > entry["inductor_graphs"]:
            why.append(f"bd compiled {entry['bd_graphs']} graphs for {len(sizes)} sizes, "
                       f"Inductor {entry['inductor_graphs']}")
        entry["ok"] = not why
        if why:
            entry["why"] = "; ".join(why)
        return entry

    # ================================================================== measurements
    def measurements(self) -> None:
        torch = self.torch
        if not self.dry:
            import triton.testing  # noqa: F401  (fail early if absent)
        if hasattr(torch._dynamo.config, "recompile_limit"):
            torch._dynamo.config.recompile_limit = 64
        if hasattr(torch._dynamo.config, "cache_size_limit"):
            torch._dynamo.config.cache_size_limit = 64
        core, extended = self.plan()
        self.data["measurement_plan"] = {"core": [list(p) for p in core], "extended": [list(p) for p in extended]}
        runners = {"bd_kv_projection": self.measure_kv, "bd_kv_module": self.measure_kv_module,
                   "pifa_layer": self.measure_pifa, "mla_block": self.measure_mla}
        done = set()
        for item in core + extended:
            if item in done:
                continue
            done.add(item)
            section, params = item[0], item[1:]
            est = self.costs.estimate(section)
            if not self.budget.allows(est):
                self.data["skipped"].append({"section": section, "entry": list(params),
                                             "reason": f"time budget: {self.budget.left():.0f} s left, "
                                                       f"entry estimated at {est:.0f} s"})
                continue
            t = time.monotonic()
            try:
                entry = runners[section](*params)
            except Exception as e:
                entry = {"params": list(params), "error": self.error(f"{section} {params}", e)}
                self._free()
            entry["seconds"] = round(time.monotonic() - t, 1)
            self.costs.record(section, entry["seconds"])
            self.data[section].append(entry)
            self._form_onto_projection()
            self.save()
            if "ratio_vs_inductor" in entry:
                self.log(f"{section} {params}: inductor {entry['ms_inductor']:.4f} ms, bd {entry['ms_bd']:.4f} ms, "
                         f"ratio {entry['ratio_vs_inductor']:.3f} (ideal {entry.get('ideal_gain') or 0:.3f}) "
                         f"[{entry['seconds']} s]")

    def plan(self) -> tuple[list, list]:
        f16, b16 = "float16", "bfloat16"
        if self.dry:
            core = [("bd_kv_projection", f16, 16, 4), ("bd_kv_projection", b16, 16, 64),
                    ("bd_kv_projection", f16, 128, 16), ("bd_kv_module", f16, 16, 32),
                    ("pifa_layer", f16, 4), ("pifa_layer", f16, 32), ("mla_block", f16, 16)]
            return core, [("mla_block", b16, 8)]
        core = [("bd_kv_projection", dt, 16, M) for dt in (f16, b16) for M in (16, 1024, 16384)]
        core += [("bd_kv_projection", f16, 128, 4096), ("pifa_layer", f16, 16), ("pifa_layer", f16, 4096),
                 ("mla_block", f16, 2048), ("mla_block", b16, 2048), ("bd_kv_module", f16, 16, 4096)]
        kv = [("bd_kv_projection", dt, 16, M) for dt in (f16, b16) for M in (16, 64, 256, 1024, 4096, 16384, 65536)]
        kv += [("bd_kv_projection", dt, 128, M) for dt in (f16, b16) for M in (16, 256, 1024, 4096, 16384, 65536)]
        pifa = [("pifa_layer", f16, M) for M in (256, 1024, 16384)]
        mla = [("mla_block", dt, T) for dt in (f16, b16) for T in (512, 8192)]
        module = [("bd_kv_module", dt, 16, M) for dt in (f16, b16) for M in (16, 1024, 16384)]
        return core, interleave([kv, pifa, mla, module], weights=[3, 1, 1, 1])

    def _free(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    # ------------------------------------------------------------------ timing
    def _copies(self, bytes_per_call: int) -> int:
        """Calls per timed replay, each on its own inputs/weights, so that together they
        exceed the L2 cache three times over (at most 64)."""
        if self.dry:
            return 2
        l2 = (self.data.get("device_properties") or {}).get("l2_cache_bytes") or 50 * 2 ** 20
        return int(min(64, max(1, math.ceil(3 * l2 / max(bytes_per_call, 1)))))

    def _prepare(self, fn: Callable, arg_sets: list) -> tuple[Callable, str]:
        """A callable running ``fn`` once per argument set: a CUDA graph replay on the GPU
        (no launch overhead in the timing), plain calls in the dry run."""
        torch = self.torch
        for a in arg_sets:                    # compile, autotune, warm up
            fn(*a)
        for a in arg_sets:
            fn(*a)
        self.sync()
        if self.dry:
            return (lambda: [fn(*a) for a in arg_sets]), "plain calls"
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for a in arg_sets:
                    fn(*a)
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                keep = [fn(*a) for a in arg_sets]
            g.replay()
            self.sync()

            def replay(g=g, keep=keep):
                g.replay()
            return replay, "cuda graph"
        except Exception as e:
            self.sync()
            return (lambda: [fn(*a) for a in arg_sets]), f"plain calls (CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]})"

    def _time(self, run: Callable) -> float:
        if self.dry:
            ts = []
            for _ in range(3):
                t = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t)
            return statistics.median(ts) * 1e3
        import triton.testing

        return float(triton.testing.do_bench(run, warmup=self.args.warmup_ms, rep=self.args.rep_ms,
                                             return_mode="median"))

    def time_pair(self, f_ind: Callable, sets_ind: list, f_bd: Callable, sets_bd: list) -> dict:
        """Medians (ms per call) of the two, interleaved over ``--rounds`` rounds."""
        t = time.monotonic()
        run_i, how_i = self._prepare(f_ind, sets_ind)
        compile_i = time.monotonic() - t
        t = time.monotonic()
        run_b, how_b = self._prepare(f_bd, sets_bd)
        compile_b = time.monotonic() - t
        ti, tb = [], []
        for _ in range(min(self.args.rounds, 2) if self.dry else self.args.rounds):
            ti.append(self._time(run_i) / len(sets_ind))
            tb.append(self._time(run_b) / len(sets_bd))
        mi, mb = statistics.median(ti), statistics.median(tb)
        return {"ms_inductor": mi, "ms_bd": mb, "ratio_vs_inductor": mi / mb if mb > 0 else math.inf,
                "rounds_ms_inductor": ti, "rounds_ms_bd": tb, "calls_per_replay": len(sets_bd),
                "timing": how_b if how_b == how_i else f"inductor: {how_i}; bd: {how_b}",
                "warmup_s_inductor": round(compile_i, 2), "warmup_s_bd": round(compile_b, 2)}

    # ------------------------------------------------------------------ (a) K/V projection
    def _kv_dims(self) -> tuple[int, int]:
        return (64, 16) if self.dry else (512, 128)

    def _heads(self, heads: int) -> int:
        """Dry run: 16 heads -> 2, 128 -> 4 (same code, tiny shapes)."""
        return {16: 2, 128: 4}[heads] if self.dry else heads

    def measure_kv(self, dtype_name: str, heads: int, M: int) -> dict:
        torch = self.torch
        import test_kernels as tk
        from bdpass.identities import bd_factors
        from helpers import rel_l2

        torch._dynamo.reset()
        dtype = getattr(torch, dtype_name)
        dev = self.device
        d_in, g = self._kv_dims()
        H = self._heads(heads)
        gen = torch.Generator().manual_seed(1000 + H)
        W = torch.randn(d_in, H * g, generator=gen, dtype=torch.float64) / math.sqrt(d_in)   # x @ W
        W_r = W.to(dtype)                                          # the model's (rounded) weights
        key = (H, dtype_name)
        if key not in self._kv_factors:
            self._kv_factors[key] = bd_factors(W_r.double().reshape(d_in, H, g).permute(1, 0, 2).contiguous(),
                                               dtype=dtype)
        f = self._kv_factors[key]
        shared = bool(f.shared)
        elt = torch.finfo(dtype).bits // 8
        per_call = elt * (M * d_in + d_in * H * g + M * H * g)
        n = self._copies(per_call)
        xs = [torch.randn(M, d_in, generator=gen, dtype=torch.float32).to(device=dev, dtype=dtype) for _ in range(n)]
        w_lin = W_r.t().contiguous().to(dev)                       # nn.Linear layout (out, in)
        rows, rest, w_rest = f.rows.to(dev), f.rest_rows.to(dev), f.w_rest.to(device=dev, dtype=dtype)
        sets_i = [(x, w_lin.clone()) for x in xs]
        sets_b = [(x, rows.clone(), rest.clone(), w_rest.clone()) for x in xs]

        def dense(x, w):
            return F.linear(x, w)

        def bd_proj(x, rows, rest, w):
            return torch.ops.bdpass.bd_project(x, rows, rest, w, None, shared)

        f_i = self.compile_plain(dense, dynamic=False)
        f_b = self.compile_plain(bd_proj, dynamic=False)
        timing = self.time_pair(f_i, sets_i, f_b, sets_b)
        # correctness of what was timed: rows spread over M, against float64
        idx = torch.linspace(0, M - 1, min(M, 256)).round().long().unique()
        with torch.no_grad():
            y_b = f_b(*sets_b[0])[idx.to(dev)].cpu()
            y_i = f_i(*sets_i[0])[idx.to(dev)].cpu()
        x_sub = xs[0][idx.to(dev)].cpu()
        op_round = 1 if (dev == "cuda" and _has_triton_kernels()) else 3
        ref, tol = tk.bd_reference({"x": x_sub, "rows": f.rows, "rest": f.rest_rows, "w_rest": f.w_rest.cpu(),
                                    "bias": None}, n_round=op_round)
        ref_dense = x_sub.double() @ W_r.double()
        entry = {"M": M, "dtype": dtype_name, "heads": heads, "d_in": d_in, "d_h": g, "width": heads * g,
                 "form": "shared" if shared else "per_head", "max_cond": max(f.conds),
                 "ideal_gain": d_in / (d_in - g),
                 "method": "bdpass::bd_project (factors of bdpass.identities.bd_factors) vs the dense projection "
                           "F.linear, each compiled by " + ("Inductor" if not self.dry else "aot_eager (dry run)"),
                 "bd_error_over_bound": tk.error_ratio(y_b, ref, tol),
                 "rel_err_bd": rel_l2(y_b, ref), "rel_err_inductor": rel_l2(y_i, ref_dense),
                 "cost_model": _cost_estimate("bd", M, d_in, H, g, dtype, dev)}
        entry["correct"] = bool(entry["bd_error_over_bound"] <= 1.0)
        if self.dry:
            entry["heads_in_dry_run"] = H
        entry.update(timing)
        del sets_b
        if not self.args.no_bd_linear and hasattr(torch.ops.bdpass, "bd_linear"):
            try:
                ref3, tol3 = tk.bd_reference({"x": x_sub, "rows": f.rows, "rest": f.rest_rows,
                                              "w_rest": f.w_rest.cpu(), "bias": None}, n_round=3)
                entry["bd_linear"] = self._bd_linear_pair(f, shared, H, g, d_in, dtype, xs, f_i, sets_i, idx,
                                                          ref3, tol3)
            except Exception as e:      # the op is optional and may change shape: recorded, not fatal
                entry["bd_linear"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        del sets_i, xs
        self._free()
        return entry

    def _bd_linear_pair(self, f, shared, H, g, d_in, dtype, xs, f_i, sets_i, idx, ref, tol) -> dict:
        """The same projection through ``bdpass::bd_linear`` (one table per head, or one
        shared table and one block for all heads), against the dense projection again."""
        import test_kernels as tk

        torch = self.torch
        dev = self.device
        K = d_in - g
        if shared:
            sel, rest = [f.rows[0]], [f.rest_rows[0]]
            weight = [f.w_rest.permute(1, 0, 2).reshape(K, H * g)]
            table, cols = [0], [0]
        else:
            sel, rest = list(f.rows), list(f.rest_rows)
            weight = [f.w_rest[h] for h in range(H)]
            table, cols = list(range(H)), [h * g for h in range(H)]
        bias = [None] * len(weight)

        def copy_of(ts, dt=None):
            return [t.to(device=dev, dtype=dt or t.dtype).contiguous().clone() for t in ts]
        sets_l = [(x, copy_of(sel), copy_of(rest), copy_of(weight, dtype)) for x in xs]

        def bd_lin(x, sel, rest, w):
            return torch.ops.bdpass.bd_linear(x, sel, rest, w, bias, table, cols, H * g)

        f_l = self.compile_plain(bd_lin, dynamic=False)
        timing = self.time_pair(f_i, sets_i, f_l, sets_l)
        with torch.no_grad():
            y = f_l(*sets_l[0])[idx.to(dev)].cpu()
        err = tk.error_ratio(y, ref, tol)
        return {"ms_bd": timing["ms_bd"], "ms_inductor": timing["ms_inductor"],
                "ratio_vs_inductor": timing["ratio_vs_inductor"], "timing": timing["timing"],
                "tables": len(sel), "error_over_bound": err, "correct": bool(err <= 1.0)}

    def _form_onto_projection(self) -> None:
        """Copy the form the backend's report gave for the decode module (shared or per-head
        basis, custom op or aten lowering) onto the projection entries of the same dtype and
        heads, as ``backend_form``: what ``backend="bd"`` does with this projection (the
        entry itself always times the custom op)."""
        forms = {(e["dtype"], e["heads"]): e.get("report_form") for e in self.data["bd_kv_module"]
                 if e.get("report_form")}
        for e in self.data["bd_kv_projection"]:
            rf = forms.get((e.get("dtype"), e.get("heads")))
            if rf:
                e["backend_form"] = rf

    # ------------------------------------------------------------------ decode module
    def measure_kv_module(self, dtype_name: str, heads: int, M: int) -> dict:
        torch = self.torch
        import bdpass

        torch._dynamo.reset()
        dtype = getattr(torch, dtype_name)
        dev = self.device
        H = self._heads(heads)
        dims = dict(hidden=64, latent=32, nope=16, rope=8, v=16) if self.dry else \
            dict(hidden=2048, latent=512, nope=128, rope=64, v=128)
        torch.manual_seed(21)
        model = MLADecodeStep(heads=H, **dims).eval().to(device=dev, dtype=dtype)
        gen = torch.Generator().manual_seed(22)
        elt = torch.finfo(dtype).bits // 8
        per_call = elt * M * (dims["latent"] + dims["rope"] + H * (dims["nope"] + dims["v"]))
        n = self._copies(per_call)

        def inputs():
            return (torch.randn(1, 1, dims["hidden"], generator=gen).to(device=dev, dtype=dtype),
                    torch.randn(1, M, dims["latent"], generator=gen).to(device=dev, dtype=dtype),
                    torch.randn(1, 1, M, dims["rope"], generator=gen).to(device=dev, dtype=dtype))
        sets = [inputs() for _ in range(n)]
        with torch.no_grad():
            f_i = self.compile_plain(model, dynamic=False)
            with bdpass.collect_reports() as rep:
                f_b = torch.compile(model, backend=self.bd(), dynamic=False)
                timing = self.time_pair(f_i, sets, f_b, sets)
                y_b, y_i = f_b(*sets[0]).float(), f_i(*sets[0]).float()
            ref = copy.deepcopy(model).double()(*[t.double() for t in sets[0]])
        saved = sum(r.flops_saved for r in rep.rewrites) * M
        hd, lat, nope, rope, v = dims["hidden"], dims["latent"], dims["nope"], dims["rope"], dims["v"]
        flops = (2 * hd * H * (nope + rope) + 2 * M * lat * H * (nope + v) + 2 * H * M * (nope + rope)
                 + 2 * H * M * v + 2 * H * v * hd)
        saved_expected = 2 * M * H * (nope * nope + v * v)       # BD on QK (nope channels) and VO
        entry = {"M": M, "dtype": dtype_name, "heads": heads, "dims": dims,
                 "method": "MLA decode step (1 query, K/V from a latent cache of M tokens) compiled with "
                           "backend=bd (cost_model off) vs backend=" + ("inductor" if not self.dry else "aot_eager"),
                 "rewrites": sorted({r.kind for r in rep.rewrites}), "flops": flops, "flops_saved": saved,
                 "flops_saved_expected": saved_expected, "ideal_gain": flops / (flops - saved_expected),
                 "ideal_gain_applied": flops / (flops - saved) if saved else 1.0,
                 "report_form": _report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
                 "rel_err_bd": _rel(y_b, ref), "rel_err_inductor": _rel(y_i, ref),
                 "cost_model": _cost_estimate("bd", M, lat, H, nope, dtype, dev)}
        if self.dry:
            entry["heads_in_dry_run"] = H
        entry.update(timing)
        del sets, model
        self._free()
        return entry

    # ------------------------------------------------------------------ (b) PIFA layer
    def measure_pifa(self, dtype_name: str, M: int) -> dict:
        torch = self.torch
        import bdpass
        from lowrank_models import SvdLinear

        torch._dynamo.reset()
        dtype = getattr(torch, dtype_name)
        dev = self.device
        d, r = (64, 32) if self.dry else (4096, 2048)
        torch.manual_seed(31)
        model = SvdLinear(d, r, d).eval().to(device=dev, dtype=dtype)
        gen = torch.Generator().manual_seed(32)
        x = torch.randn(M, d, generator=gen).to(device=dev, dtype=dtype)
        with torch.no_grad():
            f_i = self.compile_plain(model, dynamic=False)
            with bdpass.collect_reports() as rep:
                # a large error budget: this entry measures speed (numerics: compile checks)
                f_b = torch.compile(model, backend=self.bd(error_budget=1e6), dynamic=False)
                timing = self.time_pair(f_i, [(x,)], f_b, [(x,)])
                idx = torch.linspace(0, M - 1, min(M, 256)).round().long().unique().to(dev)
                y_b, y_i = f_b(x)[idx].float(), f_i(x)[idx].float()
            ref = copy.deepcopy(model).double()(x[idx].double())
        orig = d * r + r * d
        new = d * r + r * (d - r)
        entry = {"M": M, "dtype": dtype_name, "d": d, "r": r, "ideal_gain": orig / new,
                 "method": "SvdLinear(d, r, d) compiled with backend=bd (cost_model off) vs backend="
                           + ("inductor" if not self.dry else "aot_eager"),
                 "rewrites": sorted({w.kind for w in rep.rewrites}),
                 "error_bound": max([w.error_bound for w in rep.rewrites] or [None], key=lambda v: v or 0),
                 "report_form": _report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
                 "rel_err_bd": _rel(y_b, ref), "rel_err_inductor": _rel(y_i, ref),
                 "cost_model": _cost_estimate("pifa", M, d, r, d, dtype, dev)}
        entry.update(timing)
        del model, x
        self._free()
        return entry

    # ------------------------------------------------------------------ (c) MLA block
    def measure_mla(self, dtype_name: str, T: int) -> dict:
        torch = self.torch
        import bdpass

        torch._dynamo.reset()
        dtype = getattr(torch, dtype_name)
        dev = self.device
        dims = dict(hidden=64, heads=4, latent=32, nope=16, rope=8, v=16) if self.dry else \
            dict(hidden=2048, heads=16, latent=512, nope=128, rope=64, v=128)
        torch.manual_seed(41)
        model = MLABlock(max_positions=max(T, 64), **dims).eval().to(device=dev, dtype=dtype)
        gen = torch.Generator().manual_seed(42)
        x = torch.randn(1, T, dims["hidden"], generator=gen).to(device=dev, dtype=dtype)
        with torch.no_grad():
            f_i = self.compile_plain(model, dynamic=False)
            with bdpass.collect_reports() as rep:
                f_b = torch.compile(model, backend=self.bd(), dynamic=False)
                timing = self.time_pair(f_i, [(x,)], f_b, [(x,)])
                y_b, y_i = f_b(x).float(), f_i(x).float()
            errs = {}
            if T <= 2048:
                ref = copy.deepcopy(model).double()(x.double())
                errs = {"rel_err_bd": _rel(y_b, ref), "rel_err_inductor": _rel(y_i, ref)}
        flops, saved_expected = mla_block_flops(T, **dims)
        saved = sum(w.flops_saved for w in rep.rewrites) * T
        # the FLOP model of the intended rewrites (BD on QK's nope channels and on VO); what
        # the report says was applied is kept beside it (a missing rewrite then shows as a
        # low share of the gain, not as a smaller target)
        ideal = flops / (flops - saved_expected)
        entry = {"tokens": T, "dtype": dtype_name, "dims": dims,
                 "method": "transformers DeepseekV2Attention (+ its rotary embedding), causal prefill, batch 1, "
                           "compiled with backend=bd (cost_model off) vs backend="
                           + ("inductor" if not self.dry else "aot_eager"),
                 "rewrites": sorted({w.kind for w in rep.rewrites}), "flops": flops, "flops_saved": saved,
                 "flops_saved_expected": saved_expected, "ideal_gain": ideal,
                 "ideal_gain_applied": flops / (flops - saved) if saved else 1.0,
                 "report_form": _report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
                 **errs}
        entry.update(timing)
        entry["gain_fraction"] = gain_fraction(entry["ratio_vs_inductor"], ideal)
        del model, x
        self._free()
        return entry

    # ------------------------------------------------------------------ summary
    def summary(self) -> None:
        d = self.data
        print("\n==== gpu suite summary ====", flush=True)
        c = d.get("checks", {})
        print(f"device {d.get('device')}  torch {d.get('torch')}  triton {d.get('triton')}  "
              f"elapsed {d.get('elapsed_s')} s  dry_run {d['dry_run']}")
        print(f"kernel checks {c.get('kernel_checks')}  compile checks {c.get('compile_checks')}  "
              f"gpu pytest {c.get('gpu_pytest')}")
        for s in MEASUREMENT_SECTIONS:
            for e in d[s]:
                key = " ".join(f"{k}={e[k]}" for k in ("dtype", "heads", "M", "tokens") if k in e)
                if "ratio_vs_inductor" in e:
                    print(f"{s:17s} {key:40s} inductor {e['ms_inductor']:.4f} ms  bd {e['ms_bd']:.4f} ms  "
                          f"ratio {e['ratio_vs_inductor']:.3f}  ideal {e.get('ideal_gain') or float('nan'):.3f}")
                else:
                    print(f"{s:17s} {key:40s} ERROR {e.get('error', '')[:120]}")
        for t in d.get("targets", []):
            print(f"target {t['name']:28s} met={t['met']} worst={t['worst']} n={t['n']} complete={t['complete']}")
        print(f"skipped {len(d['skipped'])} entries; errors {len(d['errors'])}; json {self.out}; plot {d.get('plot')}")


VERIFY_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}   # README: verify_tol defaults


# ============================================================================ helpers
def _rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _has_triton_kernels() -> bool:
    import inductor_lowerings

    return bool(inductor_lowerings.HAS_TRITON_KERNELS)


def _custom_ops(rep) -> set:
    return {n.target for g in rep.graphs for n in (g.nodes_after or []) if "bdpass" in str(n.target)
            or "bd_project" in str(n.target) or "pivot_linear" in str(n.target)}


def _report_form(rep) -> dict:
    """What the report says was applied: kinds, shared or per-head bases, and whether the
    rewritten graph calls the custom ops or plain aten ops."""
    bases = sorted({("shared" if r.details.get("shared_basis") else "per_head")
                    for r in rep.rewrites if r.kind.startswith("bd")})
    ops = sorted(_custom_ops(rep))
    return {"kinds": sorted({r.kind for r in rep.rewrites}), "bd_basis": bases,
            "lowering": ("custom ops: " + ", ".join(ops)) if ops else "aten ops",
            "column_order": sorted({r.details.get("column_order") for r in rep.rewrites
                                    if r.details.get("column_order")})}


def _cost_estimate(kind: str, M, a, b, c, dtype, device) -> Optional[dict]:
    """What bdpass.cost predicts for this entry (it is off in the measurements): speedup and
    whether it would rewrite. None if the cost model's API changed."""
    try:
        from bdpass import cost

        dev = torch.device(device)
        est = cost.pifa(M, a, b, c, dtype, dev) if kind == "pifa" else cost.bd_linear(M, a, b * c, b, c, 1, dtype, dev)
        return {"estimated_ratio": est.ratio, "would_rewrite": bool(est.pays)}
    except Exception:
        return None


def mla_block_flops(T: int, hidden: int, heads: int, latent: int, nope: int, rope: int, v: int) -> tuple[int, int]:
    """FLOP model of one causal MLA prefill of T tokens (projections and attention, causal
    half of the score and value products) and the FLOPs BD saves (QK on the nope channels,
    VO on the values of the latent's up-projection)."""
    proj = 2 * T * (hidden * heads * (nope + rope) + hidden * (latent + rope) + latent * heads * (nope + v)
                    + heads * v * hidden)
    pairs = T * (T + 1) // 2
    attn = 2 * heads * pairs * (nope + rope) + 2 * heads * pairs * v
    saved = 2 * T * heads * (nope * nope + v * v)
    return proj + attn, saved


class MLADecodeStep(nn.Module):
    """One MLA decode step without weight absorption: the query of the new token meets keys
    and values expanded from a latent cache of M tokens (spelled as transformers'
    DeepSeek-V2 does: kv_b_proj, split, keys assembled with the shared rope part)."""

    def __init__(self, hidden, heads, latent, nope, rope, v):
        super().__init__()
        self.h, self.nope, self.rope, self.v = heads, nope, rope, v
        self.q_proj = nn.Linear(hidden, heads * (nope + rope), bias=False)
        self.kv_b_proj = nn.Linear(latent, heads * (nope + v), bias=False)
        self.o_proj = nn.Linear(heads * v, hidden, bias=False)

    def forward(self, x, latent, k_pe):
        B, M = latent.shape[:2]
        q = self.q_proj(x).view(B, 1, self.h, self.nope + self.rope).transpose(1, 2)
        kv = self.kv_b_proj(latent).view(B, M, self.h, self.nope + self.v).transpose(1, 2)
        k_nope, val = torch.split(kv, [self.nope, self.v], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.h, M, self.rope)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, val)
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, self.h * self.v))


class MLABlock(nn.Module):
    """transformers' DeepseekV2Attention with its rotary embedding: a causal prefill.
    Projections drawn as N(0, 1/fan_in)."""

    def __init__(self, hidden, heads, latent, nope, rope, v, max_positions):
        super().__init__()
        import transformers
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

        cfg = transformers.AutoConfig.for_model(
            "deepseek_v2", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
            kv_lora_rank=latent, q_lora_rank=None, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
            v_head_dim=v, intermediate_size=4 * hidden, vocab_size=128, num_hidden_layers=1,
            first_k_dense_replace=1, max_position_embeddings=max_positions, use_cache=False,
            attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg._attn_implementation = "sdpa"
        self.attn = m.DeepseekV2Attention(cfg, layer_idx=0)
        self.rotary = m.DeepseekV2RotaryEmbedding(cfg)
        g = torch.Generator().manual_seed(43)
        with torch.no_grad():
            for mod in self.attn.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.weight.shape[1] ** -0.5)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return self.attn(x, attention_mask=None, position_embeddings=self.rotary(x, pos))[0]


# ============================================================================ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/gpu.json if $OUT is set, "
                                               "else benchmarks/results/gpu.json)")
    p.add_argument("--dry-run", action="store_true", help="CPU plumbing run: interpreter, tiny shapes")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="no measurement starts once it would end past this many seconds after the start")
    p.add_argument("--checks-budget-s", type=float, default=200.0,
                   help="compile checks not started this many seconds after the suite's start are skipped")
    p.add_argument("--pytest-timeout", type=float, default=240.0,
                   help="limit of the pytest -m gpu subprocess, counted from its start (it runs beside the checks)")
    p.add_argument("--skip-pytest", action="store_true")
    p.add_argument("--no-bd-linear", action="store_true",
                   help="do not also time the projection through bdpass::bd_linear (when that op exists)")
    p.add_argument("--only", default=None,
                   help="comma list of parts to run: kernels,compile,pytest,kv,kv_module,pifa,mla")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds per entry")
    p.add_argument("--warmup-ms", type=float, default=10.0, help="do_bench warm-up (ms)")
    p.add_argument("--rep-ms", type=float, default=40.0, help="do_bench measuring time per round (ms)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # before anything imports triton: the kernels then run on CPU tensors
        os.environ["TRITON_INTERPRET"] = "1"
        if "triton" in sys.modules:
            raise SystemExit("gpu_suite --dry-run: triton was imported before TRITON_INTERPRET could be set")
    suite = Suite(args)
    if suite.only is not None:
        names = {"kv": "bd_kv_projection", "kv_module": "bd_kv_module", "pifa": "pifa_layer", "mla": "mla_block"}
        keep = {names[k] for k in suite.only if k in names}
        orig_plan = suite.plan

        def plan():
            core, ext = orig_plan()
            return [c for c in core if c[0] in keep], [c for c in ext if c[0] in keep]
        suite.plan = plan
    try:
        return suite.run()
    except SystemExit:
        raise
    except BaseException as e:          # record what happened, then fail
        suite.error("suite", e)
        suite.data["status"] = "aborted"
        suite.save()
        raise


if __name__ == "__main__":
    sys.exit(main())
