"""bdpass.prepare: the user's model, edited by the backend's decisions, as an ordinary module
(smaller, any input shape, eager / torch.compile / torch.export), saved and loaded with
state_dict/safetensors and transformers' save_pretrained, never factorizing on load.

Outputs are compared with a float64 eager run of the same weights, side by side with the
original model (prepared error <= 1.5x the original's, the zoo's standard)."""
from __future__ import annotations

import copy
import gc
import json
import math
import sys
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bdpass
from attention_models import MHA
from helpers import first_tensor, rel_l2, to64
from lowrank_models import AsvdLinear, LowRankMLP, SvdLinear
from zoo import build

ALL = {"cost_model": False}   # every legal rewrite, whatever the machine's timing says


def run(module, args, kwargs=None):
    with torch.no_grad():
        return first_tensor(module(*args, **(kwargs or {})))


def assert_side_by_side(original, prepared, args, kwargs=None, factor=1.5):
    """The prepared model's error against float64 is within ``factor`` x the original's."""
    ref = run(copy.deepcopy(original).double(), to64(args), to64(kwargs or {}))
    e_orig = rel_l2(run(original, args, kwargs), ref)
    e_prep = rel_l2(run(prepared, args, kwargs), ref)
    assert e_prep <= factor * e_orig, (e_prep, e_orig)
    return e_prep, e_orig


def stated_bound(model):
    """The worst-case first-order growth of rounding error the report states for the
    rewrites (the bound the backend's own PIFA tests hold a single chain to)."""
    return max(r.error_bound for r in model.bdpass_report.rewrites)


def forbid_factorization(monkeypatch):
    """From now on any factorization raises: loading must take every tensor from the file.
    Every name patched exists (a renamed entry point fails here rather than going unpatched)."""
    import bdpass.identities
    import bdpass.identities.bd
    import bdpass.identities.pifa
    import bdpass.identities.pivots
    import bdpass.identities.shared_row_search
    import bdpass.rewrites.bd_decide
    import bdpass.rewrites.bd_factors
    import bdpass.rewrites.pifa

    calls = []

    def forbidden(*a, **k):
        calls.append(1)
        raise AssertionError("a factorization was computed")

    targets = {
        bdpass.identities: ("pifa_factors", "bd_factors", "bd_factors_with_rows", "pivoted_qr", "pivot_columns"),
        bdpass.identities.bd: ("bd_factors", "bd_factors_with_rows", "pivoted_qr"),
        bdpass.identities.pifa: ("pifa_factors", "pivoted_qr"),
        bdpass.identities.pivots: ("pivoted_qr", "pivot_columns"),
        bdpass.identities.shared_row_search: ("shared_rows", "grouped_rows"),
        bdpass.rewrites.pifa: ("pifa_factors",),
        bdpass.rewrites.bd_factors: ("bd_factors_with_rows", "pivot_columns", "form_factors"),
        bdpass.rewrites.bd_decide: ("form_factors",),
        bdpass.backend: ("rewrite_graph", "plan_decisions", "decide_graph", "refit_graph"),
        bdpass.prepare.apply: ("decide_graph", "refit_graph"),
        torch.linalg: ("qr", "solve", "inv", "svd", "lstsq", "lu_factor"),
    }
    for mod, names in targets.items():
        for name in names:
            monkeypatch.setattr(mod, name, forbidden)
    return calls


def index_bytes(model):
    return sum(b.numel() * b.element_size() for b in model.buffers() if b.dtype == torch.int64)


def saved_bytes(model):
    return sum((e["params_before"] - e["params_after"]) for e in model.bdpass_report.edits)


class Block(nn.Module):
    """Attention (BD) followed by an MLP of two linked low-rank chains (PIFA)."""

    def __init__(self):
        super().__init__()
        self.attn = MHA(d=64, heads=4, head_dim=16)
        self.mlp = LowRankMLP(64, 16, 128)

    def forward(self, x):
        return self.mlp(x + self.attn(x))


class Stack(nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def _block(seed=0):
    torch.manual_seed(seed)
    return Block().eval()


# ----------------------------------------------------------------------------- small models
def test_block_prepared_in_place():
    model = _block()
    original = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    gone = [weakref.ref(model.attn.k_proj.weight), weakref.ref(model.mlp.up.v_proj.weight)]
    q_before = model.attn.q_proj.weight.detach().clone()
    out = bdpass.prepare(model, x, options=ALL)
    assert out is model
    rep = model.bdpass_report
    assert {e["kind"] for e in rep.edits} == {"bd_qk", "bd_vo", "pifa"}, str(rep)
    assert not rep.not_preparable
    assert isinstance(model.attn.k_proj, bdpass.BDLinear) and isinstance(model.attn.v_proj, bdpass.BDLinear)
    assert type(model.attn.q_proj) is nn.Linear and type(model.attn.o_proj) is nn.Linear   # folded in place
    assert model.attn.q_proj.weight.shape == q_before.shape and not torch.equal(model.attn.q_proj.weight, q_before)
    assert isinstance(model.mlp.up.u_proj, bdpass.PivotLinear) and isinstance(model.mlp.up.v_proj, bdpass.Absorbed)
    # the up chain's output order is absorbed by the down chain (a linked pair)
    assert not model.mlp.up.u_proj.restore_order and model.mlp.down.u_proj.restore_order
    gc.collect()
    assert all(r() is None for r in gone), "a replaced weight is still referenced"
    # parameter bytes fall by exactly the rewrites' savings (plus the int64 pivot tables)
    assert rep.bytes_after == rep.bytes_before - 4 * saved_bytes(model) + index_bytes(model)
    assert bdpass.prepare.state_bytes(model) == rep.bytes_after < rep.bytes_before
    assert_side_by_side(original, model, (x,))
    # any input shape
    for shape in [(1, 5, 64), (3, 17, 64), (8, 1, 64)]:
        y = torch.randn(*shape)
        assert_side_by_side(original, model, (y,))
    # one token: attention averages nothing, so the rounding-error growth each rewrite was
    # accepted with shows: within the product of the growths stated in the report
    growth = 1.0
    for r in rep.rewrites:
        growth *= max(r.expected_growth, 1.0)
    assert_side_by_side(original, model, (torch.randn(1, 1, 64),), factor=max(1.5, growth))
    assert "not preparable:" not in str(rep) and "bd_qk" in str(rep)


def test_inplace_false_leaves_the_model_alone():
    model = _block()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 12, 64)
    prepared = bdpass.prepare(model, x, options=ALL, inplace=False)
    assert prepared is not model and isinstance(prepared.attn.k_proj, bdpass.BDLinear)
    assert type(model.attn.k_proj) is nn.Linear and not hasattr(model, "bdpass_report")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert_side_by_side(model, prepared, (x,))


def test_one_layer_of_float64_work_at_a_time(monkeypatch):
    """With layer splitting each decoder block is its own graph instance: the analysis of one
    never starts while float64 tensors of another are alive, and edits are applied per layer."""
    import bdpass.prepare.apply as apply_mod

    torch.manual_seed(0)
    model = Stack(3).eval()
    x = torch.randn(2, 12, 64)
    live, calls = [], []

    def counting(real):
        def analysis(*a):
            gc.collect()
            live.append(sum(o.numel() for o in gc.get_objects()
                            if isinstance(o, torch.Tensor) and o.dtype == torch.float64))
            calls.append(sum(isinstance(m, bdpass.BDLinear) for m in model.modules()))
            return real(*a)
        return analysis

    for name in ("decide_graph", "refit_graph"):      # first layer, other layers
        monkeypatch.setattr(apply_mod, name, counting(getattr(apply_mod, name)))
    original = copy.deepcopy(model)
    bdpass.prepare(model, x, options=ALL)
    layer_instances = [i for i, lab in enumerate(model.bdpass_report.instances) if lab.startswith("layers.")]
    assert len(layer_instances) == 3, model.bdpass_report.instances
    assert live and max(live) == 0, live
    # the edits of layer k are in the model before layer k+1 is analysed
    assert [calls[i] for i in layer_instances] == [0, 2, 4], calls
    assert_side_by_side(original, model, (x,))


def test_layers_share_one_analysis_and_refit_their_own_weights(monkeypatch):
    """The layers of a stack run through one graph: it is analysed and validated once, and
    every other layer refits the same rewrites to its own weights. The result is the same,
    tensor for tensor, as analysing every layer on its own."""
    import bdpass.prepare.apply as apply_mod

    torch.manual_seed(0)
    model = Stack(3).eval()
    x = torch.randn(2, 12, 64)
    separate = bdpass.prepare(copy.deepcopy(model), x, options={**ALL, "share_analysis": False})
    counts = {"decide_graph": 0, "refit_graph": 0}

    def counting(name, real):
        def analysis(*a):
            counts[name] += 1
            return real(*a)
        return analysis

    for name in counts:
        monkeypatch.setattr(apply_mod, name, counting(name, getattr(apply_mod, name)))
    shared = bdpass.prepare(copy.deepcopy(model), x, options=ALL)
    layers = [i for i, lab in enumerate(shared.bdpass_report.instances) if lab.startswith("layers.")]
    assert len(layers) == 3 and counts["refit_graph"] == 2, (counts, shared.bdpass_report.instances)
    reps = shared.bdpass_report.graphs
    assert all(reps[i].validation.startswith(f"shared with graph {reps[layers[0]].index}") for i in layers[1:])
    assert [len(reps[i].rewrites) for i in layers] == [len(separate.bdpass_report.graphs[i].rewrites)
                                                      for i in layers]
    a, b = shared.state_dict(), separate.state_dict()
    assert a.keys() == b.keys() and len(shared.bdpass_report.edits) == 12
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert_side_by_side(model, shared, (x,))


def test_a_layer_where_the_identity_fails_keeps_its_weights():
    """Refitting checks each layer's factors against the error budget: a layer whose
    low-rank chain has a singular pivot block keeps that chain's
    original modules, named in the report, while the other layers are prepared."""
    torch.manual_seed(0)
    model = Stack(3).eval()
    with torch.no_grad():      # layer 1's up-projection: rank-deficient (two columns equal)
        u = model.layers[1].mlp.up.u_proj.weight           # (d_out, r)
        u[:, 1] = u[:, 0]
    x = torch.randn(2, 12, 64)
    original = copy.deepcopy(model)
    bdpass.prepare(model, x, options=ALL)
    rep = model.bdpass_report
    refused = {lab: [sk for sk in g.skipped if "at this instance's weights" in sk.reason]
               for g, lab in zip(rep.graphs, rep.instances)}
    assert [lab for lab, sks in refused.items() if sks] == ["layers.1"], refused
    assert {sk.site for sk in refused["layers.1"]} == {"mlp.up", "mlp.down"}, refused    # linked chains
    assert not isinstance(model.layers[1].mlp.up.u_proj, bdpass.PivotLinear)
    assert isinstance(model.layers[2].mlp.up.u_proj, bdpass.PivotLinear)
    assert_side_by_side(original, model, (x,))


def test_without_validation_no_graph_is_rewritten(monkeypatch):
    """Decisions are plain objects: with validate=False ``prepare`` edits the modules from
    them and never builds a rewritten graph; the result equals the validated one."""
    import bdpass.backend as backend_mod

    torch.manual_seed(0)
    model = Stack(2).eval()
    x = torch.randn(2, 12, 64)
    validated = bdpass.prepare(copy.deepcopy(model), x, options=ALL)

    def no_editor(*a, **k):
        raise AssertionError("a graph was rewritten")

    monkeypatch.setattr(backend_mod, "GraphEditor", no_editor)
    plain = bdpass.prepare(copy.deepcopy(model), x, options={**ALL, "validate": False})
    a, b = plain.state_dict(), validated.state_dict()
    assert a.keys() == b.keys() and len(plain.bdpass_report.edits) == 8
    for k in a:
        assert torch.equal(a[k], b[k]), k


def live_tensor_bytes():
    """Bytes of every CPU tensor storage reachable from Python (each storage once)."""
    gc.collect()
    seen = {}
    for o in gc.get_objects():
        if type(o) in (torch.Tensor, nn.Parameter) and o.device.type == "cpu":
            try:
                st = o.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except RuntimeError:
                continue
    return sum(seen.values())


def test_peak_memory_is_the_model_plus_one_layer_of_float64_work(monkeypatch):
    """Live tensors when an instance's analysis has just finished (its float64 factors,
    validation results and decisions all alive, the most preparing holds) minus the original
    model: the same for 2 and 4 layers, and at most twice one layer's weights in float64
    (a float64 copy of the weights plus float64 factors of about the same size)."""
    import bdpass.prepare.apply as apply_mod

    reals = {name: getattr(apply_mod, name) for name in ("decide_graph", "refit_graph")}
    extra = {}
    for n in (2, 4):
        torch.manual_seed(0)
        model = Stack(n).eval()
        x = torch.randn(2, 12, 64)
        base = live_tensor_bytes()
        samples = extra[n] = []

        def sampling(real):
            def analysis(*a):
                out = real(*a)
                samples.append(live_tensor_bytes() - base)
                return out
            return analysis

        for name, real in reals.items():
            monkeypatch.setattr(apply_mod, name, sampling(real))
        bdpass.prepare(model, x, options=ALL)
        assert len(model.bdpass_report.edits) == 4 * n, str(model.bdpass_report)
        layer64 = 2 * bdpass.prepare.state_bytes(Block())
        assert max(samples) <= 2 * layer64, (samples, layer64)
    assert max(extra[4]) <= 1.02 * max(extra[2]), extra


class Breaks(nn.Module):
    """A data-dependent branch (a graph break) between two low-rank chains."""

    def __init__(self):
        super().__init__()
        self.a = SvdLinear(64, 16, 64)
        self.b = SvdLinear(64, 16, 64)

    def forward(self, x):
        y = self.a(x)
        if float(y.sum()) > 0:
            y = -y
        return self.b(torch.tanh(y))


def test_graph_breaks():
    torch.manual_seed(0)
    model = Breaks().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    bdpass.prepare(model, x, options=ALL)
    rep = model.bdpass_report
    assert rep.graphs_compiled >= 2 and len(rep.edits) == 2, str(rep)
    assert isinstance(model.a.u_proj, bdpass.PivotLinear) and isinstance(model.b.u_proj, bdpass.PivotLinear)
    assert_side_by_side(original, model, (x,))
    assert_side_by_side(original, model, (-x,))      # the other branch


class TwiceUsed(nn.Module):
    """One low-rank chain module called before and after a graph break."""

    def __init__(self):
        super().__init__()
        self.chain = SvdLinear(64, 16, 64)
        self.other = SvdLinear(64, 16, 64)

    def forward(self, x):
        y = self.chain(x)
        torch._dynamo.graph_break()
        return self.other(self.chain(torch.tanh(y)))


def test_weight_read_twice_is_not_preparable():
    torch.manual_seed(0)
    model = TwiceUsed().eval()
    x = torch.randn(2, 12, 64)
    original = copy.deepcopy(model)
    bdpass.prepare(model, x, options=ALL)
    rep = model.bdpass_report
    assert type(model.chain.u_proj) is nn.Linear and isinstance(model.other.u_proj, bdpass.PivotLinear)
    lines = [b.line() for b in rep.not_preparable]
    assert lines and all("chain" in ln and "read 2 times" in ln for ln in lines), lines
    assert "not preparable: pifa at chain" in str(rep)
    assert torch.equal(model.chain.u_proj.weight, original.chain.u_proj.weight)
    # `other` absorbed the column order of `chain` in the graph; `chain` stays as it was, so
    # that order is undone: the same factors as preparing `other` on its own
    alone = copy.deepcopy(original.other)
    bdpass.prepare(alone, x, options=ALL)
    for name in ("w_pivot", "coeff", "b_pivot", "b_rest", "pivots", "rest"):
        assert torch.equal(getattr(model.other.u_proj, name), getattr(alone.u_proj, name)), name
    assert_side_by_side(original, model, (x,), factor=max(1.5, stated_bound(model)))


class RawSource(nn.Module):
    """Attention whose K projection is a raw parameter (no module to replace) and whose V/O
    pair is modules with the queries projected through an einsum over a viewed weight."""

    def __init__(self, d=64, h=4, e=16):
        super().__init__()
        self.h, self.e = h, e
        self.wq = nn.Parameter(torch.randn(d, h, e) * d ** -0.5)      # einsum "btd,dhe->bhte"
        self.wk = nn.Parameter(torch.randn(h * e, d) * d ** -0.5)     # F.linear on a raw weight
        self.v_proj = nn.Linear(d, h * e)
        self.o_proj = nn.Linear(h * e, d)
        self.k2 = nn.Linear(d, h * e)
        self.v2 = nn.Linear(d, h * e)
        self.wq2 = nn.Parameter(torch.randn(d, h, e) * d ** -0.5)

    def attend(self, q, k, v):
        B, _, T, _ = q.shape
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return o.transpose(1, 2).reshape(B, T, self.h * self.e)

    def forward(self, x):
        B, T, _ = x.shape
        split = lambda t: t.view(B, T, self.h, self.e).transpose(1, 2)   # noqa: E731
        q = torch.einsum("btd,dhe->bhte", x, self.wq)
        k = split(F.linear(x, self.wk))
        v = split(self.v_proj(x))
        y = self.o_proj(self.attend(q, k, v))
        # a second attention: K from a module, queries through the einsum weight
        q2 = torch.einsum("btd,dhe->bhte", y, self.wq2)
        return y + self.attend(q2, split(self.k2(y)), split(self.v2(y)))


def test_sources_without_module_are_not_preparable_and_partners_fold_through_views():
    torch.manual_seed(0)
    model = RawSource().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    bdpass.prepare(model, x, options=ALL)
    rep = model.bdpass_report
    bad = [b for b in rep.not_preparable if b.kind == "bd_qk" and "wk" in b.reason]
    assert bad and "not the weight of an nn.Linear" in bad[0].reason, str(rep)
    # the raw K source and its partner are left exactly as they were
    assert torch.equal(model.wk, original.wk) and torch.equal(model.wq, original.wq)
    # V/O through modules; the second Q/K pair folds B into the einsum weight through its views
    assert isinstance(model.v_proj, bdpass.BDLinear) and isinstance(model.k2, bdpass.BDLinear), str(rep)
    assert not torch.equal(model.wq2, original.wq2) and model.wq2.shape == original.wq2.shape
    assert_side_by_side(original, model, (x,))


class LinkedToRaw(nn.Module):
    """Two linked chains: the second (raw F.linear weights) cannot be prepared, so the first
    must be prepared with its column order restored."""

    def __init__(self):
        super().__init__()
        self.up = SvdLinear(64, 16, 128)
        self.down = AsvdLinear(128, 16, 64)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


def test_linked_chain_whose_consumer_is_not_preparable():
    torch.manual_seed(0)
    model = LinkedToRaw().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    before = bdpass.explain(model, x, options=ALL)
    link = [r for r in before.rewrites if r.details.get("column_order") != "restored"]
    assert link, "the backend should link the two chains"
    bdpass.prepare(model, x, options=ALL)
    rep = model.bdpass_report
    assert isinstance(model.up.u_proj, bdpass.PivotLinear) and model.up.u_proj.restore_order
    assert [b.site for b in rep.not_preparable] == ["down"], str(rep)
    assert_side_by_side(original, model, (x,))


def test_conv1d_chain():
    from transformers.pytorch_utils import Conv1D

    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.down, self.up = Conv1D(16, 64), Conv1D(64, 16)   # Conv1D(nf, nx): (64 -> 16 -> 64)
            for m in (self.down, self.up):
                nn.init.normal_(m.weight, std=m.weight.shape[0] ** -0.5)
                nn.init.normal_(m.bias, std=0.1)

        def forward(self, x):
            return self.up(self.down(x))

    torch.manual_seed(0)
    model = C().eval()
    original = copy.deepcopy(model)
    x = torch.randn(2, 12, 64)
    bdpass.prepare(model, x, options=ALL)
    assert isinstance(model.up, bdpass.PivotLinear) and model.up.replaces == "Conv1D", str(model.bdpass_report)
    assert isinstance(model.down, bdpass.Absorbed)
    # what the backend computes for the same model, and within the bound its report states
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(original), backend="bd", options=ALL)
    torch.testing.assert_close(run(model, (x,)), run(compiled, (x,)))
    torch._dynamo.reset()
    for y in (x, torch.randn(5, 64)):
        assert_side_by_side(original, model, (y,), factor=max(1.5, stated_bound(model)))


def test_options_and_errors():
    model = _block()
    with pytest.raises(ValueError, match="unknown option"):
        bdpass.prepare(model, torch.randn(2, 4, 64), options={"nope": 1})
    with pytest.raises(TypeError, match="split_layers"):
        bdpass.prepare(model, torch.randn(2, 4, 64), options={"split_layers": "yes"})
    with pytest.raises(TypeError, match="nn.Module"):
        bdpass.prepare(lambda x: x, torch.randn(2))
    bdpass.prepare(model, torch.randn(2, 12, 64), options={**ALL, "verify": True})
    assert "matches the original" in model.bdpass_report.verified


# ----------------------------------------------------------------------------- checkpoints
def test_state_dict_round_trip_through_safetensors(tmp_path, monkeypatch):
    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    path = tmp_path / "block.safetensors"
    bdpass.save_prepared(model, path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        plan = json.loads(f.metadata()["bdpass.plan"])
        keys = set(f.keys())
    assert keys == set(model.state_dict())
    assert plan == bdpass.plan_of(model) and plan["format"] == "bdpass.plan/1"
    assert plan["modules"]["attn.k_proj"]["type"] == "BDLinear"
    assert plan["modules"]["mlp.up.v_proj"] == {"type": "Absorbed", "replaces": "Linear", "in_features": 64,
                                                 "out_features": 16, "into": "mlp.up.u_proj"}
    assert "attn.q_proj.weight" in plan["folded"]
    calls = forbid_factorization(monkeypatch)
    with pytest.raises(AssertionError, match="factorization was computed"):    # the patch is effective
        bdpass.prepare(_block(), x, options={**ALL, "strict": True})
    calls.clear()
    fresh = _block(seed=123)          # same architecture, other weights
    assert not torch.equal(run(fresh, (x,)), run(model, (x,)))
    loaded = bdpass.load_prepared(fresh, path)
    assert loaded is fresh
    for y in (x, torch.randn(1, 3, 64)):
        assert torch.equal(run(loaded, (y,)), run(model, (y,)))
    # a plain state_dict works the same way with apply_plan (any checkpoint format)
    other = bdpass.apply_plan(_block(seed=7), plan)
    other.load_state_dict(model.state_dict())
    assert torch.equal(run(other, (x,)), run(model, (x,)))
    assert not calls


def test_markers_under_the_replaced_weights_names(tmp_path):
    """Each prepared module holds a zero-element ``weight`` buffer where the replaced weight
    was: the original architecture refuses a prepared state (size mismatch) instead of
    keeping its own weights, the marker counts no bytes, and a state without markers (saved
    before they existed) loads."""
    from safetensors.torch import load_file, save_file

    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    prepared = {p: m for p, m in model.named_modules() if isinstance(m, (bdpass.BDLinear, bdpass.PivotLinear,
                                                                           bdpass.Absorbed))}
    assert {type(m).__name__ for m in prepared.values()} == {"BDLinear", "PivotLinear", "Absorbed"}
    state = model.state_dict()
    for p, m in prepared.items():
        assert state[f"{p}.weight"].shape == (0,) and state[f"{p}.weight"].dtype == torch.float32
        assert "weight" in dict(m.named_buffers()) and "weight" not in dict(m.named_parameters())
    assert sum(t.numel() for k, t in state.items() if k.endswith(".weight") and k.rpartition(".")[0] in prepared) == 0
    unmarked = copy.deepcopy(model)
    for m in unmarked.modules():
        if isinstance(m, (bdpass.BDLinear, bdpass.PivotLinear, bdpass.Absorbed)):
            del m._buffers["weight"]
    assert model.bdpass_report.bytes_after == bdpass.prepare.state_bytes(model) \
        == bdpass.prepare.state_bytes(unmarked)
    assert copy.deepcopy(model).half().attn.k_proj.weight.dtype == torch.float16     # casts like the module
    # the original architecture refuses the prepared state, on the replaced weights' sizes
    with pytest.raises(RuntimeError, match=r"size mismatch for attn\.k_proj\.weight.*torch\.Size\(\[0\]\)"):
        _block().load_state_dict(state)
    # a state without markers loads (load_state_dict, load_prepared; strict)
    path = tmp_path / "block.safetensors"
    bdpass.save_prepared(model, path)
    old = {k: v for k, v in load_file(str(path)).items() if k.rpartition(".")[0] not in prepared
           or not k.endswith(".weight")}
    assert len(old) == len(state) - len(prepared)
    other = bdpass.apply_plan(_block(seed=7), bdpass.plan_of(model))
    assert not other.load_state_dict(old).missing_keys
    assert torch.equal(run(other, (x,)), run(model, (x,)))
    save_file(old, str(tmp_path / "old.safetensors"), metadata=load_file_metadata(path))
    loaded = bdpass.load_prepared(_block(seed=9), tmp_path / "old.safetensors")
    assert torch.equal(run(loaded, (x,)), run(model, (x,)))


def load_file_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_plan_refuses_other_architectures(tmp_path):
    model = bdpass.prepare(_block(), torch.randn(2, 12, 64), options=ALL)
    path = tmp_path / "block.safetensors"
    bdpass.save_prepared(model, path)
    wide = Block()
    wide.attn.k_proj = nn.Linear(64, 128)
    with pytest.raises(ValueError, match=r"attn.k_proj = Linear\(64, 64\).*Linear\(64, 128\).*different architecture"):
        bdpass.load_prepared(wide, path)
    with pytest.raises(ValueError, match="does not have"):
        bdpass.load_prepared(nn.Sequential(nn.Linear(64, 64)), path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no prepared-model plan"):
        bdpass.load_prepared(_block(), tmp_path / "plain.safetensors")


# ----------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def deepseek():
    """A transformers DeepSeek-V2 (MLA, MoE looping over the experts that were hit: graph
    breaks), built from a config, default cache, prepared."""
    model, args, kwargs = build("deepseek_v2", use_cache=True, experts_implementation="eager")
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    return original, model, args, kwargs


def test_deepseek_v2_prepared(deepseek):
    original, model, args, kwargs = deepseek
    rep = model.bdpass_report
    assert rep.graphs_compiled > 2 and not rep.not_preparable, str(rep)
    kinds = {k for e in rep.edits for k in e["kind"].split("+")}
    assert kinds == {"bd_qk", "bd_vo"}, str(rep)
    for layer in model.model.layers:
        assert isinstance(layer.self_attn.kv_b_proj, bdpass.BDLinear)
        assert type(layer.self_attn.q_proj) is nn.Linear
    assert rep.bytes_after == rep.bytes_before - 4 * saved_bytes(model) + index_bytes(model)
    assert model.config.bdpass == bdpass.plan_of(model)
    assert_side_by_side(original, model, args, kwargs)
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(5))
    assert_side_by_side(original, model, (ids,))       # another shape


def test_deepseek_v2_save_pretrained_from_pretrained(deepseek, tmp_path, monkeypatch):
    import transformers

    _, model, args, kwargs = deepseek
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["bdpass"]["modules"]["model.layers.0.self_attn.kv_b_proj"]["type"] == "BDLinear"
    shapes = _checkpoint_shapes(tmp_path)
    replaced = {k: v for k, v in shapes.items() if k.endswith("kv_b_proj.weight")}
    # no replaced weight with elements: only each BDLinear's zero-element marker under its name
    assert all(math.prod(v) == 0 for v in replaced.values()), f"replaced weights saved: {replaced}"
    assert len(replaced) == len(model.model.layers), sorted(shapes)
    calls = forbid_factorization(monkeypatch)
    loaded = bdpass.from_pretrained(transformers.AutoModelForCausalLM, tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.kv_b_proj, bdpass.BDLinear)
    assert torch.equal(run(loaded, args, kwargs), run(model, args, kwargs))
    assert bdpass.prepare.state_bytes(loaded) == bdpass.prepare.state_bytes(model)
    ids = args[0][:1]
    assert torch.equal(_generate(loaded, ids), _generate(model, ids))
    assert not calls


def _checkpoint_shapes(path):
    from safetensors import safe_open

    shapes = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            shapes.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})
    return shapes


def _generate(model, ids, compiled=False, **kw):
    gk = dict(max_new_tokens=6, do_sample=False, **kw)
    with torch.no_grad():
        if not compiled:
            return model.generate(ids, **gk)
        eager = model.forward
        torch._dynamo.reset()
        model.forward = torch.compile(eager, backend="inductor")
        try:
            return model.generate(ids, **gk)
        finally:
            model.forward = eager
            torch._dynamo.reset()


def test_deepseek_v2_generate(deepseek):
    original, model, args, _ = deepseek
    ids = args[0][:1]
    ref = _generate(original, ids)
    assert torch.equal(_generate(model, ids), ref)
    assert torch.equal(_generate(model, ids, compiled=True), ref)


def _lowrank_llama(seed=0):
    """A GQA llama whose q/k/v/o projections and MLP linears are rank-50% module pairs
    (SVD-LLM's spelling); default cache."""
    model, args, kwargs = build("llama", use_cache=True, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    r = min(lin.in_features, lin.out_features) // 2
                    pair = SvdLinear(lin.in_features, r, lin.out_features, bias_u=lin.bias is not None)
                    with torch.no_grad():
                        for m in (pair.v_proj, pair.u_proj):
                            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
                    setattr(parent, name, pair)
    return model.eval(), args, kwargs


def test_lowrank_llama_generate():
    """GQA decoder whose projections are low-rank pairs, default KV cache: the pairs are
    prepared as PivotLinear (order restored, so the cache holds the original K/V); BD is
    skipped (its K/V are chain outputs, not single projections), with the reason reported."""
    model, args, kwargs = _lowrank_llama()
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    rep = model.bdpass_report
    assert {e["kind"] for e in rep.edits} == {"pifa"} and len(rep.edits) == 14, str(rep)
    assert all(m.restore_order for m in model.modules() if isinstance(m, bdpass.PivotLinear))
    assert {s.kind for s in rep.skipped} == {"bd_qk", "bd_vo"} and all(s.reason for s in rep.skipped), str(rep)
    assert_side_by_side(original, model, args, kwargs, factor=max(1.5, stated_bound(model)))
    ids = args[0][:1, :6]
    ref = _generate(original, ids)
    assert torch.equal(_generate(model, ids), ref)


def test_gqa_llama_prepared_without_cache_generates_with_cache():
    """With a KV cache in the example run the backend must skip BD (the cache holds K/V
    that graph did not produce); a prepared model has no such problem: every cache entry is
    written by the same prepared V projection, and the folded O projection reads them. So a
    GQA decoder prepared on a cache-free run generates with the default cache, eager and
    under torch.compile (Inductor), the same greedy tokens as the original."""
    model, args, kwargs = build("llama", use_cache=False)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    rep = model.bdpass_report
    assert [e["kind"] for e in rep.edits] == ["bd_vo", "bd_vo"], str(rep)
    assert all(isinstance(layer.self_attn.v_proj, bdpass.BDLinear) for layer in model.model.layers)
    assert_side_by_side(original, model, args, kwargs)
    ids = args[0][:1, :6]
    ref = _generate(original, ids, use_cache=True)
    assert torch.equal(_generate(model, ids, use_cache=True), ref)
    assert torch.equal(_generate(model, ids, compiled=True, use_cache=True), ref)


def test_t5_generate():
    """Encoder-decoder with the default cache: the encoder's attention is rewritten (the
    decoder's K/V go to the cache and are skipped)."""
    import transformers
    import zoo

    _, _, kwargs = build("t5", use_cache=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = transformers.T5ForConditionalGeneration(zoo.config_for("t5", use_cache=True))
    zoo._rescale_init(lm, 0)
    lm.eval()
    original = copy.deepcopy(lm)
    bdpass.prepare(lm, **kwargs, options=ALL)
    rep = lm.bdpass_report
    assert rep.edits and all(e["site"].startswith("encoder.") for e in rep.edits), str(rep)
    assert_side_by_side(original, lm, (), kwargs)
    ids = kwargs["input_ids"][:1]
    ref = _generate(original, ids)
    assert torch.equal(_generate(lm, ids), ref)
    assert torch.equal(_generate(lm, ids, compiled=True), ref)


# ----------------------------------------------------------------------------- compilers
def test_inductor_keeps_the_custom_ops():
    from torch._inductor.utils import run_and_get_code

    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    ref = run(model, (x,))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", dynamic=True)
    with torch.no_grad():
        got, code = run_and_get_code(compiled, x)
    assert "bd_linear" in "\n".join(code)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        y = torch.randn(3, 7, 64)
        torch.testing.assert_close(compiled(y), run(model, (y,)), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_bd_backend_on_a_prepared_model_rewrites_nothing_more():
    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    ref = run(model, (x,))
    torch._dynamo.reset()
    with bdpass.collect_reports() as rep:
        got = run(torch.compile(model, backend="bd", options=ALL), (x,))
    torch._dynamo.reset()
    assert not rep.rewrites and rep.skipped, str(rep)
    torch.testing.assert_close(got, ref)


def test_export_save_load(tmp_path):
    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert not any("bdpass" in str(n.target) for n in ep.graph.nodes), "bd_linear decomposes under export"
    torch.export.save(ep, str(tmp_path / "block.pt2"))
    loaded = torch.export.load(str(tmp_path / "block.pt2")).module()
    for y in (x, torch.randn(5, 12, 64)):
        torch.testing.assert_close(run(loaded, (y,)), run(model, (y,)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_aoti_package_in_fresh_process(tmp_path):
    import os
    import subprocess
    import textwrap

    x = torch.randn(2, 12, 64)
    model = bdpass.prepare(_block(), x, options=ALL)
    ref = run(model, (x,))
    ep = torch.export.export(model, (x,))
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        f = torch._inductor.aoti_load_package({str(package)!r})
        with torch.no_grad():
            torch.save(f(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), ref, rtol=1e-5, atol=1e-5)


def test_prepare_applies_every_legal_rewrite_unless_timings_are_asked_for(monkeypatch):
    """prepare defaults to cost_model=False (the machine that prepares is seldom the one that
    serves): a tiny low-rank stack, which the cost model declines on any machine at this size
    (made certain here by a timing that says "slower"), is prepared all the same; with
    cost_model=True this machine's timing decides, and declines."""
    from bdpass import timing
    from lowrank_models import LowRankMLP

    def slower(device, problem, candidates, **kw):
        return timing.Measured({n: (1.0 if n == "original" else 2.0) for n in candidates},
                               {n: {"n": 10, "min": 1.0, "q25": 1.0, "median": 1.0} for n in candidates},
                               {n: timing.Verdict(0.5, 0.5, 0.5, "slower", None, 10)
                                for n in candidates if n != "original"})

    monkeypatch.setattr(timing, "measure", slower)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 64)
    default = bdpass.prepare(LowRankMLP(64, 32, 64).eval(), x, inplace=False)
    assert default.bdpass_report.edits and default.bdpass_report.bytes_after < default.bdpass_report.bytes_before
    timed = bdpass.prepare(LowRankMLP(64, 32, 64).eval(), x, inplace=False, options={"cost_model": True})
    assert not timed.bdpass_report.edits, str(timed.bdpass_report)
    assert any("cost model" in s.reason for s in timed.bdpass_report.skipped), str(timed.bdpass_report)
