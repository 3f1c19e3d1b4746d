"""The MLA modules the measurements time, and the FLOP model of an MLA prefill."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mla_block_flops(T: int, hidden: int, heads: int, latent: int, nope: int, rope: int, v: int) -> tuple[int, int]:
    """FLOP model of one causal MLA prefill of T tokens (projections and attention, causal
    half of the score and value products) and the FLOPs BD saves (QK on the nope channels,
    VO on the values of the latent's up-projection)."""
    proj = 2 * T * (hidden * heads * (nope + rope) + hidden * (latent + rope) + latent * heads * (nope + v)
                    + heads * v * hidden)
    pairs = T * (T + 1) // 2
    attn = 2 * heads * pairs * (nope + rope) + 2 * heads * pairs * v
    saved = 2 * T * heads * (nope * nope + v * v)
    return proj + attn, saved


class MLADecodeStep(nn.Module):
    """One MLA decode step without weight absorption: the query of the new token meets keys
    and values expanded from a latent cache of M tokens (spelled as transformers'
    DeepSeek-V2 does: kv_b_proj, split, keys assembled with the shared rope part)."""

    def __init__(self, hidden, heads, latent, nope, rope, v):
        super().__init__()
        self.h, self.nope, self.rope, self.v = heads, nope, rope, v
        self.q_proj = nn.Linear(hidden, heads * (nope + rope), bias=False)
        self.kv_b_proj = nn.Linear(latent, heads * (nope + v), bias=False)
        self.o_proj = nn.Linear(heads * v, hidden, bias=False)

    def forward(self, x, latent, k_pe):
        B, M = latent.shape[:2]
        q = self.q_proj(x).view(B, 1, self.h, self.nope + self.rope).transpose(1, 2)
        kv = self.kv_b_proj(latent).view(B, M, self.h, self.nope + self.v).transpose(1, 2)
        k_nope, val = torch.split(kv, [self.nope, self.v], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, self.h, M, self.rope)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, val)
        return self.o_proj(o.transpose(1, 2).reshape(B, 1, self.h * self.v))


class MLABlock(nn.Module):
    """transformers' DeepseekV2Attention with its rotary embedding: a causal prefill.
    Projections drawn as N(0, 1/fan_in)."""

    def __init__(self, hidden, heads, latent, nope, rope, v, max_positions):
        super().__init__()
        import transformers
        from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

        cfg = transformers.AutoConfig.for_model(
            "deepseek_v2", hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
            kv_lora_rank=latent, q_lora_rank=None, qk_nope_head_dim=nope, qk_rope_head_dim=rope,
            v_head_dim=v, intermediate_size=4 * hidden, vocab_size=128, num_hidden_layers=1,
            first_k_dense_replace=1, max_position_embeddings=max_positions, use_cache=False,
            attention_bias=False, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        cfg._attn_implementation = "sdpa"
        self.attn = m.DeepseekV2Attention(cfg, layer_idx=0)
        self.rotary = m.DeepseekV2RotaryEmbedding(cfg)
        g = torch.Generator().manual_seed(43)
        with torch.no_grad():
            for mod in self.attn.modules():
                if isinstance(mod, nn.Linear):
                    mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * mod.weight.shape[1] ** -0.5)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
        return self.attn(x, attention_mask=None, position_embeddings=self.rotary(x, pos))[0]
