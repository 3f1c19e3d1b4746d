"""The ``kernel_checks`` section: the Triton kernels and the ops against float64.

The Triton launchers with explicit block configurations, the ops
``torch.ops.bdpass.bd_project`` / ``pivot_linear`` (autotuned kernels on CUDA) and the ops
under ``torch.compile`` with dynamic token counts, each against a float64 reference with
the elementwise bounds of ``tests/test_kernels.py`` (imported, not copied).
"""
from __future__ import annotations

import math
import os
from typing import Callable


class KernelChecks:
    """Part of :class:`gpu_suite.Suite` (see the package docstring for what it uses)."""

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
