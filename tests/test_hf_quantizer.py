"""Prepared checkpoints load through transformers' own ``from_pretrained``: bdpass is a
transformers quantization method (``"quant_method": "bdpass"`` in ``config.json``), so
``import bdpass; AutoModelForCausalLM.from_pretrained(dir)`` builds the prepared modules on
the empty skeleton and loads the checkpoint's factors straight into them: nothing
factorized, no missing or unexpected keys, the same logits as the prepared model and the
same greedy tokens as the original. ``bdpass.from_pretrained`` is that call, and also loads
folders whose plan is only in ``config.bdpass``."""
from __future__ import annotations

import copy
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import bdpass
from bdpass.prepare import hf_quantizer
from helpers import first_tensor
from lowrank_models import random_linears, to_pairs
from zoo import build

transformers = pytest.importorskip("transformers")

ALL = {"cost_model": False}   # every legal rewrite, whatever the machine's timing says
PREPARED = (bdpass.BDLinear, bdpass.PivotLinear, bdpass.Absorbed)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(model, args, kwargs=None):
    with torch.no_grad():
        return first_tensor(model(*args, **(kwargs or {})))


def generate(model, ids, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, **kw)


class LoadLog(logging.Handler):
    """transformers' warnings while loading (its load report, unknown quantization types)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_warning()
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        from transformers.utils import logging as hf_logging

        logging.getLogger("transformers").removeHandler(self)
        hf_logging.set_verbosity(self._level)


def no_factorization(monkeypatch):
    """From now on the backend's analysis and any matrix factorization raise."""
    import bdpass.backend
    import bdpass.prepare.apply

    def forbidden(*a, **k):
        raise AssertionError("a factorization was computed")

    for name in ("rewrite_graph", "plan_decisions", "decide_graph", "refit_graph"):
        monkeypatch.setattr(bdpass.backend, name, forbidden)
    for name in ("decide_graph", "refit_graph"):
        monkeypatch.setattr(bdpass.prepare.apply, name, forbidden)
    for name in ("qr", "svd", "solve", "inv", "lstsq", "lu_factor"):
        monkeypatch.setattr(torch.linalg, name, forbidden)


def load(path, cls=None, **kwargs):
    """Plain transformers, with its warnings recorded."""
    with LoadLog() as log:
        model = (cls or transformers.AutoModelForCausalLM).from_pretrained(path, **kwargs)
    return model, log.messages


def assert_clean(messages):
    assert not [m for m in messages if "MISSING" in m or "UNEXPECTED" in m or "MISMATCH" in m
                or "Unknown quantization" in m], messages


def prepared_types(model):
    return {path: type(m).__name__ for path, m in model.named_modules() if isinstance(m, PREPARED)}


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """GQA llama prepared on a cache-free run (BD: every layer's v_proj -> BDLinear), saved."""
    model, args, kwargs = build("llama", use_cache=False)
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    assert [e["kind"] for e in model.bdpass_report.edits] == ["bd_vo", "bd_vo"], str(model.bdpass_report)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return original, model, args, path


class LowRankLlama(transformers.LlamaForCausalLM):
    """A llama whose attention and MLP linears are rank-50% pairs ``u_proj(v_proj(x))``
    (SVD-LLM's spelling): a custom architecture, loaded through its class."""

    def __init__(self, config):
        super().__init__(config)
        to_pairs(self.model.layers)


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """The low-rank llama prepared with the default cache (PIFA: every pair -> PivotLinear +
    Absorbed), saved."""
    base, args, kwargs = build("llama", use_cache=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LowRankLlama(base.config).eval()
    random_linears(model)
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    assert {e["kind"] for e in model.bdpass_report.edits} == {"pifa"}, str(model.bdpass_report)
    path = tmp_path_factory.mktemp("lowrank")
    model.save_pretrained(path)
    return original, model, args, path


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """DeepSeek-V2 (MLA, MoE), default cache (every layer's kv_b_proj -> BDLinear), saved
    sharded."""
    model, args, kwargs = build("deepseek_v2", use_cache=True, experts_implementation="eager")
    original = copy.deepcopy(model)
    bdpass.prepare(model, *args, options=ALL, **kwargs)
    path = tmp_path_factory.mktemp("deepseek")
    model.save_pretrained(path, max_shard_size="100KB")
    return original, model, args, kwargs, path


# ----------------------------------------------------------------------------- the config
def test_registered_and_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert hf_quantizer.register() and hf_quantizer.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["bdpass"] is hf_quantizer.BDPassConfig
    assert AUTO_QUANTIZER_MAPPING["bdpass"] is hf_quantizer.BDPassHfQuantizer


def test_config_carries_the_plan(llama):
    _, model, _, path = llama
    plan = bdpass.plan_of(model)
    assert isinstance(model.config.quantization_config, hf_quantizer.BDPassConfig)
    assert model.config.quantization_config.plan == plan
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "bdpass", "plan": plan}
    assert cfg["bdpass"] == plan          # the copy earlier bdpass versions read
    assert bdpass.prepare.read_plan(path) == plan


# ----------------------------------------------------------------------------- loading
def test_llama_loads_with_transformers(llama, monkeypatch):
    original, model, args, path = llama
    no_factorization(monkeypatch)
    loaded, messages = load(path)
    assert_clean(messages)
    assert prepared_types(loaded) == prepared_types(model)
    assert all(isinstance(layer.self_attn.v_proj, bdpass.BDLinear) for layer in loaded.model.layers)
    assert torch.equal(run(loaded, args), run(model, args))
    assert bdpass.prepare.state_bytes(loaded) == bdpass.prepare.state_bytes(model)
    ids = args[0][:1, :6]
    assert torch.equal(generate(loaded, ids, use_cache=True), generate(original, ids, use_cache=True))
    assert loaded.config.quantization_config.plan == bdpass.plan_of(model)
    assert loaded.config.bdpass == bdpass.plan_of(model)


def test_dtype_kwarg(llama, monkeypatch):
    _, model, args, path = llama
    no_factorization(monkeypatch)
    loaded, messages = load(path, dtype=torch.bfloat16)
    assert_clean(messages)
    v = loaded.model.layers[0].self_attn.v_proj
    assert isinstance(v, bdpass.BDLinear) and v.weight_0.dtype == torch.bfloat16 and v.rest_0.dtype == torch.int64
    cast = copy.deepcopy(model).to(torch.bfloat16)
    mine, theirs = loaded.state_dict(), cast.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():   # from_pretrained keeps the rotary frequencies in float32, .to() casts them
        for name, buf in loaded.named_buffers():
            if name not in mine:
                cast.get_buffer(name).data = buf.clone()
    assert torch.equal(run(loaded, args), run(cast, args))
    assert loaded.half() is loaded           # casts like the model that was prepared


def test_resave_loaded_model(llama, tmp_path):
    _, model, args, path = llama
    loaded, _ = load(path)
    loaded.save_pretrained(tmp_path)
    again, messages = load(tmp_path)
    assert_clean(messages)
    assert torch.equal(run(again, args), run(model, args))


def test_lowrank_llama_pifa_loads_with_transformers(lowrank, monkeypatch):
    original, model, args, path = lowrank
    no_factorization(monkeypatch)
    loaded, messages = load(path, cls=LowRankLlama)
    assert_clean(messages)
    types = prepared_types(loaded)
    assert types == prepared_types(model) and set(types.values()) == {"PivotLinear", "Absorbed"}
    assert torch.equal(run(loaded, args), run(model, args))
    ids = args[0][:1, :6]
    assert torch.equal(generate(loaded, ids), generate(original, ids))


def test_deepseek_v2_sharded_loads_with_transformers(deepseek, monkeypatch):
    original, model, args, kwargs, path = deepseek
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert any(k.endswith("kv_b_proj.weight_0") for k in index["weight_map"])
    no_factorization(monkeypatch)
    loaded, messages = load(path, experts_implementation="eager")
    assert_clean(messages)
    assert all(isinstance(layer.self_attn.kv_b_proj, bdpass.BDLinear) for layer in loaded.model.layers)
    assert torch.equal(run(loaded, args, kwargs), run(model, args, kwargs))
    ids = args[0][:1]
    assert torch.equal(generate(loaded, ids), generate(original, ids))


def test_base_model_from_head_checkpoint(llama):
    """``AutoModel`` (no LM head) from the causal-LM checkpoint: the plan's paths lose the
    ``model.`` prefix like the weights do."""
    _, model, args, path = llama
    base, messages = load(path, cls=transformers.AutoModel)
    assert not [m for m in messages if "MISSING" in m or "MISMATCH" in m], messages
    assert isinstance(base.layers[0].self_attn.v_proj, bdpass.BDLinear)
    with torch.no_grad():
        assert torch.equal(base(*args).last_hidden_state, model.model(*args).last_hidden_state)
    assert all(not p.startswith("model.") for p in base.config.quantization_config.plan["modules"])


def test_missing_factor_is_an_error(llama, tmp_path):
    """A checkpoint without one of the prepared tensors does not load (transformers would
    leave it uninitialized)."""
    from safetensors.torch import load_file, save_file

    _, _, _, path = llama
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.self_attn.v_proj.weight_0"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks the prepared tensors.*layers\.1\.self_attn\.v_proj\.weight_0"):
        load(tmp_path)


# ----------------------------------------------------------------------------- bdpass.from_pretrained
def _copy_with_config(src, dst, edit):
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))


def test_bdpass_from_pretrained_both_formats(llama, tmp_path, monkeypatch):
    _, model, args, path = llama
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    new.mkdir()
    _copy_with_config(path, old, lambda c: c.pop("quantization_config"))    # saved by bdpass <= 0.1.0
    _copy_with_config(path, new, lambda c: c.pop("bdpass"))                 # the plan only where transformers reads it
    no_factorization(monkeypatch)
    for folder in (path, old, new):
        with LoadLog() as log:
            loaded = bdpass.from_pretrained(transformers.AutoModelForCausalLM, folder)
        assert_clean(log.messages)
        assert isinstance(loaded.model.layers[0].self_attn.v_proj, bdpass.BDLinear), folder
        assert torch.equal(run(loaded, args), run(model, args)), folder
        assert loaded.config.quantization_config.plan == bdpass.plan_of(model)
    plain, _ = load(new)                        # transformers alone reads the new format
    assert torch.equal(run(plain, args), run(model, args))
    loaded = bdpass.from_pretrained(transformers.AutoModelForCausalLM, old, dtype=torch.bfloat16)
    assert loaded.model.layers[0].self_attn.v_proj.weight_0.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- without bdpass
def _python(code):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_import_bdpass_then_transformers(llama):
    """The user's process: ``import bdpass`` (which does not import transformers'
    quantizers), then transformers' from_pretrained, which registers bdpass as it imports
    them."""
    _, model, args, path = llama
    from safetensors.torch import save_file

    ref = path.parent / "llama_expected.safetensors"
    save_file({"ids": args[0], "logits": run(model, args)}, str(ref))
    r = _python(f"""
import sys, torch
import bdpass
assert "transformers.quantizers.auto" not in sys.modules
import transformers
from safetensors.torch import load_file
m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r})
ref = load_file({str(ref)!r})
with torch.no_grad():
    assert torch.equal(m(ref["ids"]).logits, ref["logits"])
print("OK", type(m.model.layers[0].self_attn.v_proj).__name__)
""")
    assert r.returncode == 0 and "OK BDLinear" in r.stdout, (r.stdout, r.stderr[-3000:])


# a row of transformers' load report: the replaced weight against the checkpoint's marker
MISMATCH_ROW = re.compile(r"v_proj\.weight\s*\|\s*MISMATCH\s*\|\s*Reinit due to size mismatch - ckpt: "
                          r"torch\.Size\(\[0\]\)")


def _load_without_bdpass(path, **kwargs):
    """A process that never imports bdpass loads the prepared folder ``path`` (a wide
    terminal for transformers' load report)."""
    return _python(f"""
import os
os.environ["COLUMNS"] = "200"
import sys, transformers
try:
    m = transformers.AutoModelForCausalLM.from_pretrained({str(path)!r}, **{kwargs!r})
except Exception as e:
    print("ERROR", type(e).__name__, e)
    sys.exit(3)
assert "bdpass" not in sys.modules
print("LOADED", type(m.model.layers[0].self_attn.v_proj).__name__)
""")


@pytest.fixture(scope="module")
def without_bdpass(llama):
    _, _, _, path = llama
    return _load_without_bdpass(path)


def test_without_import_bdpass_transformers_warns(without_bdpass):
    """What transformers 5.25 does with a quantization method it does not know: it says so,
    skips it, and its load report shows each replaced weight as a size mismatch against the
    prepared module's zero-element marker (and the factors as unexpected)."""
    r = without_bdpass
    assert "Unknown quantization type, got bdpass" in r.stderr, r.stderr[-3000:]
    assert MISMATCH_ROW.search(r.stderr), r.stderr[-3000:]
    assert "UNEXPECTED" in r.stderr, r.stderr[-3000:]


def test_without_import_bdpass_loading_fails(without_bdpass):
    """Never a model with random weights: the load fails (transformers' own message; the
    docs say that it means ``import bdpass``)."""
    r = without_bdpass
    assert r.returncode == 3, (r.stdout, r.stderr[-3000:])
    assert ("ERROR RuntimeError You set `ignore_mismatched_sizes` to `False`, thus raising an error. For details look "
            "at the above report!") in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "LOADED" not in r.stdout


def test_without_import_bdpass_ignore_mismatched_sizes(llama):
    """``ignore_mismatched_sizes=True`` without bdpass: transformers loads the original
    architecture with the replaced weights reinitialized, and says so loudly (the unknown
    method and the MISMATCH rows of its load report, as warnings). Documented as garbage."""
    _, _, _, path = llama
    r = _load_without_bdpass(path, ignore_mismatched_sizes=True)
    assert r.returncode == 0 and "LOADED Linear" in r.stdout, (r.stdout, r.stderr[-3000:])
    assert "Unknown quantization type, got bdpass" in r.stderr, r.stderr[-3000:]
    assert MISMATCH_ROW.search(r.stderr), r.stderr[-3000:]


def test_checkpoint_holds_markers_not_weights(llama, deepseek):
    """Under each replaced weight's name the checkpoint holds the zero-element marker."""
    from safetensors import safe_open

    for path, ends in ((llama[3], "v_proj.weight"), (deepseek[4], "kv_b_proj.weight")):
        shapes = {}
        for f in path.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as h:
                shapes.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})
        replaced = {k: v for k, v in shapes.items() if k.endswith(ends)}
        assert replaced and all(v == [0] for v in replaced.values()), replaced


def test_checkpoint_without_markers_loads(llama, tmp_path):
    """A folder saved before the markers existed loads cleanly: a marker holds no value."""
    from safetensors.torch import load_file, save_file

    _, model, args, path = llama
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    state = load_file(str(tmp_path / "model.safetensors"))
    old = {k: v for k, v in state.items() if not k.endswith("v_proj.weight")}
    assert len(old) == len(state) - 2
    save_file(old, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, messages = load(tmp_path)
    assert_clean(messages)
    v = loaded.model.layers[0].self_attn.v_proj
    assert v.weight.shape == (0,) and v.weight.device.type == "cpu"
    assert torch.equal(run(loaded, args), run(model, args))


def test_bdpass_imports_without_transformers():
    r = _python("""
import sys

sys.modules["transformers"] = None          # as if not installed: every import of it fails
import bdpass
from bdpass.prepare import hf_quantizer
assert not hf_quantizer.available() and hf_quantizer.register() is False
assert sys.modules["transformers"] is None
print("OK")
""")
    assert r.returncode == 0 and "OK" in r.stdout, (r.stdout, r.stderr[-3000:])
