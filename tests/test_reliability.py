"""Promises users rely on without reading the code: each test could catch its breach."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

import bdpass
import zoo
from attention_models import MHA
from helpers import rel_l2
from lowrank_models import SvdLinear

ALL = {"cost_model": False}
AOT = {"lowering": "aot_eager", "cost_model": False}
HERE = os.path.dirname(__file__)


def compiled(model, **opts):
    torch._dynamo.reset()
    return torch.compile(model, backend="bd", options={**AOT, **opts})


# ------------------------------------------------------------------ 1. weights changed
def _models():
    torch.manual_seed(0)
    return [SvdLinear(32, 8, 48).eval(), MHA().eval()]


def _x(model):
    return torch.randn(2, 6, 32 if isinstance(model, SvdLinear) else 64)


def _first_weight(model):
    return model.u_proj.weight if isinstance(model, SvdLinear) else model.k_proj.weight


@pytest.mark.parametrize("which", [0, 1], ids=["pifa", "bd"])
@pytest.mark.parametrize("change", ["copy_", "load_state_dict", "optimizer", "new_parameter", "data"])
def test_weights_changed_after_compiling(which, change):
    model = _models()[which]
    x = _x(model)
    f = compiled(model)
    with bdpass.collect_reports() as rep, torch.no_grad():
        f(x)
    assert rep.rewrites, str(rep)
    w = _first_weight(model)
    if change == "copy_":
        with torch.no_grad():
            w.copy_(torch.randn_like(w))
    elif change == "load_state_dict":
        model.load_state_dict({k: torch.randn_like(v) * 0.3 for k, v in model.state_dict().items()})
    elif change == "optimizer":
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x).square().sum().backward()
        opt.step()
        opt.zero_grad()
    elif change == "new_parameter":
        owner = model.u_proj if isinstance(model, SvdLinear) else model.k_proj
        owner.weight = torch.nn.Parameter(torch.randn_like(w))
    elif change == "data":
        w.data = torch.randn_like(w)
    with torch.no_grad():
        torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)


def test_unfactorizable_new_weights_run_the_original(caplog):
    torch.manual_seed(1)
    model = SvdLinear(32, 8, 32).eval()
    x = torch.randn(3, 32)
    f = compiled(model)
    with torch.no_grad():
        f(x)
        model.u_proj.weight.zero_()       # B becomes singular: no pivot block exists
        with caplog.at_level(logging.WARNING, logger="bdpass"):
            out = f(x)
    torch.testing.assert_close(out, model(x))
    assert any("original computation" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ 2. gradients
@pytest.mark.parametrize("ctx", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(ctx):
    torch.manual_seed(2)
    model = MHA().eval()
    x = torch.randn(2, 5, 64)
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", options=ALL)
    with (torch.no_grad() if ctx == "no_grad" else torch.inference_mode()), bdpass.collect_reports() as rep:
        out = f(x)
        ref = model(x)
    assert rep.rewrites
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gradients_are_never_wrong():
    torch.manual_seed(3)
    model = MHA().double()
    x = torch.randn(2, 4, 64, dtype=torch.double, requires_grad=True)
    torch._dynamo.reset()
    with bdpass.collect_reports() as rep:
        out = torch.compile(model, backend="bd", options=AOT)(x)
    out.square().sum().backward()
    g_x, g_w = x.grad.clone(), model.k_proj.weight.grad.clone()
    x.grad = None
    model.zero_grad()
    model(x).square().sum().backward()
    assert rep.rewrites == [] and "gradients required" in rep.graphs[0].fallback
    torch.testing.assert_close(g_x, x.grad)
    torch.testing.assert_close(g_w, model.k_proj.weight.grad)


# ------------------------------------------------------------------ 3. dynamic shapes
def _count_compiles(model, calls, backend, options=None):
    torch._dynamo.reset()
    n = {"graphs": 0}

    if backend == "bd":
        def be(gm, ex):
            n["graphs"] += 1
            return bdpass.bd_backend(gm, ex, options=options)
    else:
        def be(gm, ex):
            n["graphs"] += 1
            return gm.forward
    f = torch.compile(model, backend=be)
    outs = []
    with torch.no_grad():
        for ids in calls:
            outs.append(f(ids).logits)
    torch._dynamo.reset()
    return n["graphs"], outs


@pytest.mark.parametrize("family", ["gpt2", "deepseek_v2"])
def test_dynamic_shapes_random_pairs(family):
    kw = {"experts_implementation": "batched_mm"} if family.startswith("deepseek") else {}
    model, _, _ = zoo.build(family, **kw)
    rng = random.Random(0)
    n_calls = 200
    calls = [torch.randint(3, 128, (rng.randint(1, 4), rng.randint(2, 24))) for _ in range(n_calls)]
    n_bd, outs = _count_compiles(model, calls, "bd", AOT)
    n_ref, _ = _count_compiles(model, calls, "plain")
    assert n_bd <= n_ref, (n_bd, n_ref)
    ref64 = __import__("copy").deepcopy(model).double()
    with torch.no_grad():
        for ids, out in zip(calls[::5], outs[::5]):
            ref = ref64(ids).logits
            eager = model(ids).logits
            assert rel_l2(out, ref) <= 100 * max(rel_l2(eager, ref), 1e-7)


def test_dynamic_true_keeps_rewrites_under_inductor():
    """dynamic=True makes Dynamo restart its analysis from inside the backend
    (TensorifyScalarRestartAnalysis): that signal must propagate, not become a fallback."""
    model, args, kwargs = zoo.build("gpt2")
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", dynamic=True, options={"cost_model": False})
    with torch.no_grad(), bdpass.collect_reports() as rep:
        outs = [(f(args[0][:, :n]).logits, model(args[0][:, :n]).logits) for n in (12, 7, 10)]
    torch._dynamo.reset()
    assert rep.rewrites and all(g.fallback is None for g in rep.graphs), str(rep)
    assert {r.kind for r in rep.rewrites} == {"bd_qk", "bd_vo"}, str(rep)
    for got, want in outs:
        assert rel_l2(got, want) < 1e-4


# ------------------------------------------------------------------ 4. caches
def test_same_structure_different_weights_one_process():
    torch.manual_seed(4)
    a, b = SvdLinear(64, 16, 64).eval(), SvdLinear(64, 16, 64).eval()
    x = torch.randn(4, 64)
    torch._dynamo.reset()
    with torch.no_grad():
        fa = torch.compile(a, backend="bd", options=ALL)
        fb = torch.compile(b, backend="bd", options=ALL)
        ya, yb = fa(x), fb(x)
    torch.testing.assert_close(ya, a(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yb, b(x), rtol=1e-4, atol=1e-5)


def test_same_structure_different_weights_two_processes(tmp_path):
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        from lowrank_models import SvdLinear
        from attention_models import MHA
        seed = int(sys.argv[1])
        torch.manual_seed(seed)
        models = [SvdLinear(64, 16, 64).eval(), MHA().eval()]
        xs = [torch.randn(4, 64), torch.randn(2, 5, 64)]
        with torch.no_grad():
            for m, x in zip(models, xs):
                torch._dynamo.reset()
                y = torch.compile(m, backend="bd", options={{"cost_model": False}})(x)
                torch.testing.assert_close(y, m(x), rtol=1e-4, atol=1e-5)
        print("ok", seed)
    """)
    path = tmp_path / "run.py"
    path.write_text(script)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}
    for seed in (1, 2, 3):
        res = subprocess.run([sys.executable, str(path), str(seed)], capture_output=True, text=True,
                             timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"ok {seed}" in res.stdout
    assert any((tmp_path / "cache").rglob("*")), "the shared cache directory was not used"


# ------------------------------------------------------------------ 5. bad input
def _explain(model, x, **opts):
    return bdpass.explain(model, x, options={**AOT, **opts})


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_weights(bad):
    torch.manual_seed(5)
    for model, x in [(SvdLinear(32, 8, 32), torch.randn(2, 32)), (MHA(), torch.randn(2, 4, 64))]:
        w = _first_weight(model)
        with torch.no_grad():
            w[0, 0] = float(bad)
        rep = _explain(model, x)
        assert rep.rewrites == [] or all(r.kind == "bd_vo" for r in rep.rewrites), str(rep)
        assert any("non-finite" in s.reason for s in rep.skipped), str(rep)


@pytest.mark.parametrize("partner", ["q_proj", "o_proj"])
def test_non_finite_partner_weight_refuses_its_pair(partner):
    """B folds into a partner's columns (q) or rows (o): a NaN there would spread over the
    head, so the pair that folds into it is refused, at compile time and after a change."""
    torch.manual_seed(5)
    model = MHA()
    x = torch.randn(2, 4, 64)
    kind = "bd_qk" if partner == "q_proj" else "bd_vo"
    with torch.no_grad():
        getattr(model, partner).weight[3, 5] = float("nan")
    rep = _explain(model, x)
    assert kind not in {r.kind for r in rep.rewrites}, str(rep)
    assert any(s.kind == kind and "non-finite weights in " + partner in s.reason for s in rep.skipped), str(rep)

    model = MHA().eval()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="bd", options=AOT)
    with torch.no_grad():
        compiled(x)
        getattr(model, partner).weight[3, 5] = float("nan")
        got, ref = compiled(x), model(x)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    torch._dynamo.reset()


def test_rank_deficient_blocks():
    torch.manual_seed(6)
    model = SvdLinear(32, 8, 32)
    with torch.no_grad():
        model.u_proj.weight[:, 4:] = 0.0     # B has rank 4 < r
    rep = _explain(model, torch.randn(2, 32))
    assert rep.rewrites == [] and "singular" in rep.skipped[0].reason, str(rep)
    mha = MHA()
    with torch.no_grad():
        mha.k_proj.weight[:16] = 0.0         # one head's K projection is zero
    rep = _explain(mha, torch.randn(2, 4, 64))
    assert "bd_qk" not in {r.kind for r in rep.rewrites}
    assert any("singular" in s.reason for s in rep.skipped), str(rep)


def test_weight_problems_are_reasons():
    from bdpass.graph.params import ParamInfo, weight_problem

    def p(t, name="w"):
        return ParamInfo(0, None, name, t)

    assert "meta" in weight_problem([p(torch.empty(4, 4, device="meta"))])
    assert "int8" in weight_problem([p(torch.zeros(4, 4, dtype=torch.int8))])
    if hasattr(torch, "float8_e4m3fn"):
        assert "float8" in weight_problem([p(torch.zeros(4, 4).to(torch.float8_e4m3fn))])
    assert "zero-size" in weight_problem([p(torch.zeros(0, 4))])
    assert weight_problem([p(torch.zeros(4, 4).t())]) is None      # non-contiguous is fine

    class Sub(torch.Tensor):
        pass

    assert "subclass" in weight_problem([p(torch.zeros(4, 4).as_subclass(Sub))])


def test_meta_device_model_is_skipped_not_crashed():
    model = SvdLinear(32, 8, 32).to("meta")
    rep = _explain(model, torch.empty(2, 32, device="meta"))
    assert rep.rewrites == [] and any("meta" in s.reason for s in rep.skipped), str(rep)


def test_non_contiguous_weights():
    torch.manual_seed(7)
    model = SvdLinear(32, 8, 48).eval()
    with torch.no_grad():
        model.u_proj.weight = torch.nn.Parameter(torch.randn(8, 48).t())   # (48, 8) non-contiguous
    x = torch.randn(3, 32)
    f = compiled(model)
    with torch.no_grad(), bdpass.collect_reports() as rep:
        out = f(x)
    assert rep.rewrites
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)


def test_zero_size_tokens():
    torch.manual_seed(8)
    model = SvdLinear(32, 8, 32).eval()
    f = compiled(model)
    with torch.no_grad():
        out = f(torch.randn(0, 32))
    assert out.shape == (0, 32)


def test_internal_error_falls_back_unless_strict(monkeypatch, caplog):
    from bdpass.rewrites import pifa as pifa_rw

    def boom(*a, **k):
        raise RuntimeError("synthetic failure")

    monkeypatch.setattr(pifa_rw, "find_chains", boom)
    torch.manual_seed(9)
    model = SvdLinear(32, 8, 32).eval()
    x = torch.randn(2, 32)
    with caplog.at_level(logging.WARNING, logger="bdpass"), torch.no_grad():
        torch._dynamo.reset()
        with bdpass.collect_reports() as rep:
            out = torch.compile(model, backend="bd", options=AOT)(x)
    torch.testing.assert_close(out, model(x))
    assert "synthetic failure" in rep.graphs[0].fallback
    assert any("synthetic failure" in r.getMessage() for r in caplog.records)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="synthetic failure"), torch.no_grad():
        torch.compile(model, backend="bd", options={**AOT, "strict": True})(x)
    torch._dynamo.reset()


# ------------------------------------------------------------------ 6. fuzzing
@pytest.mark.parametrize("seed", range(50))
def test_fuzz(seed):
    from fuzz import run_case

    failure = run_case(1000 + seed)
    assert failure is None, failure


# ------------------------------------------------------------------ 7. GPU modes
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_gpu_modes(mode):
    torch.manual_seed(10)
    model = MHA().cuda().eval()
    x = torch.randn(2, 64, 64, device="cuda")
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", mode=mode, options=ALL)
    with torch.no_grad():
        for _ in range(3):
            out = f(x)
        torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-4)
        with torch.no_grad():
            model.k_proj.weight.mul_(0.5)
        torch.testing.assert_close(f(x), model(x), rtol=1e-3, atol=1e-4)


def test_release_weights_frees_replaced_storage():
    from lowrank_models import LowRankMLP

    torch.manual_seed(11)
    model = LowRankMLP(64, 16, 128).eval()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = model(x)
    before = sum(p.untyped_storage().nbytes() for p in model.parameters())
    torch._dynamo.reset()
    f = torch.compile(model, backend="bd", options={**AOT, "release_weights": True})
    with torch.no_grad(), bdpass.collect_reports() as rep:
        out = f(x)
        again = f(x)
        other = torch.randn(2, 5, 64)
        f(other)
    after = sum(p.untyped_storage().nbytes() for p in model.parameters())
    replaced = sum(r.params_before for r in rep.rewrites) * 4
    assert rep.graphs[0].released_bytes == before - after == replaced
    assert after + rep.derived_bytes < before       # resident weights dropped by the savings
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, out)
    with pytest.raises(RuntimeError):               # the released weights hold no data
        with torch.no_grad():
            model(x)
    with pytest.raises(Exception, match="release_weights"), torch.no_grad():
        f(torch.randn(3, 7, 64))                    # a recompile cannot factorize released weights
    torch._dynamo.reset()
