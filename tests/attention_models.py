"""Hand-written attention blocks in the shapes and spellings real models use."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope(x, pos_dim):
    """Rotary embedding on the last ``pos_dim`` channels' worth of x (all of x's last dim)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    t = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(t, inv)
    emb = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
    return x * emb.cos() + rotate_half(x) * emb.sin()


class MHA(nn.Module):
    """Separate q/k/v/o projections.

    attn: "sdpa" | "eager"; gqa: query heads per kv head; rope: "none" | "full" | "partial";
    qk_norm: per-head RMSNorm on q and k; fused: one qkv projection then split;
    return_k: also return the keys (as a KV cache would)."""

    def __init__(self, d=64, heads=4, head_dim=16, gqa=1, bias=True, attn="sdpa", rope="none",
                 qk_norm=False, fused=False, return_k=False, causal=True, gqa_style="expand"):
        super().__init__()
        self.h, self.hd, self.kvh = heads, head_dim, heads // gqa
        self.attn, self.rope, self.qk_norm, self.fused = attn, rope, qk_norm, fused
        self.return_k, self.causal, self.gqa_style = return_k, causal, gqa_style
        if fused:
            self.qkv = nn.Linear(d, (heads + 2 * self.kvh) * head_dim, bias=bias)
        else:
            self.q_proj = nn.Linear(d, heads * head_dim, bias=bias)
            self.k_proj = nn.Linear(d, self.kvh * head_dim, bias=bias)
            self.v_proj = nn.Linear(d, self.kvh * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(head_dim)
            self.k_norm = nn.RMSNorm(head_dim)

    def forward(self, x, kv=None):
        B, T, _ = x.shape
        src = x if kv is None else kv
        S = src.shape[1]
        if self.fused:
            q, k, v = self.qkv(x).split([self.h * self.hd, self.kvh * self.hd, self.kvh * self.hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(src), self.v_proj(src)
        q = q.view(B, T, self.h, self.hd).transpose(1, 2)
        k = k.view(B, S, self.kvh, self.hd).transpose(1, 2)
        v = v.view(B, S, self.kvh, self.hd).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope == "full":
            q, k = rope(q, self.hd), rope(k, self.hd)
        elif self.rope == "partial":
            r = self.hd // 2
            q = torch.cat((rope(q[..., :r], r), q[..., r:]), dim=-1)
            k = torch.cat((rope(k[..., :r], r), k[..., r:]), dim=-1)
        g = self.h // self.kvh
        if self.attn == "sdpa_gqa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and kv is None, enable_gqa=g > 1)
        else:
            if g > 1:
                if self.gqa_style == "expand":
                    k = k[:, :, None].expand(B, self.kvh, g, S, self.hd).reshape(B, self.h, S, self.hd)
                    v = v[:, :, None].expand(B, self.kvh, g, S, self.hd).reshape(B, self.h, S, self.hd)
                else:
                    k = k.repeat_interleave(g, dim=1)
                    v = v.repeat_interleave(g, dim=1)
            if self.attn == "sdpa":
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and kv is None)
            else:
                s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
                if self.causal and kv is None:
                    mask = torch.full((T, S), float("-inf"), dtype=s.dtype).triu(1)
                    s = s + mask
                o = torch.softmax(s, dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, T, self.h * self.hd)
        out = self.o_proj(o)
        return (out, k) if self.return_k else out


class CrossAttention(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = MHA(causal=False, **kw)

    def forward(self, x, enc):
        return self.attn(x, kv=enc)


class LatentAttention(nn.Module):
    """MLA-like: K and V from a latent through one projection; keys assembled by slice
    copies into a new tensor (as transformers' DeepSeek-V2 does), RoPE only on a shared part."""

    def __init__(self, d=64, heads=4, latent=32, nope=16, rope_dim=8, v_dim=16):
        super().__init__()
        self.h, self.nope, self.rd, self.vd = heads, nope, rope_dim, v_dim
        self.q_proj = nn.Linear(d, heads * (nope + rope_dim), bias=False)
        self.kv_a = nn.Linear(d, latent + rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(latent)
        self.kv_b = nn.Linear(latent, heads * (nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, d, bias=False)
        self.latent = latent

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.nope + self.rd).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rd], dim=-1)
        ckv, k_pe = torch.split(self.kv_a(x), [self.latent, self.rd], dim=-1)
        kv = self.kv_b(self.kv_norm(ckv)).view(B, T, self.h, self.nope + self.vd).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.vd], dim=-1)
        k_pe = rope(k_pe.view(B, 1, T, self.rd), self.rd)
        q_pe = rope(q_pe, self.rd)
        q = torch.cat((q_nope, q_pe), dim=-1)
        k = k_nope.new_empty(B, self.h, T, self.nope + self.rd)
        k[..., : self.nope].copy_(k_nope)
        k[..., self.nope:].copy_(k_pe.expand(B, self.h, T, self.rd))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.h * self.vd))
