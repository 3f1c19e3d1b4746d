"""The analysis follows weights and channels through the spellings real models use: every
spelling of the same attention block must pair exactly the same heads as the plain one."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bdpass
from attention_models import Spelled
from bdpass.graph import ops
from bdpass.graph.layout import analyze
from bdpass.graph.linears import apply_ops, find_linears
from bdpass.graph.params import find_params
from bdpass.rewrites import bd_plan

AOT = {"lowering": "aot_eager", "cost_model": False, "strict": True}


def capture(model, *args):
    """The Dynamo graphs of ``model(*args)`` with their example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    torch._dynamo.reset()
    return graphs


def planned(model, *args, **plan_kw):
    (gm, ex), = capture(model, *args)
    sites = find_linears(gm, find_params(gm, ex))
    res = analyze(gm, sites, ex)
    comps, skips = bd_plan.plan(res, sites, True, True, **plan_kw)
    return sites, res, comps, skips


def pairing(sites, comps) -> set:
    """What BD pairs, independent of the order of columns: per group, its kind, projection
    and the set of (channel, partner weight, partner channel) it connects."""
    out = set()
    for c in comps:
        for g in c.groups:
            partners = g.q_partners if g.kind == "bd_qk" else g.o_partners
            links = frozenset((col, sites[i].weight.name, pc) for i, pcs in partners for col, pc in zip(g.cols, pcs))
            out.add((g.kind, sites[g.source].weight.name, links))
    return out


SPELLINGS = ([dict(proj=p) for p in ("T", "mT", "t", "transpose", "permute", "einsum2", "detach_w")]
             + [dict(between=b) for b in ("detach", "alias", "float", "to", "movedim", "broadcast_to", "expand_as",
                                         "unflatten", "narrow", "index", "index_select", "unbind", "bigT")]
             + [dict(score=s) for s in ("einsum", "sdpa", "baddbmm", "sinks", "sinks_first")]
             + [dict(out=o) for o in ("T", "einsum")])


@pytest.fixture(scope="module")
def plain_pairing():
    torch.manual_seed(0)
    sites, _, comps, skips = planned(Spelled().eval(), torch.randn(2, 6, 64))
    assert skips == []
    p = pairing(sites, comps)
    assert Counter(k for k, _, _ in p) == {"bd_qk": 4, "bd_vo": 4}
    return p


def _unfused(name, col):
    """(plain weight name, column) of a column of Spelled's fused (3*64, d) qkv weight."""
    return ("w" + "qkv"[col // 64], col % 64) if name == "wqkv" else (name, col)


@pytest.mark.parametrize("kw", SPELLINGS, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_spelling_pairs_the_same_heads(kw, plain_pairing):
    torch.manual_seed(0)
    model = Spelled(**kw).eval()
    sites, _, comps, skips = planned(model, torch.randn(2, 6, 64))
    assert skips == [], skips
    got = pairing(sites, comps)
    if kw.get("between") == "unbind":   # one fused projection: name its column blocks as the plain weights
        got = {(k, _unfused(w, min(c for c, _, _ in links))[0], frozenset((_unfused(w, c)[1], *_unfused(pw, pc)) for c, pw, pc in links))
               for k, w, links in got}
    assert got == plain_pairing


@pytest.mark.parametrize("kw", [dict(proj="einsum2"), dict(between="detach"), dict(between="movedim"),
                                dict(between="index"), dict(between="broadcast_to"), dict(score="einsum"),
                                dict(score="baddbmm"), dict(out="einsum"), dict(between="bigT"),
                                dict(score="sinks"), dict(score="sinks_first")],
                         ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_spelling_rewrites_exactly(kw):
    torch.manual_seed(1)
    model = Spelled(**kw).eval()
    x = torch.randn(2, 7, 64)
    torch._dynamo.reset()
    with torch.no_grad(), bdpass.collect_reports() as rep:
        out = torch.compile(model, backend="bd", options=AOT)(x)
        ref = model(x)
    torch._dynamo.reset()
    assert Counter(r.kind for r in rep.rewrites) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    assert rep.graphs[0].validation.startswith("passed"), rep.graphs[0].validation
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_index_by_a_buffer_needs_its_values():
    """A constant index held in a buffer is followed when the analysis has the graph's
    inputs; without them the pair is skipped with the reason (never silently)."""
    torch.manual_seed(0)
    model = Spelled(between="index_select").eval()
    (gm, ex), = capture(model, torch.randn(2, 6, 64))
    sites = find_linears(gm, find_params(gm, ex))
    comps, skips = bd_plan.plan(analyze(gm, sites), sites, True, True)
    assert [s.kind for s in skips] == ["bd_qk"] and "not known at compile time" in skips[0].reason
    comps, skips = bd_plan.plan(analyze(gm, sites, ex), sites, True, True)
    assert skips == [] and sum(len(c.groups) for c in comps) == 8


# ---------------------------------------------------------------------------- linear sites
class ManyLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.w2 = nn.Parameter(torch.randn(6, 8))
        self.w3 = nn.Parameter(torch.randn(8, 2, 3))
        self.wo = nn.Parameter(torch.randn(2, 3, 8))
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.einsum("btd,dhe->bhte", x, self.w3)
        return [
            x @ self.w2.T, x @ self.w2.mT + self.b, torch.matmul(x, self.w2.t()), x @ self.w2.transpose(0, 1),
            x @ self.w2.permute(1, 0), F.linear(x, self.w2.detach()), x @ self.w2.T.contiguous().float(),
            torch.einsum("btd,ed->bte", x, self.w2), torch.einsum("ed,btd->bte", self.w2, x),
            torch.einsum("...d,dhe->...he", x, self.w3), torch.einsum("btd,de", x, self.w3.flatten(1)),
            x @ self.w3.flatten(1), x @ self.w3.reshape(8, 6), h, torch.einsum("bhte,hed->btd", h, self.wo),
        ]


def test_linear_sites_reproduce_their_nodes():
    """Each site's prologue, W, bias and epilogue recompute exactly what its node computes."""
    torch.manual_seed(0)
    model = ManyLinears()
    (gm, ex), = capture(model, torch.randn(2, 5, 8))
    sites = find_linears(gm, find_params(gm, ex))
    assert len(sites) == 15
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = super().run_node(n)
            return values[n]

    Recorder(gm).run(*ex)
    reshaped = 0
    for s in sites:
        y = apply_ops(values[s.input], s.prologue) @ s.weight_matrix(ex)
        if s.bias is not None:
            y = y + s.bias_vector(ex)
        torch.testing.assert_close(apply_ops(y, s.epilogue), values[s.output])
        assert s.weight_matrix(ex).shape == (s.d_in, s.d_out) and s.tokens == 10
        reshaped += s.reshaped
    assert reshaped == 4        # "btd,dhe->bhte", "...d,dhe->...he", implicit "btd,de" (-> "bet"), "bhte,hed->btd"


def test_attribute_transposes_by_rank():
    """``.T`` reverses every dim of a tensor of rank > 2; ``.mT`` swaps the last two."""
    def f(x, y):
        return x.T, x.mT, y.T, y.mT, y.t()

    graphs = []

    def backend(gm, ex):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(f, backend=backend)(torch.randn(2, 3, 4), torch.randn(3, 4))
    torch._dynamo.reset()
    names = [ops.canonical(n) for n in graphs[0].graph.nodes if n.op == "call_function" or n.op == "call_method"]
    assert names == ["T", "mT", "t", "t", "t"]


def test_multi_dim_einsum_projection_is_reported_until_rewritable():
    torch.manual_seed(0)
    sites, _, comps, skips = planned(Spelled(proj="einsum3").eval(), torch.randn(2, 6, 64))
    assert comps == [] and {s.kind for s in skips} == {"bd_qk", "bd_vo"}
    assert all("einsum" in s.reason for s in skips), skips
    sites, _, comps, skips = planned(Spelled(proj="einsum3").eval(), torch.randn(2, 6, 64), reshaped_sites=True)
    assert skips == [] and Counter(g.kind for c in comps for g in c.groups) == {"bd_qk": 4, "bd_vo": 4}
    assert all(sites[g.source].reshaped for c in comps for g in c.groups)


# ---------------------------------------------------------------------------- names
class SelfNamedS(nn.Module):
    """Attention and three low-rank chains at the root, with ``self`` spelled ``s``."""

    def __init__(s):
        super().__init__()
        s.q_proj, s.k_proj, s.v_proj, s.o_proj = (nn.Linear(32, 32) for _ in range(4))
        for i in range(3):
            setattr(s, f"A{i}", nn.Parameter(torch.randn(32, 8) / 6))
            setattr(s, f"B{i}", nn.Parameter(torch.randn(8, 32) / 3))

    def forward(s, x):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, 4, 8).transpose(1, 2) for p in (s.q_proj, s.k_proj, s.v_proj))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, 32)
        y = s.o_proj(o)
        for i in range(3):
            y = y + (y @ getattr(s, f"A{i}")) @ getattr(s, f"B{i}")
        return y


def test_site_names_are_module_paths_whatever_self_is_called():
    torch.manual_seed(0)
    model = SelfNamedS().eval()
    rep = bdpass.explain(model, torch.randn(2, 5, 32), options={**AOT, "min_saving": 0.0})
    records = rep.rewrites + rep.skipped
    params = dict(model.named_parameters())
    assert {r.kind for r in records} >= {"bd_qk", "bd_vo", "pifa"}, str(rep)
    for r in records:
        assert not r.site.startswith("s.") and r.site != "s", str(rep)
    chains = sorted(r.site for r in rep.rewrites if r.kind == "pifa")
    assert chains == ["A0 -> B0", "A1 -> B1", "A2 -> B2"], str(rep)
    # o_proj feeds A0 directly: a full-rank linear-of-linear, reported under both names
    assert [s.site for s in rep.skipped if s.kind == "pifa"] == ["o_proj -> A0"], str(rep)
    for r in rep.rewrites:
        if r.kind != "pifa":
            assert r.details["projection"] in params and all(p in params for p in r.details["folded_into"])
        else:
            assert all(p in params for p in r.details["weights"])


class FalconStyle(nn.Module):
    """Falcon's fused multi-query layout: (B, T, groups, g + 2, e) with the group's key and
    value picked by constant list indices and broadcast over its query heads."""

    def __init__(self, d=64, groups=2, g=2, e=16):
        super().__init__()
        self.groups, self.g, self.e = groups, g, e
        self.qkv = nn.Linear(d, groups * (g + 2) * e)
        self.dense = nn.Linear(groups * g * e, d)

    def forward(self, x):
        B, T, _ = x.shape
        G, g, e = self.groups, self.g, self.e
        qkv = self.qkv(x).view(B, T, G, g + 2, e)
        q = qkv[:, :, :, :-2]
        k = torch.broadcast_to(qkv[:, :, :, [-2]], q.shape)
        v = torch.broadcast_to(qkv[:, :, :, [-1]], q.shape)
        q, k, v = (t.flatten(2, 3).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(o.transpose(1, 2).reshape(B, T, G * g * e))


def test_falcon_list_index_multi_query():
    torch.manual_seed(2)
    model = FalconStyle().eval()
    x = torch.randn(2, 6, 64)
    sites, _, comps, skips = planned(model, x)
    assert skips == []
    groups = [g for c in comps for g in c.groups]
    # one key and one value head per group, each folded into the group's two query heads
    assert Counter(g.kind for g in groups) == {"bd_qk": 2, "bd_vo": 2}
    assert all(len(g.q_partners) == 2 for g in groups if g.kind == "bd_qk")
    assert all(len(g.o_partners) == 2 for g in groups if g.kind == "bd_vo")
    torch._dynamo.reset()
    with torch.no_grad(), bdpass.collect_reports() as rep:
        out = torch.compile(model, backend="bd", options=AOT)(x)
        ref = model(x)
    torch._dynamo.reset()
    assert Counter(r.kind for r in rep.rewrites) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_attention_sinks_rewrite_under_dynamic_shapes():
    """Sinks composed with a symbolic sequence length: the concatenated score column and the
    sliced probabilities keep their verdicts and the rewrite stays exact at every length."""
    torch.manual_seed(2)
    model = Spelled(score="sinks").eval()
    torch._dynamo.reset()
    with torch.no_grad(), bdpass.collect_reports() as rep:
        f = torch.compile(model, backend="bd", dynamic=True, options=AOT)
        for T in (5, 9, 13):
            x = torch.randn(2, T, 64)
            torch.testing.assert_close(f(x), model(x), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()
    assert Counter(r.kind for r in rep.rewrites) == {"bd_qk": 1, "bd_vo": 1}, str(rep)
    assert all(g.validation.startswith("passed") for g in rep.graphs), str(rep)
