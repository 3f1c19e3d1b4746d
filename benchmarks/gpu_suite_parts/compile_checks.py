"""The ``compile_checks`` section: ``torch.compile`` with the ``bd`` backend on whole models.

A DeepSeek-V2-shaped MLA model (transformers, random weights) and a PIFA chain stack
(``tests/lowrank_models.SvdLinear``), dynamic with several sizes, ``reduce-overhead`` and
``max-autotune``, each against a float64 eager run and beside ``backend="inductor"``;
and ``explain``: ``bdpass.explain``'s account of both models.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional

import torch
import torch.nn as nn

from .bd_report import custom_ops

DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
VERIFY_TOL = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}   # README: verify_tol defaults


class CompileChecks:
    """Part of :class:`gpu_suite.Suite` (see the package docstring for what it uses)."""

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
                     custom_ops=sorted(custom_ops(rep)))
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
