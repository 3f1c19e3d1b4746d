"""``bdpass prepare SRC DST``: a transformers checkpoint folder prepared block by block
(:func:`bdpass.prepare_folder`). The result equals preparing the same model in memory,
tensor for tensor; it loads with plain ``from_pretrained`` after ``import bdpass``; it
generates the original's greedy tokens with the default cache; one block of the layer stack
holds weights at a time."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

import bdpass
from bdpass import cli
from bdpass.prepare import stream
from helpers import first_tensor, rel_l2, to64
from lowrank_models import random_linears, to_pairs
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

    def counting(block, *a, **kw):
        model_blocks = [m for m in all_blocks if any(p.device.type != "meta" for p in m.parameters())]
        blocks_live.append(len(model_blocks))
        return real(block, *a, **kw)

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
    model = random_linears(LowRankLlama(base.config).eval())
    model.save_pretrained(tmp_path / "src")
    rep, prepared = _check(model, tmp_path / "src", tmp_path, cls=LowRankLlama)
    assert sum(isinstance(m, bdpass.PivotLinear) for m in prepared.modules()) > 0


class HalfLowRankLlama(transformers.LlamaForCausalLM):
    """Its first block is a plain Llama block (BD on a cache-free run), the others rank-50%
    pairs (PIFA): two kinds of block whose rewrites touch tensors of different names."""

    def __init__(self, config):
        super().__init__(config)
        to_pairs(self.model.layers[1:])


def test_kinds_with_different_rewrites(tmp_path):
    """A BD block, then PIFA blocks: the copies queued ahead for the later blocks on the first
    kind's names are a wrong guess, copied again once their own kind is known; the folder
    equals the in-memory preparation."""
    base, _, _ = build("llama", layers=4)
    torch.manual_seed(0)
    model = random_linears(HalfLowRankLlama(base.config).eval())
    model.save_pretrained(tmp_path / "src")
    rep, prepared = _check(model, tmp_path / "src", tmp_path, cls=HalfLowRankLlama, layers=4)
    kinds = [{e["kind"] for e in r.edits} for r in rep.blocks.values()]
    assert kinds[0] and "pifa" not in kinds[0] and all(k == {"pifa"} for k in kinds[1:]), kinds
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


def test_later_blocks_read_only_what_their_rewrites_need(tmp_path):
    """A block of a kind already prepared reads only the tensors its kind's rewrites read or
    change; the rest of the checkpoint is copied by the kernel, byte for byte, under its
    checkpoint names (per-expert tensors stay per expert)."""
    from safetensors import safe_open

    model, _, _ = build("deepseek_v2", layers=4, experts_implementation="eager")
    model.save_pretrained(tmp_path / "src", max_shard_size="200KB")
    rep = bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL,
                                model_kwargs={"experts_implementation": "eager"})
    files = stream.Folder(str(tmp_path / "src"))
    total = files.nbytes(files.names())
    layer3 = [n for n in files.names() if n.startswith("model.layers.3.")]
    read3 = [n for n in layer3 if "self_attn" in n]
    # the first two blocks (a dense one, the first MoE one) and the tensors the head needs are read;
    # of blocks 2 and 3 only their attention's rewritten weights
    assert rep.read_bytes < 0.8 * total, (rep.read_bytes, total)
    assert rep.copied_bytes >= total - rep.read_bytes
    assert not rep.reread
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())["weight_map"]
    experts = [n for n in layer3 if ".experts." in n]
    assert experts and all(n in index for n in experts)          # copied as the checkpoint names them
    for n in experts + [n for n in layer3 if n not in read3]:
        with safe_open(tmp_path / "dst" / index[n], "pt") as f, safe_open(
                tmp_path / "src" / files.where[n], "pt") as g:
            assert torch.equal(f.get_tensor(n), g.get_tensor(n)), n
    # the rewritten attention's tensors come from memory, into the block's own file
    made = [n for n in index if n.startswith("model.layers.3.self_attn.kv_b_proj.")]
    assert len(made) > 1 and {index[n] for n in made} == {"model-model-layers-3.safetensors"}
    prepared, messages = load(tmp_path / "dst", experts_implementation="eager")
    assert_clean(messages)


class ScaledLastLlama(transformers.LlamaForCausalLM):
    """Its last block's attention scales its scores differently: the same parameters as the
    others, another graph (Dynamo specializes the attribute)."""

    def __init__(self, config):
        super().__init__(config)
        self.model.layers[-1].self_attn.scaling *= 0.5


def test_a_block_that_runs_another_graph_reads_all_its_weights(tmp_path, caplog):
    """A block alike in its parameters to a kind already prepared, but running another graph,
    is noticed (the analysis would see stand-ins) and prepared again with all its weights;
    the result still equals the in-memory preparation."""
    base, _, _ = build("llama", layers=3)
    torch.manual_seed(0)
    model = ScaledLastLlama(base.config).eval()
    model.load_state_dict(base.state_dict())
    model.save_pretrained(tmp_path / "src")
    with caplog.at_level("INFO", logger="bdpass"):
        rep = bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL, model_class=ScaledLastLlama)
    assert list(rep.reread) == ["model.layers.2"], str(rep)
    assert "afresh" in rep.reread["model.layers.2"]
    assert "model.layers.2: graph" in caplog.text and "reading all its weights" in caplog.text
    prepared, messages = load(tmp_path / "dst", ScaledLastLlama)
    assert_clean(messages)
    loaded = ScaledLastLlama.from_pretrained(tmp_path / "src").eval()
    memory = bdpass.prepare(loaded, _example(loaded.config), options=ALL, use_cache=False)
    _same_state(prepared.eval(), memory)


def test_a_rewrite_reading_a_stand_in_reads_all_weights(tmp_path, monkeypatch):
    """If a kind's record of what its rewrites read missed a tensor, the refit would read a
    stand-in (another layer's values): it is refused before anything is edited, the block
    reads all its weights and is prepared again, and the files are those of a run without
    the fault."""
    model, _, _ = build("llama", layers=3)
    model.save_pretrained(tmp_path / "src")
    ref = bdpass.prepare_folder(tmp_path / "src", tmp_path / "ref", ALL)
    assert not ref.reread

    class Forgetful(stream._Kind):
        def __init__(self, real, keep, requires_grad):
            lost = sorted(n for n in real if n.endswith("v_proj.weight"))[0]
            keep = dict(keep, **{lost: torch.zeros_like(keep[next(iter(keep))]).new_zeros(
                requires_grad_shapes[lost])})
            super().__init__(real - {lost}, keep, requires_grad)

    requires_grad_shapes = {n: tuple(p.shape) for n, p in model.model.layers[0].named_parameters()}
    monkeypatch.setattr(stream, "_Kind", Forgetful)
    rep = bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL)
    assert set(rep.reread) == {"model.layers.1", "model.layers.2"}, str(rep)
    assert all("read" in why for why in rep.reread.values())
    _same_files(tmp_path / "ref", tmp_path / "dst")


def _same_files(a, b):
    from safetensors.torch import load_file

    def tensors(folder):
        out = {}
        for f in os.listdir(folder):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(folder, f)))
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def test_copied_files_are_bit_identical_and_aligned(tmp_path, monkeypatch):
    """The kernel-copied safetensors file: any subset of a checkpoint's tensors, of mixed
    dtypes and across files, loads back bit for bit, each tensor aligned to its element."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from bdpass.prepare import files as pf

    g = torch.Generator().manual_seed(0)
    a = {"x.a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "x.b": torch.randn(7, generator=g),
         "x.c": torch.randint(0, 9, (3,), generator=g), "x.d": torch.randn(2, 3, generator=g).double(),
         "x.e": torch.randn(1, generator=g).half()}
    b = {"y.a": torch.randn(4, 4, generator=g), "y.b": torch.arange(5, dtype=torch.int16)}
    save_file(a, tmp_path / "one.safetensors")
    save_file(b, tmp_path / "two.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {**{k: "one.safetensors" for k in a}, **{k: "two.safetensors" for k in b}}}))
    folder = pf.Folder(str(tmp_path))
    names = ["x.a", "x.c", "y.b", "x.e", "y.a", "x.d"]
    n = pf.copy_tensors(folder, names, str(tmp_path / "out.safetensors"))
    assert n == os.path.getsize(tmp_path / "out.safetensors")
    header, start = pf.read_header(str(tmp_path / "out.safetensors"))
    assert start % 8 == 0
    with safe_open(tmp_path / "out.safetensors", "pt") as f:
        assert sorted(f.keys()) == sorted(names)
        for k in names:
            t = f.get_tensor(k)
            assert t.dtype == {**a, **b}[k].dtype and torch.equal(t, {**a, **b}[k]), k
            assert header[k]["data_offsets"][0] % t.element_size() == 0, k
    # through a plain buffer where the kernel copy is not available
    def refuse(*args, **kw):
        raise OSError(38, "not supported")

    monkeypatch.setattr(pf.os, "copy_file_range", refuse, raising=False)
    pf.copy_tensors(folder, names, str(tmp_path / "buf.safetensors"))
    assert (tmp_path / "buf.safetensors").read_bytes() == (tmp_path / "out.safetensors").read_bytes()


def test_routing_that_disagrees_with_the_loader_writes_from_memory(tmp_path, monkeypatch, caplog):
    """Where transformers' key routing (what bdpass copies) does not account for a parameter
    the loader filled, nothing is copied for that kind of block: it is written from memory,
    each tensor once, and the folder loads clean and equals a run without the fault."""
    from bdpass import _compat

    model, _, _ = build("llama", layers=3)
    model.save_pretrained(tmp_path / "src")
    ref = bdpass.prepare_folder(tmp_path / "src", tmp_path / "ref", ALL)
    real = _compat.checkpoint_key_targets

    def lost(model, keys):
        out = real(model, keys)
        return {k: ((frozenset(), v[1]) if k.endswith("mlp.down_proj.weight") else v) for k, v in out.items()}

    monkeypatch.setattr(_compat, "checkpoint_key_targets", lost)
    with caplog.at_level("INFO", logger="bdpass"):
        rep = bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL)
    assert "not made by any checkpoint key" in caplog.text
    assert [len(r.edits) for r in rep.blocks.values()] == [len(r.edits) for r in ref.blocks.values()]
    from safetensors import safe_open

    seen: dict[str, str] = {}
    for f in os.listdir(tmp_path / "dst"):
        if f.endswith(".safetensors"):
            with safe_open(tmp_path / "dst" / f, "pt") as h:
                for k in h.keys():
                    assert k not in seen, (k, f, seen.get(k))
                    seen[k] = f
    _same_files(tmp_path / "ref", tmp_path / "dst")
    _, messages = load(tmp_path / "dst")
    assert_clean(messages)


_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, pad_token_id=0)
_FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),            # experts fused on load
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1),
    "gemma2": dict(head_dim=16, sliding_window=8),                          # sliding and full layers, tied head
    "phi3": dict(),                                                         # a fused qkv_proj
}


@pytest.mark.parametrize("family", sorted(_FAMILIES))
def test_more_families(family, tmp_path):
    """Other transformers architectures, each from its config: the folder equals the
    in-memory preparation, stays within 1.5x of the original's float64 error and generates
    its greedy tokens."""
    cfg = transformers.AutoConfig.for_model(family, **_SMALL, **_FAMILIES[family])
    kw = {"experts_implementation": "eager"} if family in ("mixtral", "qwen2_moe") else {}
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **kw).eval()
    model.save_pretrained(tmp_path / "src", max_shard_size="300KB")
    rep, prepared = _check(model, tmp_path / "src", tmp_path, **kw)
    assert all(r.edits for r in rep.blocks.values()), str(rep)
    assert not rep.reread and rep.copied_bytes > rep.read_bytes, str(rep)


def test_prepared_in_another_dtype(tmp_path):
    """``dtype=``: a float32 checkpoint prepared in bfloat16. The prepared tensors are
    bfloat16, the copied ones keep the checkpoint's float32; loaded in bfloat16 the folder
    equals the in-memory preparation of the model loaded in bfloat16."""
    from safetensors import safe_open

    model, _, _ = build("deepseek_v2", layers=3, experts_implementation="eager")
    model.save_pretrained(tmp_path / "src")
    kw = {"experts_implementation": "eager"}
    bdpass.prepare_folder(tmp_path / "src", tmp_path / "dst", ALL, dtype=torch.bfloat16, model_kwargs=kw)
    index = json.loads((tmp_path / "dst" / "model.safetensors.index.json").read_text())["weight_map"]
    dtypes = {}
    for n, f in index.items():
        with safe_open(tmp_path / "dst" / f, "pt") as h:
            dtypes[n] = h.get_slice(n).get_dtype()
    assert dtypes["model.layers.2.mlp.experts.0.up_proj.weight"] == "F32"
    assert dtypes["model.layers.2.self_attn.o_proj.weight"] == "BF16"
    prepared, messages = load(tmp_path / "dst", dtype=torch.bfloat16, **kw)
    assert_clean(messages)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16, **kw).eval()
    memory = bdpass.prepare(loaded, _example(loaded.config), options=ALL, use_cache=False)
    _same_state(prepared.eval(), memory)
