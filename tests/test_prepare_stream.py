"""``bdpass prepare SRC DST``: a transformers checkpoint folder prepared block by block
(:func:`bdpass.prepare_folder`). The result equals preparing the same model in memory,
tensor for tensor; it loads with plain ``from_pretrained`` after ``import bdpass``; it
generates the original's greedy tokens with the default cache; one block of the layer stack
holds weights at a time."""
from __future__ import annotations

import copy
import os

import pytest
import torch

import bdpass
from bdpass import cli
from bdpass.prepare import stream
from helpers import first_tensor, rel_l2, to64
from test_hf_quantizer import LowRankLlama, assert_clean, generate, load
from zoo import build

transformers = pytest.importorskip("transformers")

ALL = {"cost_model": False}


def _example(config, tokens=16, seed=0):
    """The token ids prepare_folder feeds (batch 1, random ids of the vocabulary)."""
    return torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _check(original, path, tmp_path, cls=None, layers=3, **model_kwargs):
    """Prepare the saved ``path`` in memory and streamed; compare."""
    dst = tmp_path / "dst"
    blocks_live = []
    real = stream._prepare

    def counting(block, *a):
        model_blocks = [m for m in all_blocks if any(p.device.type != "meta" for p in m.parameters())]
        blocks_live.append(len(model_blocks))
        return real(block, *a)

    all_blocks = []
    real_layer_blocks = stream.layer_blocks

    def remember(model):
        out = real_layer_blocks(model)
        all_blocks.extend(m for _, m in out)
        return out

    stream._prepare, stream.layer_blocks = counting, remember
    try:
        rep = bdpass.prepare_folder(path, dst, ALL, model_class=cls, model_kwargs=model_kwargs or None)
    finally:
        stream._prepare, stream.layer_blocks = real, real_layer_blocks
    # one block's weights in the model at a time (the next block's tensors may be in memory, read
    # ahead, but not in the model)
    assert blocks_live == [1] * layers, blocks_live
    refits = [p for p, r in rep.blocks.items()
              if any((g.validation or "").startswith("shared with") for g in r.graphs)]
    assert refits, str(rep)
    prepared, messages = load(dst, cls, **model_kwargs)
    assert_clean(messages)
    loaded = (cls or transformers.AutoModelForCausalLM).from_pretrained(path, **model_kwargs).eval()
    ids = _example(loaded.config)
    memory = bdpass.prepare(loaded, ids, options=ALL, use_cache=False)
    _same_state(prepared.eval(), memory)
    x = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = first_tensor(copy.deepcopy(original).double()(to64(x)))
        e0 = rel_l2(first_tensor(original(x)), ref)
        e1 = rel_l2(first_tensor(prepared(x)), ref)
    assert e1 <= 1.5 * e0, (e1, e0)
    assert torch.equal(generate(prepared, x[:1]), generate(original, x[:1]))     # default cache
    return rep, prepared


def test_llama_folder(tmp_path):
    model, _, _ = build("llama", layers=3)
    model.save_pretrained(tmp_path / "src")
    rep, prepared = _check(model, tmp_path / "src", tmp_path)
    assert sum(isinstance(m, bdpass.BDLinear) for m in prepared.modules()) == 3
    assert rep.bytes_after < rep.bytes_before


def test_deepseek_v2_moe_folder_sharded(tmp_path):
    """MLA with mixture-of-experts blocks (a dense first block, then MoE: two kinds of block,
    each analysed once), from a sharded checkpoint whose experts are stored one by one."""
    model, _, _ = build("deepseek_v2", layers=3, experts_implementation="eager")
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert os.path.exists(tmp_path / "src" / "model.safetensors.index.json")
    rep, prepared = _check(model, tmp_path / "src", tmp_path, experts_implementation="eager")
    assert sum(isinstance(m, bdpass.BDLinear) for m in prepared.modules()) == 3


def test_lowrank_llama_folder_pifa(tmp_path):
    """A low-rank checkpoint of a custom class (every linear a rank-50% pair): PIFA."""
    base, _, _ = build("llama", layers=3)
    torch.manual_seed(0)
    model = LowRankLlama(base.config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
    model.save_pretrained(tmp_path / "src")
    rep, prepared = _check(model, tmp_path / "src", tmp_path, cls=LowRankLlama)
    assert sum(isinstance(m, bdpass.PivotLinear) for m in prepared.modules()) > 0


def test_cli_and_errors(tmp_path, capsys):
    model, _, _ = build("llama", layers=2)
    model.save_pretrained(tmp_path / "src")
    assert cli.main(["prepare", str(tmp_path / "src"), str(tmp_path / "dst"),
                     "--options", "share_analysis=false", "--tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "bdpass prepare: 2 blocks" in out and "(refit)" not in out
    assert cli.main(["prepare", str(tmp_path / "src"), str(tmp_path / "dst")]) == 2     # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["prepare", str(tmp_path / "empty"), str(tmp_path / "dst2")]) == 2
    assert "holds no config.json" in capsys.readouterr().err and not (tmp_path / "dst2").exists()


def test_loader_falls_back_to_names(tmp_path, monkeypatch):
    """Where transformers' private checkpoint loader does not take the call, tensors load by
    name: a checkpoint whose names are the model's (llama) still prepares, bit for bit."""
    import transformers.core_model_loading as cml

    def moved(*a, **k):
        raise TypeError("signature moved")

    model, _, _ = build("llama", layers=2)
    model.save_pretrained(tmp_path / "src")
    ref = bdpass.prepare_folder(tmp_path / "src", tmp_path / "ref", ALL)
    monkeypatch.setattr(cml, "convert_and_load_state_dict_in_model", moved)
    rep = bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL)
    assert [len(r.edits) for r in rep.blocks.values()] == [len(r.edits) for r in ref.blocks.values()]
    from safetensors.torch import load_file

    for f in os.listdir(tmp_path / "ref"):
        if f.endswith(".safetensors"):
            a, b = load_file(tmp_path / "ref" / f), load_file(tmp_path / "dst" / f)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


@pytest.mark.parametrize("family", ["llama", "deepseek_v2"])
def test_bfloat16_folders(family, tmp_path):
    """A bfloat16 checkpoint is prepared in bfloat16 (its own dtype) and still equals the
    in-memory preparation, within 1.5x of the original's error and with its greedy tokens."""
    kw = {"experts_implementation": "eager"} if family == "deepseek_v2" else {}
    model, _, _ = build(family, layers=3, dtype=torch.bfloat16, **kw)
    model.save_pretrained(tmp_path / "src")
    _, prepared = _check(model, tmp_path / "src", tmp_path, **kw)
    assert prepared.dtype == torch.bfloat16
