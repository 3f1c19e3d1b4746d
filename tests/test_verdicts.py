"""No silent misses: every attention contraction and every linear-of-linear of a graph gets a
verdict in the report (rewritten, or skipped with a reason), counted against
:mod:`bdpass.graph.contractions`, which finds them without the layout analysis."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn

import bdpass
import zoo
import verdict_yardstick
from attention_models import MHA
from bdpass.graph import contractions
from bdpass.graph.layout import analyze
from bdpass.graph.linears import find_linears
from bdpass.graph.params import find_params
from bdpass.report import KV_CACHE, GraphReport
from bdpass.rewrites import bd_plan, pifa as pifa_rw
from fuzz import make_case
from lowrank_models import AsvdLinear, Conv1DChain, Dense, LoraLinear, LowRankMLP, MatmulChain, SharedIntermediate, SvdLinear

RUN = {"lowering": "eager", "cost_model": False}


def _zoo(family, **kw):
    if family.startswith("deepseek"):
        kw.setdefault("experts_implementation", "batched_mm")
    return zoo.build(family, **kw)


# ---------------------------------------------------------------------------- helpers
def compile_and_plan(model, args, kwargs=None, options=None, monkeypatch=None):
    """Run ``model`` under the bd backend; returns (report, {graph: planned}) where planned
    maps (kind, site) to the node names of what the planners handed to the rewrites."""
    calls = []
    plan, find = bd_plan.plan, pifa_rw.find_chains

    def plan_spy(res, sites, *a, **k):
        comps, skips = plan(res, sites, *a, **k)
        calls.append((res, sites, comps, []))
        return comps, skips

    def find_spy(linears):
        chains, skips = find(linears)
        calls.append((None, linears, [], chains))
        return chains, skips

    monkeypatch.setattr(bd_plan, "plan", plan_spy)
    monkeypatch.setattr(pifa_rw, "find_chains", find_spy)
    torch._dynamo.reset()
    try:
        with torch.no_grad(), bdpass.collect_reports(keep_graphs=True) as rep:
            torch.compile(model, backend="bd", options={**RUN, **(options or {})})(*args, **(kwargs or {}))
    finally:
        torch._dynamo.reset()
    return rep, planned_sites((sites, comps, chains) for _, sites, comps, chains in calls)


def planned_sites(calls) -> dict:
    """graph -> (kind, site) -> the nodes of each planned BD group and PIFA chain, from the
    ``(sites, components, chains)`` the planners saw for each graph."""
    planned: dict = {}
    for sites, comps, chains in calls:
        graph = sites[0].core.graph if sites else None
        out = planned.setdefault(graph, {})
        for c in comps:
            for g in c.groups:
                out.setdefault((g.kind, g.site), set()).update(g.nodes)
        for ch in chains:
            out.setdefault(("pifa", ch.site), set()).update({ch.first.core.name, ch.second.core.name})
    return planned


def check_report(rep, planned, kinds=("bd_qk", "bd_vo", "pifa")) -> dict:
    """Assert, per graph and kind, that the nodes with a verdict are exactly the nodes that
    need one; returns the total counts found."""
    total: Counter = Counter()
    for g in rep.graphs:
        gm, _, ex, _ = g.graphs_kept
        expected = verdict_yardstick.expected_verdicts(gm, ex)
        got = verdict_yardstick.verdict_nodes(g, planned.get(gm.graph, {}))
        for k in kinds:
            assert got.get(k, set()) == expected[k], (k, sorted(expected[k]), sorted(got.get(k, set())), str(rep))
            total[k] += len(expected[k])
    return total


def planner_verdicts(model, args, kwargs=None):
    """Planner-level check without rewriting: trace, then the analysis and both planners."""
    graphs = []

    def backend(gm, ex):
        graphs.append((gm, list(ex)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **(kwargs or {}))
    torch._dynamo.reset()
    total: Counter = Counter()
    for gm, ex in graphs:
        sites = find_linears(gm, find_params(gm, ex))
        chains, pskips = pifa_rw.find_chains(sites)
        comps, bskips = bd_plan.plan(analyze(gm, sites, ex), sites, True, True)
        report = GraphReport(index=0, skipped=pskips + bskips)
        planned: dict = {}
        for c in comps:
            for g in c.groups:
                planned.setdefault((g.kind, g.site), set()).update(g.nodes)
        for ch in chains:
            planned.setdefault(("pifa", ch.site), set()).update({ch.first.core.name, ch.second.core.name})
        expected = verdict_yardstick.expected_verdicts(gm, ex)
        got = verdict_yardstick.verdict_nodes(report)
        for (kind, _), nodes in planned.items():     # handed on to the rewrites: their verdicts
            got.setdefault(kind, set()).update(nodes)
        for k, v in expected.items():
            assert got.get(k, set()) == v, (k, sorted(v), sorted(got.get(k, set())))
            total[k] += len(v)
    return total


# ---------------------------------------------------------------------------- the counter itself
def test_counter_finds_every_spelling_of_attention():
    from attention_models import Spelled

    for kw, n in [({}, 1), ({"score": "einsum"}, 1), ({"score": "sdpa"}, 1), ({"score": "baddbmm"}, 1),
                  ({"score": "sinks"}, 1), ({"score": "sinks_first"}, 1)]:
        graphs = []
        torch._dynamo.reset()
        torch.compile(Spelled(**kw), backend=lambda gm, ex: graphs.append(gm) or gm.forward)(torch.randn(1, 3, 64))
        torch._dynamo.reset()
        att = contractions.find_attention(graphs[0])
        assert len(att) == n, kw
        assert (att[0].score is att[0].value) == (kw.get("score") == "sdpa")


# ---------------------------------------------------------------------------- zoo
@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_zoo_every_attention_has_verdicts_planned(family):
    model, args, kwargs = _zoo(family, layers=1)
    total = planner_verdicts(model, args, kwargs)
    assert total["bd_qk"] == total["bd_vo"] == {"whisper": 3, "t5": 3}.get(family, 1)


@pytest.mark.parametrize("family", ["gpt2", "llama", "deepseek_v2"])
def test_zoo_with_kv_cache_every_value_head_has_a_verdict(family, monkeypatch):
    """K/V returned in a cache: one bd_qk *and* one bd_vo verdict per layer, in the report."""
    model, args, kwargs = _zoo(family, use_cache=True)
    rep, planned = compile_and_plan(model, args, kwargs, monkeypatch=monkeypatch)
    assert check_report(rep, planned) == {"bd_qk": 2, "bd_vo": 2, "pifa": 0}
    vo = [r for r in rep.rewrites + rep.skipped if r.kind == "bd_vo"]
    qk = [r for r in rep.rewrites + rep.skipped if r.kind == "bd_qk"]
    assert len({r.site for r in vo}) == len({r.site for r in qk}) == 2, str(rep)
    hint = "prepared on a cache-free run"
    if family != "deepseek_v2":     # DeepSeek caches the latent: K/V never leave the graph
        assert all("cache" in s.reason for s in rep.skipped if s.kind == "bd_vo"), str(rep)
        # what to do about it: said once per graph, on its summary line, with the count
        cached = [s for s in rep.skipped if KV_CACHE in s.reason]
        assert str(rep).count(hint) == len(rep.graphs) == 1, str(rep)
        assert f"{len(cached)} site(s) skipped where K/V" in rep.graphs[0].summary(), str(rep)
    else:
        assert hint not in str(rep), str(rep)
    modules = dict(model.named_modules())
    assert all(r.site in modules for r in vo + qk), str(rep)


@pytest.mark.slow
@pytest.mark.parametrize("family", zoo.FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_zoo_every_attention_has_verdicts_in_report(family, attn, monkeypatch):
    model, args, kwargs = _zoo(family, attn_implementation=attn)
    rep, planned = compile_and_plan(model, args, kwargs, monkeypatch=monkeypatch)
    total = check_report(rep, planned)
    assert total["bd_qk"] == total["bd_vo"] == {"whisper": 6, "t5": 6}.get(family, 2)
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    for r in rep.rewrites + rep.skipped:
        assert r.site in modules, r.site
    for r in rep.rewrites:
        assert r.details["projection"] in params, r.details


# ---------------------------------------------------------------------------- fuzz cases
FUZZ_SEEDS = list(range(14))


@pytest.mark.parametrize("seed", FUZZ_SEEDS)
def test_fuzz_case_every_contraction_has_a_verdict(seed, monkeypatch):
    model, args, _, desc = make_case(seed)
    rep, planned = compile_and_plan(model.eval(), args, options={"min_saving": 0.0}, monkeypatch=monkeypatch)
    total = check_report(rep, planned)
    if "chain" in desc:
        assert total["pifa"] == 2 and total["bd_qk"] == 0, desc
    else:
        assert total["bd_qk"] == total["bd_vo"] == 1 and total["pifa"] == 0, desc


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(14, 120))
def test_fuzz_case_every_contraction_has_a_verdict_long(seed, monkeypatch):
    test_fuzz_case_every_contraction_has_a_verdict(seed, monkeypatch)


# ---------------------------------------------------------------------------- linear-of-linear
class Between(nn.Module):
    """A rank-8 chain with a data-movement op between its linears."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a = nn.Linear(32, 8)
        self.b = nn.Linear(6 if how == "slice" else 8, 24)

    def forward(self, x):
        h = self.a(x)
        if self.how == "detach":
            h = h.detach()
        elif self.how == "transpose":
            h = h.transpose(0, 1).contiguous().transpose(0, 1)
        elif self.how == "slice":
            h = h[:, :6]
        elif self.how == "narrow":
            h = h.narrow(0, 1, 3)
        elif self.how == "unflatten":
            h = h.unflatten(0, (2, -1)).flatten(0, 1)
        return self.b(h)


class FullRank(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 16)

    def forward(self, x):
        return self.b(self.a(x))


@pytest.mark.parametrize("make", [
    lambda: SvdLinear(32, 8, 24), lambda: AsvdLinear(32, 8, 24), lambda: Conv1DChain(32, 8, 24),
    lambda: MatmulChain(32, 8, 24), lambda: LowRankMLP(32, 8, 48), lambda: SharedIntermediate(32, 8, 24),
    lambda: LoraLinear(32), lambda: Dense(16), lambda: FullRank(), lambda: Between("detach"),
    lambda: Between("transpose"), lambda: Between("slice"), lambda: Between("unflatten"),
    lambda: Between("narrow")],
    ids=["svd", "asvd", "conv1d", "matmul", "mlp", "shared", "lora", "dense", "full_rank", "detach",
         "transpose", "slice", "unflatten", "narrow"])
def test_every_linear_of_linear_has_a_verdict(make, monkeypatch):
    torch.manual_seed(0)
    model = make().eval()
    rep, planned = compile_and_plan(model, (torch.randn(4, 32 if not isinstance(model, (Dense, FullRank)) else 16),),
                                    options={"min_saving": 0.0}, monkeypatch=monkeypatch)
    total = check_report(rep, planned, kinds=("pifa",))
    # linears in linear-of-linear pairs: none in Dense (relu between), two chains in the MLP
    assert total["pifa"] == (0 if isinstance(model, Dense) else 4 if isinstance(model, LowRankMLP) else 2), str(rep)
    if isinstance(model, FullRank):
        assert any("not a low-rank chain" in s.reason for s in rep.skipped), str(rep)
    if isinstance(model, Between):
        applied = [r for r in rep.rewrites if r.kind == "pifa"]
        assert bool(applied) == (model.how in ("detach", "unflatten")), str(rep)


class PerHeadAfterLinear(nn.Module):
    """A linear, then per-head weights (einsum sharing the head dim, and bmm with a 3-D
    weight): batched products, not linear layers, so not linear-of-linear pairs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 16)
        self.w = nn.Parameter(torch.randn(4, 4, 3))
        self.v = nn.Parameter(torch.randn(4, 4, 3))

    def forward(self, x):
        h = self.a(x).view(x.shape[0], 4, 4).transpose(0, 1)            # (4 heads, N, 4)
        return torch.einsum("hnd,hde->hne", h, self.w) + torch.bmm(h, self.v)


def test_per_head_weights_are_not_linear_chains(monkeypatch):
    rep, planned = compile_and_plan(PerHeadAfterLinear().eval(), (torch.randn(5, 32),), monkeypatch=monkeypatch)
    assert check_report(rep, planned, kinds=("pifa",)) == {"pifa": 0}
    assert rep.skipped == [] and rep.rewrites == [], str(rep)


# ---------------------------------------------------------------------------- value verdicts
class TouchedValues(nn.Module):
    """Values through a nonlinearity before the contraction: no BD-VO, with the reason."""

    def __init__(self, how="tanh"):
        super().__init__()
        self.how = how
        self.attn = MHA(attn="eager")

    def forward(self, x):
        a = self.attn
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, 4, 16).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        v = torch.tanh(v) if self.how == "tanh" else torch.cat([torch.zeros_like(v[:, :, :1]), v], dim=2)[:, :, 1:]
        o = torch.softmax(q @ k.transpose(-1, -2) / 4, dim=-1) @ v
        return a.o_proj(o.transpose(1, 2).reshape(B, T, 64))


@pytest.mark.parametrize("how", ["tanh", "cat"])
def test_touched_values_get_a_verdict(how, monkeypatch):
    torch.manual_seed(0)
    rep, planned = compile_and_plan(TouchedValues(how).eval(), (torch.randn(2, 5, 64),), monkeypatch=monkeypatch)
    assert check_report(rep, planned) == {"bd_qk": 1, "bd_vo": 1, "pifa": 0}
    vo = [s for s in rep.skipped if s.kind == "bd_vo"]
    assert len(vo) == 1 and vo[0].site == "attn.v_proj" and vo[0].nodes, str(rep)
    assert ("tanh" in vo[0].reason) if how == "tanh" else ("concatenated" in vo[0].reason), vo[0].reason
    assert [r.kind for r in rep.rewrites] == ["bd_qk"], str(rep)


# ---------------------------------------------------------------------------- min_saving
def _narrow_heads():
    """Heads of 4 channels on a 256-wide input: BD saves 4/256 = 1.6% of each head's weights."""
    torch.manual_seed(0)
    return MHA(d=256, heads=4, head_dim=4).eval(), torch.randn(2, 5, 256)


def test_bd_respects_min_saving_in_the_planner():
    model, x = _narrow_heads()
    graphs = []
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=lambda gm, ex: graphs.append((gm, list(ex))) or gm.forward)(x)
    torch._dynamo.reset()
    gm, ex = graphs[0]
    sites = find_linears(gm, find_params(gm, ex))
    res = analyze(gm, sites, ex)
    comps, skips = bd_plan.plan(res, sites, True, True)          # default: the option's default, 2%
    assert comps == [] and {s.kind for s in skips} == {"bd_qk", "bd_vo"}
    assert all("min_saving=2%" in s.reason and "1.6%" in s.reason for s in skips), skips
    comps, skips = bd_plan.plan(res, sites, True, True, min_saving=0.0)
    assert skips == [] and Counter(g.kind for c in comps for g in c.groups) == {"bd_qk": 4, "bd_vo": 4}
    comps, skips = bd_plan.plan(res, sites, True, True, min_saving=0.015)
    assert skips == [] and len(comps) == 2


def test_bd_min_saving_default_in_the_report():
    model, x = _narrow_heads()
    rep = bdpass.explain(model, x, options={"lowering": "aot_eager", "cost_model": False})
    assert rep.rewrites == [], str(rep)
    assert {s.kind for s in rep.skipped} == {"bd_qk", "bd_vo"} and all("min_saving" in s.reason for s in rep.skipped)


def test_bd_min_saving_option_reaches_the_planner():
    model, x = _narrow_heads()
    rep = bdpass.explain(model, x, options={"lowering": "aot_eager", "cost_model": False, "min_saving": 0.0})
    assert Counter(r.kind for r in rep.rewrites) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
