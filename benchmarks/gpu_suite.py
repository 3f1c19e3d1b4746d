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
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
# The repository root (bdpass, inductor_lowerings: nothing needs installing) and tests/ (its
# model builders and kernel references) go first: benchmarks/ has a zoo.py of its own.
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p in sys.path:
        sys.path.remove(_p)
    sys.path.insert(0, _p)
# benchmarks/ itself, last, for the suite's parts (already first when run as a script).
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.append(_HERE)

# This file is the driver: the command line, the order of the sections and the plumbing they
# share (the record, logging, the compilers). The sections and the rest are in
# benchmarks/gpu_suite_parts/ (its __init__ lists them).
from gpu_suite_parts.budget import Budget, CostModel  # noqa: E402
from gpu_suite_parts.compile_checks import CompileChecks  # noqa: E402
from gpu_suite_parts.gpu_pytest import finish_gpu_pytest, start_gpu_pytest  # noqa: E402
from gpu_suite_parts.kernel_checks import KernelChecks  # noqa: E402
from gpu_suite_parts.measurements import Measurements  # noqa: E402
from gpu_suite_parts.plot import write_plot  # noqa: E402
from gpu_suite_parts.record import SCHEMA_VERSION, default_out_path, write_json  # noqa: E402
from gpu_suite_parts.targets import MEASUREMENT_SECTIONS, all_targets_met, evaluate_targets  # noqa: E402
from gpu_suite_parts.timing import Timing  # noqa: E402
# Names of the parts that tests/test_gpu_suite.py reaches through this module.
from gpu_suite_parts.gpu_pytest import parse_pytest_summary  # noqa: E402,F401
from gpu_suite_parts.models import mla_block_flops  # noqa: E402,F401
from gpu_suite_parts.targets import gain_fraction  # noqa: E402,F401


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


# ============================================================================ suite
class Suite(KernelChecks, CompileChecks, Measurements, Timing):
    """One run of the suite: the record (``data``), the plumbing the sections share, and
    :meth:`run`, which runs the sections in order. The sections' methods are the mixins'
    (benchmarks/gpu_suite_parts/)."""

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
