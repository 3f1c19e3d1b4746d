"""The ``measurements`` section: bd against Inductor, entry by entry, within the budget.

The plan (core entries first, then the full grid round-robin over the sections), the
loop that runs it within ``--budget-s``, and one method per section:
``bd_kv_projection`` (:meth:`Measurements.measure_kv`), ``bd_kv_module``
(:meth:`Measurements.measure_kv_module`), ``pifa_layer`` (:meth:`Measurements.measure_pifa`)
and ``mla_block`` (:meth:`Measurements.measure_mla`). The timing itself is
:class:`timing.Timing`'s.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .bd_report import report_form
from .models import MLABlock, MLADecodeStep, mla_block_flops
from .targets import gain_fraction


def interleave(lists: list[list], weights: list[int]) -> list:
    """Round-robin over ``lists``, taking ``weights[i]`` items of list i per turn, so that
    a budget cut leaves every section with part of its grid."""
    out, pos = [], [0] * len(lists)
    while any(p < len(lst) for p, lst in zip(pos, lists)):
        for i, lst in enumerate(lists):
            out.extend(lst[pos[i]:pos[i] + weights[i]])
            pos[i] += weights[i]
    return out


class Measurements:
    """Part of :class:`gpu_suite.Suite` (see the package docstring for what it uses)."""

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
                 "report_form": report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
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
                 "report_form": report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
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
                 "report_form": report_form(rep), "fallbacks": [g.fallback for g in rep.graphs if g.fallback],
                 **errs}
        entry.update(timing)
        entry["gain_fraction"] = gain_fraction(entry["ratio_vs_inductor"], ideal)
        del model, x
        self._free()
        return entry


def _rel(out, ref) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float(torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref))


def _has_triton_kernels() -> bool:
    import inductor_lowerings

    return bool(inductor_lowerings.HAS_TRITON_KERNELS)


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
