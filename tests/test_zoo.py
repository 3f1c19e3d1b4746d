"""bd on Hugging Face transformers models built from configs (random weights)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

import bdpass
import zoo
from helpers import side_by_side

# What the analysis must find in each family (2 layers each).
EXPECTED = {
    "gpt2": {"bd_qk": 2, "bd_vo": 2},
    "bert": {"bd_qk": 2, "bd_vo": 2},
    "vit": {"bd_qk": 2, "bd_vo": 2},
    "clip_text": {"bd_qk": 2, "bd_vo": 2},
    "clip_vision": {"bd_qk": 2, "bd_vo": 2},
    "whisper": {"bd_qk": 6, "bd_vo": 6},          # encoder self, decoder self, decoder cross
    "t5": {"bd_qk": 6, "bd_vo": 6},
    "llama": {"bd_vo": 2},                          # RoPE on all q/k channels
    "mistral": {"bd_vo": 2},
    "qwen2": {"bd_vo": 2},
    "qwen3": {"bd_vo": 2},                          # q_norm/k_norm and RoPE
    "phi": {"bd_qk": 2, "bd_vo": 2},                # partial rotary: un-rotated half
    "gpt_neox": {"bd_qk": 2, "bd_vo": 2},           # rotary_pct 0.25
    "deepseek_v2": {"bd_qk": 2, "bd_vo": 2},        # MLA nope part through kv_b_proj
    "deepseek_v3": {"bd_qk": 2, "bd_vo": 2},
}

QK_SKIP = {"llama": "RoPE", "mistral": "RoPE", "qwen2": "RoPE", "qwen3": ""}


def build(family, dtype=torch.float32):
    kw = {"experts_implementation": "batched_mm"} if family.startswith("deepseek") else {}
    model, args, kwargs = zoo.build(family, **kw)
    if dtype != torch.float32:
        model = model.to(dtype)
        args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
        kwargs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in kwargs.items()}
    return model, args, kwargs


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_family_fp32(family):
    model, args, kwargs = build(family)
    bd_err, ind_err, _, _, rep = side_by_side(model, args, kwargs, options={"cost_model": False})
    assert dict(Counter(r.kind for r in rep.rewrites)) == EXPECTED[family], str(rep)
    assert rep.params_after < rep.params_before
    if family in QK_SKIP:
        qk = [s.reason for s in rep.skipped if s.kind == "bd_qk"]
        assert qk and all(QK_SKIP[family] in r for r in qk), qk
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


def _half_cases():
    for family in zoo.FAMILIES:
        for dtype in (torch.bfloat16, torch.float16):
            yield pytest.param(family, dtype, id=f"{family}-{str(dtype)[6:]}")


@pytest.mark.slow
@pytest.mark.parametrize("family,dtype", list(_half_cases()))
def test_family_half(family, dtype):
    model, args, kwargs = build(family, dtype)
    bd_err, ind_err, _, _, rep = side_by_side(model, args, kwargs, options={"cost_model": False})
    assert dict(Counter(r.kind for r in rep.rewrites)) == EXPECTED[family], str(rep)
    assert bd_err <= 1.5 * ind_err, (bd_err, ind_err)


@pytest.mark.parametrize("family", ["gpt2", "llama", "deepseek_v2"])
def test_generate_greedy_with_cache(family):
    kw = {"experts_implementation": "batched_mm"} if family.startswith("deepseek") else {}
    model, args, _ = zoo.build(family, use_cache=True, **kw)
    ids = args[0][:1, :6]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        torch._dynamo.reset()
        eager_forward = model.forward
        model.forward = torch.compile(eager_forward, backend="bd", options={"lowering": "aot_eager", "cost_model": False})
        try:
            with bdpass.collect_reports() as rep:
                out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        finally:
            model.forward = eager_forward
            torch._dynamo.reset()
    assert torch.equal(out, ref), (out, ref)
    kinds = Counter(r.kind for r in rep.rewrites)
    if family == "deepseek_v2":
        # the cache holds the latent, so K and V never leave the graph: both pairs rewrite
        assert kinds["bd_qk"] > 0 and kinds["bd_vo"] > 0, str(rep)
    else:
        # K/V are returned in the cache: their rewrites must be skipped, with that reason
        assert kinds["bd_vo"] == 0 and kinds["bd_qk"] == 0, str(rep)
        assert any("graph output" in s.reason or "KV cache" in s.reason for s in rep.skipped), str(rep)
