"""The bd backend end to end on low-rank chains (PIFA)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bdpass
from bdpass import Report
from helpers import side_by_side
from lowrank_models import (AsvdLinear, Conv1DChain, Dense, LoraLinear, LowRankMLP, MatmulChain,
                            SharedIntermediate, SvdLinear)

torch.manual_seed(0)

SPELLINGS = {
    "svd_linear": lambda d_in, r, d_out: SvdLinear(d_in, r, d_out),
    "svd_linear_both_bias": lambda d_in, r, d_out: SvdLinear(d_in, r, d_out, bias_v=True),
    "svd_linear_no_bias": lambda d_in, r, d_out: SvdLinear(d_in, r, d_out, bias_u=False),
    "asvd": lambda d_in, r, d_out: AsvdLinear(d_in, r, d_out),
    "asvd_no_bias": lambda d_in, r, d_out: AsvdLinear(d_in, r, d_out, bias=False),
    "conv1d": lambda d_in, r, d_out: Conv1DChain(d_in, r, d_out),
    "matmul_views": lambda d_in, r, d_out: MatmulChain(d_in, r, d_out),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
@pytest.mark.parametrize("shape", [(48, 16, 40), (32, 1, 32), (24, 23, 40), (64, 31, 32)],
                         ids=["rect", "r1", "r_near_min", "square_ish"])
def test_spellings_exact_fp32(spelling, shape):
    d_in, r, d_out = shape
    torch.manual_seed(hash((spelling, shape)) % 1000)
    model = SPELLINGS[spelling](d_in, r, d_out)
    x = torch.randn(3, 5, d_in)
    bd_err, ind_err, _, _, report = side_by_side(model, (x,), options={"min_saving": 0.0, "cost_model": False})
    assert [rw.kind for rw in report.rewrites] == ["pifa"], str(report)
    rw = report.rewrites[0]
    assert rw.details["r"] == r and rw.details["d_in"] == d_in and rw.details["d_out"] == d_out
    assert rw.params_after < rw.params_before
    assert rw.flops_saved == 2 * r * r
    # first-order bound the report states: the rewrite grows rounding error by at most error_bound
    assert bd_err <= rw.error_bound * max(ind_err, torch.finfo(torch.float32).eps), (bd_err, ind_err, rw.error_bound)
    assert bd_err < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dtypes_error_vs_inductor(dtype):
    torch.manual_seed(1)
    model = LowRankMLP(64, 24, 128).to(dtype)
    x = torch.randn(4, 16, 64, dtype=dtype)
    bd_err, ind_err, bd, _, report = side_by_side(model, (x,), options={"cost_model": False})
    assert bd.dtype == dtype
    assert len(report.rewrites) == 2
    bound = max(r.error_bound for r in report.rewrites)
    assert bd_err <= bound * ind_err, (bd_err, ind_err, bound)
    assert bd_err < 40 * torch.finfo(dtype).eps, bd_err


@pytest.mark.xfail(strict=True, reason="PIFA's coefficient path multiplies the rounding error of the pivot "
                   "outputs by C' (about 2.5x at d=512, r=256 on random weights; README 'Numerics'): the 1.5x "
                   "target against Inductor is not met by the identity in the model's own precision")
def test_pifa_error_within_1p5x_of_inductor_at_d512():
    torch.manual_seed(14)
    model = SvdLinear(512, 256, 512)
    x = torch.randn(64, 512)
    bd_err, ind_err, _, _, _ = side_by_side(model, (x,), options={"cost_model": False})
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


def test_nothing_to_rewrite_is_exactly_inductor():
    torch.manual_seed(2)
    model = Dense(32)
    x = torch.randn(4, 32)
    _, _, bd, ind, report = side_by_side(model, (x,))
    assert report.rewrites == [] and report.skipped == []
    assert torch.equal(bd, ind)


def test_shared_intermediate_is_not_broken():
    torch.manual_seed(3)
    model = SharedIntermediate(32, 8, 32).eval()
    x = torch.randn(5, 32)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        with bdpass.collect_reports() as report:
            out = torch.compile(model, backend="bd", options={"cost_model": False})(x)
    assert report.rewrites == []
    assert any("other users" in s.reason for s in report.skipped), str(report)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)


def test_lora_adapter_is_skipped_with_reason():
    torch.manual_seed(4)
    model = LoraLinear(256, r=4)
    rep = bdpass.explain(model, torch.randn(2, 256))
    assert rep.rewrites == []
    assert len(rep.skipped) == 1 and "min_saving" in rep.skipped[0].reason
    rep = bdpass.explain(model, torch.randn(2, 256), options={"min_saving": 0.0, "cost_model": False})
    assert [r.kind for r in rep.rewrites] == ["pifa"]


def test_full_rank_pair_is_not_a_chain():
    model = torch.nn.Sequential(torch.nn.Linear(16, 20), torch.nn.Linear(20, 32))
    rep = bdpass.explain(model, torch.randn(2, 16))
    assert rep.rewrites == []
    assert any("rank r=20 >= min(d_in, d_out)=16" in s.reason for s in rep.skipped), str(rep)


def test_error_budget_refuses():
    """The budget limits the expected growth (here 1.22 against a budget of 1.1); the
    per-dtype default (100 in float32) accepts it."""
    torch.manual_seed(5)
    model = SvdLinear(32, 8, 32)
    rep = bdpass.explain(model, torch.randn(2, 32), options={"error_budget": 1.1, "cost_model": False})
    assert rep.rewrites == [] and "expected error growth" in rep.skipped[0].reason
    assert "exceeds budget 1.1" in rep.skipped[0].reason
    rep = bdpass.explain(model, torch.randn(2, 32), options={"cost_model": False})
    assert [r.kind for r in rep.rewrites] == ["pifa"] and 1.1 < rep.rewrites[0].expected_growth < 100


def test_report_api_and_json_roundtrip():
    torch.manual_seed(6)
    model = LowRankMLP(32, 8, 64)
    rep = bdpass.explain(model, torch.randn(2, 3, 32), options={"cost_model": False})
    assert len(rep.rewrites) == 2
    sites = sorted(r.site for r in rep.rewrites)
    assert sites == ["down", "up"], sites
    for r in rep.rewrites:
        assert r.cond >= 1.0 and r.error_bound >= 1.0
    text = str(rep)
    assert "pifa" in text and "down" in text and "params before" in text
    back = Report.from_json(rep.to_json())
    assert back.to_dict() == json.loads(rep.to_json())
    assert [r.site for r in back.rewrites] == [r.site for r in rep.rewrites]
    assert back.params_before == rep.params_before > rep.params_after


def test_log_summary_line(caplog):
    torch.manual_seed(7)
    model = SvdLinear(32, 8, 32).eval()
    with caplog.at_level(logging.INFO, logger="bdpass"), torch.no_grad():
        torch._dynamo.reset()
        torch.compile(model, backend="bd", options={"lowering": "aot_eager", "cost_model": False})(torch.randn(2, 32))
    lines = [r.getMessage() for r in caplog.records if r.name == "bdpass"]
    assert any("rewrites pifa x1" in l for l in lines), lines


def test_unknown_option_lists_valid_ones():
    model = SvdLinear(16, 4, 16)
    torch._dynamo.reset()
    with pytest.raises(Exception) as ei:
        torch.compile(model, backend="bd", options={"pifaa": True})(torch.randn(2, 16))
    msg = str(ei.value)
    assert "pifaa" in msg and "error_budget" in msg and "lowering" in msg


@pytest.mark.parametrize("lowering", ["eager", "aot_eager"])
def test_lowerings(lowering):
    torch.manual_seed(8)
    model = SvdLinear(32, 8, 48).eval()
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        out = torch.compile(model, backend="bd", options={"lowering": lowering, "verify": True, "cost_model": False})(x)
    torch.testing.assert_close(out, ref)


def test_gradients_fall_back_with_log(caplog):
    torch.manual_seed(9)
    model = SvdLinear(16, 4, 16)
    x = torch.randn(3, 16)
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="bdpass"), bdpass.collect_reports() as rep:
        out = torch.compile(model, backend="bd", options={"lowering": "aot_eager", "cost_model": False})(x)
        out.sum().backward()
    assert rep.rewrites == [] and "gradients required" in (rep.graphs[0].fallback or "")
    assert any("gradients required" in r.getMessage() for r in caplog.records)
    g = model.u_proj.weight.grad.clone()
    model.zero_grad()
    model(x).sum().backward()
    torch.testing.assert_close(g, model.u_proj.weight.grad)


def test_stale_weights_are_recomputed():
    torch.manual_seed(10)
    model = SvdLinear(32, 8, 32).eval()
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", options={"lowering": "aot_eager", "cost_model": False})
    with torch.no_grad():
        f(x)
        model.u_proj.weight.mul_(2.0)
        model.v_proj.weight.copy_(torch.randn_like(model.v_proj.weight))
        torch.testing.assert_close(f(x), model(x))
        model.load_state_dict({k: torch.randn_like(v) for k, v in model.state_dict().items()})
        torch.testing.assert_close(f(x), model(x))


def test_verify_catches_a_wrong_rewrite():
    """verify=True compares against the original graph: corrupt a derived tensor by hand."""
    torch.manual_seed(11)
    model = SvdLinear(32, 8, 32).eval()
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    wrappers = []
    from bdpass import backend as be

    orig = be.RewrittenGraph.__init__

    def spy(self, *a, **k):
        orig(self, *a, **k)
        wrappers.append(self)

    be.RewrittenGraph.__init__ = spy
    try:
        f = torch.compile(model, backend="bd", options={"lowering": "eager", "verify": True, "cost_model": False})
        with torch.no_grad():
            f(x)
            wrappers[0].derived[0].add_(1.0)
            with pytest.raises(bdpass.VerificationError):
                f(x)
    finally:
        be.RewrittenGraph.__init__ = orig


def test_entry_point_in_fresh_process(tmp_path):
    code = textwrap.dedent("""
        import sys, torch
        assert "bdpass" not in sys.modules
        m = torch.nn.Sequential(torch.nn.Linear(32, 8), torch.nn.Linear(8, 32)).eval()
        x = torch.randn(4, 32)
        with torch.no_grad():
            out = torch.compile(m, backend="bd", options={"lowering": "aot_eager"})(x)
            torch.testing.assert_close(out, m(x))
        import bdpass  # importing after the entry point loaded must not register twice
        assert "bd" in torch._dynamo.list_backends()
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def test_dynamic_shapes():
    torch.manual_seed(12)
    model = Conv1DChain(32, 8, 48).eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", dynamic=True, options={"lowering": "aot_eager", "cost_model": False})
    with torch.no_grad(), bdpass.collect_reports() as rep:
        for b, t in [(2, 3), (2, 7), (5, 4), (3, 9)]:
            x = torch.randn(b, t, 32)
            torch.testing.assert_close(f(x), model(x))
    assert len(rep.graphs) == 1 and len(rep.rewrites) == 1


def test_placeholder_names_are_qualified():
    torch.manual_seed(13)

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Module()])
            self.layers[0].mlp = SvdLinear(16, 4, 16)

        def forward(self, x):
            return self.layers[0].mlp(x)

    rep = bdpass.explain(Outer(), torch.randn(2, 16), options={"cost_model": False})
    r = rep.rewrites[0]
    assert r.site == "layers.0.mlp"
    assert r.details["weights"] == ["layers.0.mlp.v_proj.weight", "layers.0.mlp.u_proj.weight"]


def test_cost_model_roofline():
    """The estimate used when nothing can be timed (fake or meta tensors)."""
    from bdpass import cost
    cpu = torch.device("cpu")
    # large GEMM-bound chain: PIFA's 25% fewer FLOPs pay for the column-order pass
    assert cost.pifa(2048, 2048, 1024, 2048, torch.float32, cpu).pays
    # a handful of tokens through a tiny chain: the extra kernel dominates
    est = cost.pifa(4, 32, 8, 32, torch.float32, cpu)
    assert not est.pays and est.ratio < 1


@pytest.mark.parametrize("pifa_seconds", [0.5, 2.0])
def test_cost_model_decides_by_measuring(monkeypatch, pifa_seconds):
    """The chain is timed against the original pair at the graph's token count; the
    measurement, not a constant, decides."""
    from bdpass import timing

    problems = []

    def measure(device, problem, candidates):
        problems.append(problem)
        assert set(candidates) == {"original", "pifa"}
        return {"original": 1.0, "pifa": pifa_seconds}
    monkeypatch.setattr(timing, "measure", measure)
    torch.manual_seed(15)
    rep = bdpass.explain(SvdLinear(32, 8, 32), torch.randn(4, 32))
    assert problems == [{"op": "pifa", "M": 4, "d_in": 32, "r": 8, "d_out": 32, "dtype": "torch.float32",
                         "bias": True, "restore_order": True}]
    if pifa_seconds < 1:
        assert [r.kind for r in rep.rewrites] == ["pifa"], str(rep)
    else:
        assert rep.rewrites == [] and rep.skipped[0].reason.startswith(
            "cost model: the PIFA pair measured at 0.50x of the original"), str(rep)


def _low_rank_llama():
    import zoo

    model, args, kwargs = zoo.build("llama")
    torch.manual_seed(16)
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and "layers" in name:
                r = min(child.in_features, child.out_features) // 2
                pair = torch.nn.Sequential(torch.nn.Linear(child.in_features, r, bias=False),
                                           torch.nn.Linear(r, child.out_features, bias=child.bias is not None))
                setattr(mod, child_name, pair)
    return model.eval(), args, kwargs


def test_hf_llama_with_low_rank_linears():
    model, args, kwargs = _low_rank_llama()
    bd_err, ind_err, bd, _, rep = side_by_side(model, args, kwargs, options={"cost_model": False})
    n_pairs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Sequential))
    assert sum(r.kind == "pifa" for r in rep.rewrites) == n_pairs == 14, str(rep)
    assert rep.params_after < rep.params_before
    bound = max(r.error_bound for r in rep.rewrites)
    assert bd_err <= bound * ind_err, (bd_err, ind_err, bound)
    with torch.no_grad():
        ref = model(*args, **kwargs).logits
    assert (bd.argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_resident_weight_bytes_are_reported():
    """Under torch.compile the module keeps its own weights and the graph holds the factors:
    the report's derived_bytes is what bd adds on top of plain Inductor's resident weights
    (``bdpass.prepare`` is the way to hold the factorized weights only)."""
    torch.manual_seed(17)
    model = SvdLinear(64, 16, 64).eval()
    rep = bdpass.explain(model, torch.randn(2, 64), options={"cost_model": False})
    f = [r for r in rep.rewrites][0]
    elt = 4
    assert rep.derived_bytes == (f.params_after * elt) + 64 * 8    # factors + int64 column order
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert rep.params_before * elt == model_bytes


def test_column_order_absorbed_by_next_chain():
    """up -> gelu -> down: the second chain's first weight takes the first chain's column
    order, so only the last chain restores the original order."""
    torch.manual_seed(18)
    model = LowRankMLP(32, 8, 64).eval()
    x = torch.randn(2, 5, 32)
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", options={"lowering": "aot_eager", "cost_model": False})
    with torch.no_grad(), bdpass.collect_reports(keep_graphs=True) as rep:
        out = f(x)
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
        orders = {r.site: r.details["column_order"] for r in rep.rewrites}
        assert orders == {"up": "absorbed by the next chain", "down": "restored"}, orders
        new_gm = rep.graphs[0].graphs_kept[1]
        # the last chain writes its columns in place (pivot_linear); the first stays in
        # [pivots, rest] order (two linears and a concatenation the gelu reads)
        ops = [n.target for n in new_gm.graph.nodes if n.op == "call_function"]
        assert ops.count(torch.ops.bdpass.pivot_linear.default) == 1 and torch.index_select not in ops
        assert ops.count(torch.cat) == 1
        # stale weights of the producer must reach the consumer's factors too
        model.up.u_proj.weight.copy_(torch.randn_like(model.up.u_proj.weight))
        torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)


def test_error_budget_defaults_per_dtype(monkeypatch):
    """The default budget is 100 for float32/float64 and 8 for bfloat16/float16 (measured
    on a trained model: benchmarks/bd_accuracy.py); a number given applies to every dtype."""
    from bdpass import BDOptions
    from bdpass.rewrites import pifa as pifa_rw

    o = BDOptions()
    assert o.error_budget is None
    assert [o.budget_for(d) for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)] == \
        [100.0, 100.0, 8.0, 8.0]
    assert BDOptions.parse({"error_budget": 30}).budget_for(torch.bfloat16) == 30.0
    seen = []
    real = pifa_rw.pifa_factors

    def spy(*a, **k):
        seen.append(k["error_budget"])
        return real(*a, **k)
    monkeypatch.setattr(pifa_rw, "pifa_factors", spy)
    for dtype, want in ((torch.float32, 100.0), (torch.bfloat16, 8.0)):
        seen.clear()
        bdpass.explain(SvdLinear(32, 8, 32).to(dtype), torch.randn(2, 32, dtype=dtype),
                       options={"cost_model": False, "lowering": "aot_eager"})
        assert seen and set(seen) == {want}, (dtype, seen)


def test_pair_that_would_grow_the_weights_is_skipped():
    """Rank 1 with a bias on the first linear only: the rewritten pair needs a bias over all
    outputs, so it would hold more weights than the original (refused, with the counts)."""
    model = SvdLinear(16, 1, 16, bias_v=True, bias_u=False)
    rep = bdpass.explain(model, torch.randn(2, 16), options={"cost_model": False, "min_saving": 0.0})
    # 16*1 + 1*16 + 1 = 33 weights before; 16*1 + 1*15 + 16 = 47 after
    assert rep.rewrites == [] and rep.skipped[0].reason.startswith("would not shrink the weights (33 -> 47")
