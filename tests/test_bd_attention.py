"""BD on attention head pairs: analysis, legality, rewrite, exactness."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import bdpass
from attention_models import MHA, CrossAttention, LatentAttention
from helpers import side_by_side

AOT = {"lowering": "aot_eager", "cost_model": False}
ALL = {"cost_model": False}   # exercise every legal rewrite (the cost model is tested on its own)


def kinds(report):
    return Counter(r.kind for r in report.rewrites)


def reasons(report, kind):
    return [s.reason for s in report.skipped if s.kind == kind]


def check(model, *args, options=None, dynamic=False):
    torch.manual_seed(0)
    bd_err, ind_err, bd, ind, rep = side_by_side(model, args, options={**ALL, **(options or {})}, dynamic=dynamic)
    return bd_err, ind_err, rep


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("bias", [True, False])
def test_mha_both_pairs_exact(attn, bias):
    torch.manual_seed(1)
    bd_err, ind_err, rep = check(MHA(attn=attn, bias=bias), torch.randn(2, 10, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    for r in rep.rewrites:
        assert r.details["heads"] == 4 and r.details["d_h"] == 16 and r.details["d_in"] == 64
        assert r.params_after == 4 * (64 - 16) * 16 and r.params_before == 4 * 64 * 16
        assert r.flops_saved == 2 * 4 * 16 * 16
        assert 1.0 <= r.cond == r.error_bound < 100
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


@pytest.mark.parametrize("attn,style", [("sdpa", "expand"), ("eager", "repeat_interleave"), ("sdpa_gqa", "-")])
def test_gqa(attn, style):
    torch.manual_seed(2)
    bd_err, ind_err, rep = check(MHA(gqa=2, attn=attn, gqa_style=style), torch.randn(2, 9, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    qk = [r for r in rep.rewrites if r.kind == "bd_qk"][0]
    assert qk.details["heads"] == 2        # two kv heads, each folded into two query heads
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


def test_fused_qkv():
    torch.manual_seed(3)
    bd_err, ind_err, rep = check(MHA(fused=True), torch.randn(2, 7, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    assert all(r.details["projection"] == "attn.qkv.weight" or r.details["projection"].endswith("qkv.weight")
               for r in rep.rewrites)
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


def test_full_rope_forbids_qk_only():
    torch.manual_seed(4)
    bd_err, ind_err, rep = check(MHA(rope="full"), torch.randn(2, 8, 64))
    assert kinds(rep) == {"bd_vo": 1}, str(rep)
    assert "RoPE on q/k channels" in reasons(rep, "bd_qk")
    assert bd_err <= 1.5 * ind_err


def test_partial_rope_keeps_unrotated_group():
    torch.manual_seed(5)
    bd_err, ind_err, rep = check(MHA(rope="partial"), torch.randn(2, 8, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    qk = [r for r in rep.rewrites if r.kind == "bd_qk"][0]
    assert qk.details["d_h"] == 8          # only the un-rotated half of each head
    assert bd_err <= 1.5 * ind_err


def test_qk_norm_forbids_qk():
    torch.manual_seed(6)
    _, _, rep = check(MHA(qk_norm=True), torch.randn(2, 8, 64))
    assert kinds(rep) == {"bd_vo": 1}, str(rep)
    assert any("normalization" in r for r in reasons(rep, "bd_qk")), reasons(rep, "bd_qk")


def test_returned_keys_escape():
    torch.manual_seed(7)
    model = MHA(return_k=True).eval()
    x = torch.randn(2, 8, 64)
    rep = bdpass.explain(model, x, options=AOT)
    assert kinds(rep) == {"bd_vo": 1}, str(rep)
    assert any("graph output" in r for r in reasons(rep, "bd_qk")), reasons(rep, "bd_qk")
    torch._dynamo.reset()
    with torch.no_grad():
        out, k = torch.compile(model, backend="bd", options=AOT)(x)
        ref_out, ref_k = model(x)
    torch.testing.assert_close(k, ref_k)
    torch.testing.assert_close(out, ref_out)


def test_cross_attention():
    torch.manual_seed(8)
    bd_err, ind_err, rep = check(CrossAttention(), torch.randn(2, 5, 64), torch.randn(2, 11, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    assert bd_err <= 1.5 * ind_err


def test_latent_attention_slice_assembly():
    torch.manual_seed(9)
    bd_err, ind_err, rep = check(LatentAttention(), torch.randn(2, 8, 64))
    assert kinds(rep) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    for r in rep.rewrites:
        assert r.details["projection"] == "kv_b.weight" and r.details["d_in"] == 32 and r.details["d_h"] == 16
    assert bd_err <= 1.5 * ind_err


def test_head_dim_not_below_input_width():
    torch.manual_seed(10)
    model = MHA(d=16, heads=2, head_dim=16)
    rep = bdpass.explain(model, torch.randn(2, 4, 16), options=AOT)
    assert rep.rewrites == []
    assert any("d_h=16 >= d_in=16" in r for r in reasons(rep, "bd_qk")), str(rep)


def test_options_disable_each_pair():
    torch.manual_seed(11)
    x = torch.randn(2, 6, 64)
    rep = bdpass.explain(MHA(), x, options={**AOT, "bd_qk": False})
    assert kinds(rep) == {"bd_vo": 1}
    rep = bdpass.explain(MHA(), x, options={**AOT, "bd_vo": False})
    assert kinds(rep) == {"bd_qk": 1}


def test_error_budget_skips():
    torch.manual_seed(12)
    rep = bdpass.explain(MHA(), torch.randn(2, 6, 64), options={**AOT, "error_budget": 1.0001})
    assert rep.rewrites == []
    assert any("budget" in s.reason for s in rep.skipped), str(rep)


def test_dynamic_shapes_bd():
    torch.manual_seed(13)
    model = MHA().eval()
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", dynamic=True, options=AOT)
    with torch.no_grad(), bdpass.collect_reports() as rep:
        for b, t in [(2, 3), (3, 8), (2, 17)]:
            x = torch.randn(b, t, 64)
            torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(rep.graphs) == 1 and kinds(rep) == {"bd_qk": 1, "bd_vo": 1}


def test_stale_weights_bd():
    torch.manual_seed(14)
    model = MHA().eval()
    x = torch.randn(2, 6, 64)
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", options=AOT)
    with torch.no_grad():
        f(x)
        model.k_proj.weight.copy_(torch.randn_like(model.k_proj.weight) * 0.2)
        model.o_proj.weight.mul_(0.5)
        torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)


def _timings(monkeypatch, per_form):
    """Make every measurement report these seconds (the original projection takes 1.0)."""
    from bdpass import timing

    calls = []

    def measure(device, problem, candidates):
        calls.append(problem)
        return {n: (1.0 if n == "original" else per_form.get(n, 9.0)) for n in candidates}
    monkeypatch.setattr(timing, "measure", measure)
    return calls


def test_measured_slower_is_declined(monkeypatch):
    """When every form measures slower than the dense projection, BD is skipped with the
    measured ratio as the reason, and the output is exactly plain Inductor's."""
    calls = _timings(monkeypatch, {})
    torch.manual_seed(15)
    bd_err, ind_err, _, _, rep = side_by_side(MHA(), (torch.randn(2, 8, 64),))
    assert calls and all(c["op"] == "bd_linear" and c["M"] == 16 for c in calls)
    bd = [s for s in rep.skipped if s.kind.startswith("bd")]
    assert rep.rewrites == [] and {s.kind for s in bd} == {"bd_qk", "bd_vo"}
    assert all(s.reason.startswith("cost model: measured on") and "per_head 0.11x" in s.reason
               for s in bd), str(rep)
    assert bd_err == ind_err


@pytest.mark.parametrize("fast", ["shared", "per_head", "groups"])
def test_measured_fastest_form_is_taken(monkeypatch, fast):
    _timings(monkeypatch, {fast: 0.5})
    torch.manual_seed(15)
    bd_err, ind_err, _, _, rep = side_by_side(MHA(d=64, heads=4, head_dim=8), (torch.randn(2, 8, 64),),
                                              options={"error_budget": 1e4})   # every form a candidate
    assert {r.kind for r in rep.rewrites} == {"bd_qk", "bd_vo"}, str(rep)
    assert all(r.details["form"] == fast and r.details["ms"]["original"] == 1000.0 for r in rep.rewrites)
    bound = max(r.error_bound for r in rep.rewrites)
    assert bd_err <= bound * max(ind_err, 1e-7), (bd_err, ind_err, bound)
