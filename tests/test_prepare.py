"""bdpass.prepare: a factorized module that saves, loads, exports, compiles and packages
with the ecosystem's own tools (safetensors, torch.export, Inductor, AOTInductor)."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
import weakref

import pytest
import torch
import torch.nn as nn

import bdpass
from attention_models import MHA
from helpers import first_tensor, rel_l2
from lowrank_models import LowRankMLP
from zoo import build

ALL = {"cost_model": False}   # every legal rewrite, whatever the roofline says


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each tensor counted once (tied weights)."""
    seen = {}
    for t in module.state_dict().values():
        seen[(t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())] = t.numel() * t.element_size()
    return sum(seen.values())


def assert_same_outputs(got, ref, rtol=1e-4):
    g, r = first_tensor(got), first_tensor(ref)
    assert g.shape == r.shape and g.dtype == r.dtype
    assert rel_l2(g, r) <= rtol, rel_l2(g, r)
    torch.testing.assert_close(g, r, rtol=rtol, atol=rtol * float(r.abs().max()))


def run(module, args, kwargs=None):
    with torch.no_grad():
        return module(*args, **(kwargs or {}))


def forbid_factorization(monkeypatch):
    """From now on any factorization raises: loading must take every derived tensor from the file."""
    import bdpass.identities
    import bdpass.rewrites.bd_attention
    import bdpass.rewrites.pifa

    def forbidden(*a, **k):
        raise AssertionError("a factorization was computed")

    for mod in (bdpass.identities, bdpass.rewrites.pifa, bdpass.rewrites.bd_attention):
        for name in ("pifa_factors", "bd_factors"):
            monkeypatch.setattr(mod, name, forbidden, raising=False)
    for sub in ("pifa", "bd"):
        m = sys.modules.get(f"bdpass.identities.{sub}")
        if m is not None:
            monkeypatch.setattr(m, f"{sub}_factors", forbidden, raising=False)


@pytest.fixture
def no_factorization(monkeypatch):
    forbid_factorization(monkeypatch)


class Block(nn.Module):
    """Attention (BD) followed by an MLP of two low-rank chains (PIFA)."""

    def __init__(self):
        super().__init__()
        self.attn = MHA(d=64, heads=4, head_dim=16)
        self.mlp = LowRankMLP(64, 16, 128)

    def forward(self, x):
        return self.mlp(x + self.attn(x))


class Breaks(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        y = self.lin(x)
        if float(y.sum()) > 0:      # data-dependent control flow: a graph break
            return y
        return -y


# ----------------------------------------------------------------------------- small models
@pytest.mark.parametrize("name", ["lowrank", "mha"])
def test_small_models(name):
    torch.manual_seed(0)
    model = (LowRankMLP(64, 16, 128) if name == "lowrank" else MHA()).eval()
    x = torch.randn(2, 12, 64)
    prepared = bdpass.prepare(model, x, options=ALL)
    assert isinstance(prepared, bdpass.PreparedModule)
    kinds = {r.kind for r in prepared.report.rewrites}
    assert kinds == ({"pifa"} if name == "lowrank" else {"bd_qk", "bd_vo"}), str(prepared.report)
    assert_same_outputs(run(prepared, (x,)), run(model, (x,)))
    assert state_bytes(prepared) < state_bytes(model)
    keys = set(prepared.state_dict())
    replaced = {"up.v_proj.weight", "up.u_proj.weight"} if name == "lowrank" else {"q_proj.weight", "o_proj.weight"}
    assert not keys & replaced, keys
    assert prepared.derived_names and all(k.startswith("derived.") for k in prepared.derived_names)
    for k, t in prepared.named_parameters():
        assert t.is_floating_point() and not t.requires_grad, k
    for k, t in prepared.named_buffers():
        assert not t.is_floating_point(), k      # index tensors are buffers
    # the model itself is untouched
    assert {k for k, _ in model.named_parameters()} >= replaced


def test_replaced_weights_are_released():
    torch.manual_seed(0)
    model = LowRankMLP(64, 16, 128).eval()
    gone = weakref.ref(model.up.v_proj.weight)
    prepared = bdpass.prepare(model, torch.randn(2, 12, 64), options=ALL)
    del model
    gc.collect()
    assert gone() is None, "the prepared module (or bdpass) still references a replaced weight"
    assert prepared.norm.weight.shape == (64,)


def test_call_forms_and_static_shapes():
    torch.manual_seed(0)
    model = MHA().eval()
    x = torch.randn(2, 12, 64)
    prepared = bdpass.prepare(model, x, options=ALL)
    ref = run(prepared, (x,))
    torch.testing.assert_close(run(prepared, (), {"x": x}), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="static shapes"):
        run(prepared, (torch.randn(2, 7, 64),))
    with pytest.raises(ValueError, match="not given in the example call"):
        run(prepared, (x,), {"kv": x})
    prepared.flat_output = True
    out = run(prepared, (x,))
    assert isinstance(out, tuple) and torch.equal(out[0], ref)


def test_verify_option_and_fullgraph_error():
    torch.manual_seed(0)
    model = LowRankMLP(64, 16, 128).eval()
    bdpass.prepare(model, torch.randn(3, 64), options={**ALL, "verify": True})
    with pytest.raises(RuntimeError, match="single graph"):
        bdpass.prepare(Breaks().eval(), torch.randn(2, 8))
    with pytest.raises(ValueError, match="unknown option"):
        bdpass.prepare(model, torch.randn(3, 64), options={"nope": 1})


def test_small_model_save_load(tmp_path, monkeypatch):
    x = torch.randn(2, 12, 64)
    prepared = _prepared_block()
    assert {r.kind for r in prepared.report.rewrites} == {"pifa", "bd_qk", "bd_vo"}, str(prepared.report)
    forbid_factorization(monkeypatch)
    path = tmp_path / "block.safetensors"
    bdpass.save_prepared(prepared, path)
    torch.manual_seed(123)
    fresh = Block().eval()          # same architecture, other weights
    loaded = bdpass.load_prepared(fresh, path, x)
    assert torch.equal(run(loaded, (x,)), run(prepared, (x,)))
    assert not torch.allclose(run(fresh, (x,)), run(loaded, (x,)))


class ClashingNames(nn.Module):
    """Submodules named like the prepared module's own attributes."""

    def __init__(self):
        super().__init__()
        self.report = nn.LayerNorm(32)
        self.derived = LowRankMLP(32, 8, 64)

    def forward(self, x):
        return self.derived(self.report(x))


def test_names_that_clash_with_prepared_module_attributes(tmp_path):
    torch.manual_seed(0)
    model = ClashingNames().eval()
    x = torch.randn(3, 32)
    prepared = bdpass.prepare(model, x, options=ALL)
    assert isinstance(prepared.report, bdpass.Report) and prepared.report.rewrites
    keys = set(prepared.state_dict())
    assert {"weights.report.weight", "weights.derived.norm.weight"} <= keys, keys
    assert_same_outputs(run(prepared, (x,)), run(model, (x,)))
    bdpass.save_prepared(prepared, tmp_path / "c.safetensors")
    loaded = bdpass.load_prepared(ClashingNames().eval(), tmp_path / "c.safetensors", x)
    assert torch.equal(run(loaded, (x,)), run(prepared, (x,)))


def _prepared_block():
    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 12, 64)
    return bdpass.prepare(model, x, options=ALL)


# ----------------------------------------------------------------------------- transformers
@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    model, args, kwargs = build("gpt2")
    t0 = time.perf_counter()
    prepared = bdpass.prepare(model, *args, options=ALL, **kwargs)
    seconds = time.perf_counter() - t0
    path = tmp_path_factory.mktemp("gpt2") / "gpt2.safetensors"
    bdpass.save_prepared(prepared, path)
    return model, args, kwargs, prepared, path, seconds


def test_gpt2_prepared(gpt2):
    model, args, kwargs, prepared, _, seconds = gpt2
    assert seconds < 30
    assert {r.kind for r in prepared.report.rewrites} == {"bd_qk", "bd_vo"}, str(prepared.report)
    ref, got = run(model, args, kwargs), run(prepared, args, kwargs)
    assert type(got) is type(ref)       # the ModelOutput is rebuilt
    assert_same_outputs(got.logits, ref.logits)
    assert state_bytes(prepared) < state_bytes(model)
    assert "transformer.h.0.attn.c_attn.weight" not in prepared.state_dict()
    assert "transformer.h.0.mlp.c_fc.weight" in prepared.state_dict()
    # the same call by keyword
    torch.testing.assert_close(run(prepared, (), {"input_ids": args[0]}).logits, got.logits, rtol=0, atol=0)


def test_gpt2_file_contents(gpt2):
    from safetensors import safe_open

    _, _, _, prepared, path, _ = gpt2
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == set(prepared.state_dict())
    assert meta["format"] == "bdpass.prepared/1"
    assert meta["bdpass_version"] == bdpass.__version__
    report = bdpass.Report.from_json(meta["report"])
    assert report.to_dict() == prepared.report.to_dict()
    info = json.loads(meta["tensors"])
    assert set(info) == keys
    for k, t in prepared.state_dict().items():
        assert info[k]["shape"] == list(t.shape) and info[k]["dtype"] == str(t.dtype).replace("torch.", "")
    assert {v["role"] for v in info.values()} == {"original", "derived"}
    pivots = [k for k, v in info.items() if v["dtype"] == "int64"]
    assert pivots and all(info[k]["role"] == "derived" for k in pivots)


def test_gpt2_load_without_factorizing(gpt2, no_factorization):
    _, args, kwargs, prepared, path, _ = gpt2
    fresh, _, _ = build("gpt2", seed=1)           # same config, other random weights
    loaded = bdpass.load_prepared(fresh, path, *args, **kwargs)
    got, ref = run(loaded, args, kwargs), run(prepared, args, kwargs)
    assert torch.equal(got.logits, ref.logits)
    assert not torch.allclose(run(fresh, args, kwargs).logits, got.logits)
    assert loaded.report.to_dict() == prepared.report.to_dict()
    assert "Rewrites" in str(loaded.report)
    assert state_bytes(loaded) == state_bytes(prepared)
    # the example call may be spelled by keyword
    again = bdpass.load_prepared(fresh, path, input_ids=args[0])
    assert torch.equal(run(again, args, kwargs).logits, ref.logits)


@pytest.mark.parametrize("override, names", [
    ({"n_embd": 128}, "transformer.wte.weight"),
    ({"n_head": 8}, "view"),
])
def test_gpt2_load_refuses_other_architectures(gpt2, no_factorization, override, names):
    _, args, kwargs, _, path, _ = gpt2
    other, _, _ = build("gpt2", **override)
    with pytest.raises(ValueError, match=f"load_prepared: tensor '{names}[^']*'.*expects") as e:
        bdpass.load_prepared(other, path, *args, **kwargs)
    assert "different architecture" in str(e.value)


def test_load_refuses_other_input_shapes_and_files(gpt2, tmp_path):
    model, args, kwargs, _, path, _ = gpt2
    with pytest.raises(ValueError, match=r"input args\[0\]"):
        bdpass.load_prepared(model, path, args[0][:, :7])
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="not a bdpass prepared-module file"):
        bdpass.load_prepared(model, plain, *args)


def test_gpt2_export_save_load(gpt2, tmp_path):
    _, args, kwargs, prepared, _, _ = gpt2
    ep = torch.export.export(prepared, args, kwargs)
    target = tmp_path / "gpt2.pt2"
    torch.export.save(ep, str(target))
    loaded = torch.export.load(str(target))
    got = run(loaded.module(), args, kwargs)
    torch.testing.assert_close(first_tensor(got), run(prepared, args, kwargs).logits, rtol=1e-5, atol=1e-5)


def test_deepseek_v2_prepared(tmp_path, monkeypatch):
    model, args, kwargs = build("deepseek_v2", experts_implementation="batched_mm")
    prepared = bdpass.prepare(model, *args, options=ALL, **kwargs)
    assert {r.kind for r in prepared.report.rewrites} >= {"bd_vo"}, str(prepared.report)
    ref, got = run(model, args, kwargs), run(prepared, args, kwargs)
    assert type(got) is type(ref)
    assert_same_outputs(got.logits, ref.logits)
    assert state_bytes(prepared) < state_bytes(model)
    path = tmp_path / "dsv2.safetensors"
    bdpass.save_prepared(prepared, path)
    forbid_factorization(monkeypatch)
    fresh, _, _ = build("deepseek_v2", seed=2, experts_implementation="batched_mm")
    loaded = bdpass.load_prepared(fresh, path, *args, **kwargs)
    assert torch.equal(run(loaded, args, kwargs).logits, got.logits)


# ----------------------------------------------------------------------------- compilers
def test_inductor_compiles_prepared_module():
    x = torch.randn(2, 12, 64)
    prepared = _prepared_block()
    ref = run(prepared, (x,))
    compiled = torch.compile(prepared, backend="inductor")
    assert_same_outputs(run(compiled, (x,)), ref, rtol=1e-5)


def test_aoti_package_in_fresh_process(tmp_path):
    x = torch.randn(2, 12, 64)
    prepared = _prepared_block()
    ref = run(prepared, (x,))
    ep = torch.export.export(prepared, (x,))
    t0 = time.perf_counter()
    package = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "block.pt2"))
    print(f"AOTInductor packaging took {time.perf_counter() - t0:.1f} s")
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch
        f = torch._inductor.aoti_load_package({str(package)!r})
        x = torch.load({str(tmp_path / 'x.pt')!r})
        with torch.no_grad():
            torch.save(f(x), {str(tmp_path / 'y.pt')!r})
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ""})
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
    got = torch.load(tmp_path / "y.pt")
    assert_same_outputs(got, ref, rtol=1e-5)
