"""bd on transformers architectures built from their own default configs, shrunk
(``tests/hf_sweep_lib.py``): no crash, no fallback from an internal error, output within
rounding of eager float32's, every attention contraction with a verdict.

CI runs a fixed subset of diverse families (lowered by ``aot_eager`` to keep Inductor's C++
compilation out of the test's time; the analysis, the rewrites and their float64 validation
are the same); the full sweep over every architecture, with Inductor and default options, is
``-m slow`` (``benchmarks/hf_sweep.py`` is the same sweep as a command, with the table).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

import hf_sweep_lib as lib

# family -> attention contractions in the tiny model (each needs a bd_qk and a bd_vo verdict)
CI_FAMILIES = {
    "gpt2": 2,            # Conv1D fused QKV
    "llama": 2,           # RoPE, GQA
    "deepseek_v2": 2,     # MLA, MoE (eager experts: graph breaks)
    "falcon": 2,          # new_decoder_architecture: grouped fused QKV
    "gemma2": 2,          # soft-capping, sliding window
    "phi": 2,             # partial rotary
    "gpt_neox": 2,        # rotary_pct, interleaved fused QKV
    "jetmoe": 2,          # mixture of attention heads: split by data-dependent sizes
    "rwkv": 0,            # no attention: state written into a slice of a tensor
    "bloom": 2,           # ALiBi
    "mpt": 2,             # ALiBi, fused Wqkv
    "opt": 2,             # learned positions
    "gpt_oss": 2,         # attention sinks: a logit column concatenated to the scores, sliced off the probabilities
}
CI_OPTIONS = {"lowering": "aot_eager"}


def assert_targets(res: dict, attentions: int | None = None) -> None:
    where = f"{res['family']} ({res['kind']})"
    assert res["status"] != "not_built", f"{where} not built: {res['reason']}"
    assert res["status"] == "ok", f"{where}: {res['status']}: {res['reason']}\n{res.get('traceback', '')}"
    assert not [f for f in res["fallbacks"] if f.startswith(lib._INTERNAL)], res["fallbacks"]
    assert res["err_bd"] <= lib.error_bound(res["err_eager"]), (res["err_bd"], res["err_eager"])
    assert "verdicts_error" not in res, res["verdicts_error"]
    if attentions is not None:
        assert res["verdicts"].get("bd_qk") == res["verdicts"].get("bd_vo") == attentions, res["verdicts"]


@pytest.mark.parametrize("family", list(CI_FAMILIES))
def test_family(family):
    res = lib.check(family, "causal", options=CI_OPTIONS)
    assert_targets(res, CI_FAMILIES[family])
    if CI_FAMILIES[family]:
        # the default cache returns K and V: every pair has a verdict, the skipped ones a reason
        qk = res["skipped"].get("bd_qk", {})
        assert res["rewrites"].get("bd_qk", 0) + sum(qk.values()) >= 1, res


# ---------------------------------------------------------------------------- the shrink itself
def test_shrink_uses_the_config_own_names():
    cfg = lib.tiny_config("gpt2")
    assert (cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.vocab_size) == (lib.HIDDEN, lib.HEADS, lib.LAYERS, lib.VOCAB)
    assert cfg.hidden_size == lib.HIDDEN          # through attribute_map


def test_shrink_keeps_one_layer_of_each_kind():
    cfg = lib.tiny_config("qwen3_next")           # default: 3 linear-attention layers per full one
    assert sorted(set(cfg.layer_types)) == ["full_attention", "linear_attention"]
    assert cfg.num_hidden_layers == len(cfg.layer_types) <= lib.MAX_LAYERS


def test_shrink_keeps_mla_widths_consistent():
    cfg = lib.tiny_config("deepseek_v3")
    assert cfg.qk_head_dim == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    assert cfg.head_dim == cfg.qk_rope_head_dim   # the rotary width, as in the default config
    assert cfg.n_routed_experts == lib.EXPERTS and cfg.num_experts_per_tok == lib.TOPK


def test_special_tokens_stay_inside_the_small_vocabulary():
    for family in ("llama", "gemma3", "whisper"):
        cfg = lib.tiny_config(family)
        for k, v in cfg.to_dict().items():
            if k.endswith(("token_id", "token_index")) and isinstance(v, int):
                assert v < lib.VOCAB, (family, k, v)


def test_a_model_that_cannot_be_built_is_reported_not_hidden():
    res = lib.check("gpt2", "causal", n_head=3)     # 3 heads do not divide the hidden width 64
    assert res["status"] == "not_built", res
    assert res["reason"].startswith("config/construction: ") and "head" in res["reason"], res["reason"]


def test_error_bound():
    assert lib.error_bound(1e-7) == lib.ERROR_FLOOR
    assert lib.error_bound(1e-5) == pytest.approx(lib.ERROR_FACTOR * 1e-5)


# ---------------------------------------------------------------------------- the full sweep
@pytest.mark.slow
def test_full_sweep(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import hf_sweep

    jobs = [(k, f) for k in lib.KINDS for f in lib.families(k)]
    results = hf_sweep.run_all(jobs, 2, 600.0, None, str(tmp_path / "workers.log"), progress=lambda s: None)
    bad = [f"{r['kind']}/{r['family']}: {r['status']}: {r.get('reason', '')}" for r in results
           if r["status"] in ("crashed", "timeout", "internal_fallback", "wrong", "verdicts_missing")]
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------- what the sweep found
class _SlotAttention(torch.nn.Module):
    """Attention whose values are written into a buffer position by position (an integer index,
    then a slice), as RWKV writes its state: the layout analysis must follow both writes."""

    def __init__(self, d=32, h=2):
        super().__init__()
        self.h, self.dh = h, d // h
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        v = self.v(x)
        buf = torch.zeros_like(v)
        buf[:, 0] = v[:, 0]
        buf[:, 1:] = v[:, 1:]

        def heads(t):
            return t.view(B, T, self.h, self.dh).transpose(1, 2)

        a = torch.nn.functional.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(buf))
        return self.o(a.transpose(1, 2).reshape(B, T, D))


def test_values_written_at_an_integer_index_keep_their_layout():
    import bdpass

    torch.manual_seed(0)
    model, x = _SlotAttention().eval(), torch.randn(2, 5, 32)
    with torch.no_grad():
        ref = model(x)
    rep = bdpass.explain(model, x, options={"strict": True, "cost_model": False, "lowering": "eager"})
    assert not [g.fallback for g in rep.graphs if g.fallback], str(rep)
    kinds = {r.kind for r in rep.rewrites}
    # both writes carry V's channels: the value pair is rewritten exactly as without the buffer
    assert kinds == {"bd_qk", "bd_vo"}, str(rep)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="bd", options={"cost_model": False, "lowering": "eager"})(x)
    torch._dynamo.reset()
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)
