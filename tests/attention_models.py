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


class Spelled(nn.Module):
    """Multi-head attention whose projections, channel moves and contractions are written in
    the less common spellings real models use (raw weights, no ``nn.Linear``).

    proj: how q/k/v are projected from ``x`` with ``(h*e, d)`` weights
        "linear" F.linear | "T" x @ W.T | "mT" x @ W.mT | "t" x @ W.t() | "transpose" |
        "permute" | "einsum2" einsum("btd,ed->bte") | "einsum3" einsum("btd,dhe->bhte") with
        the weight viewed (d, h, e) | "detach_w" F.linear(x, W.detach())
    between: what happens to q/k/v (b, h, t, e) before the contractions
        "" | "detach" | "alias" | "float" | "to" | "movedim" | "broadcast_to" | "expand_as" |
        "unflatten" (heads split by unflatten instead of view) | "narrow" (k rebuilt from two
        narrowed halves) | "index" (k and q channels permuted by a constant list index) |
        "index_select" (the same by index_select with a constant tensor) | "unbind" (one fused
        qkv tensor stacked and unbound) | "bigT" (k through ``.T`` of rank 4 and back)
    score: "matmul" | "einsum" (einsum scores and values) | "sdpa" | "baddbmm" | "sinks" (a
        learned logit per head concatenated as the last score column, max-subtracted, its
        probability sliced off before the values: gpt-oss) | "sinks_first" (the sink column
        first, dropped by ``narrow``)
    out: "linear" | "T" (y @ Wo.T) | "einsum" einsum("bte,de->btd")
    """

    def __init__(self, d=64, heads=4, head_dim=16, proj="linear", between="", score="matmul", out="linear"):
        super().__init__()
        self.h, self.e = heads, head_dim
        self.proj, self.between, self.score, self.out = proj, between, score, out
        s = d ** -0.5
        self.wq = nn.Parameter(torch.randn(heads * head_dim, d) * s)
        self.wk = nn.Parameter(torch.randn(heads * head_dim, d) * s)
        self.wv = nn.Parameter(torch.randn(heads * head_dim, d) * s)
        self.wo = nn.Parameter(torch.randn(d, heads * head_dim) * (heads * head_dim) ** -0.5)
        if between == "unbind":
            self.wqkv = nn.Parameter(torch.cat([self.wq.detach(), self.wk.detach(), self.wv.detach()]))
        if score.startswith("sinks"):
            self.sinks = nn.Parameter(torch.randn(heads))
        g = torch.Generator().manual_seed(0)
        self.register_buffer("perm", torch.randperm(head_dim, generator=g), persistent=False)
        self.perm_list = self.perm.tolist()

    def project(self, x, w):
        B, T, _ = x.shape
        p = self.proj
        if p == "einsum3":
            return torch.einsum("btd,dhe->bhte", x, w.T.reshape(-1, self.h, self.e))
        if p == "linear":
            y = F.linear(x, w)
        elif p == "T":
            y = x @ w.T
        elif p == "mT":
            y = x @ w.mT
        elif p == "t":
            y = torch.matmul(x, w.t())
        elif p == "transpose":
            y = x @ w.transpose(0, 1)
        elif p == "permute":
            y = x @ w.permute(1, 0)
        elif p == "einsum2":
            y = torch.einsum("btd,ed->bte", x, w)
        elif p == "detach_w":
            y = F.linear(x, w.detach())
        else:
            raise ValueError(p)
        if self.between == "unflatten":
            return y.unflatten(-1, (self.h, self.e)).transpose(1, 2)
        return y.view(B, T, self.h, self.e).transpose(1, 2)

    def forward(self, x):
        B, T, _ = x.shape
        bt = self.between
        if bt == "unbind":      # timm's fused qkv: (B, T, 3, h, e) -> (3, B, h, T, e) -> unbind
            qkv = F.linear(x, self.wqkv).reshape(B, T, 3, self.h, self.e).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
        else:
            q, k, v = (self.project(x, w) for w in (self.wq, self.wk, self.wv))
        if bt == "detach":
            q, k, v = q.detach(), k.detach(), v.detach()
        elif bt == "alias":
            k, v = torch.ops.aten.alias(k), torch.ops.aten.alias(v)
        elif bt == "float":
            k, v = k.float(), v.float()
        elif bt == "to":
            q, k, v = q.to(torch.float32), k.to(dtype=torch.float32), v.to(x.dtype)
        elif bt == "movedim":
            k = k.movedim(1, 2).movedim(2, 1)
            v = torch.movedim(v, (1, 2), (2, 1)).transpose(1, 2)
        elif bt == "broadcast_to":
            k, v = k.broadcast_to(B, self.h, T, self.e), torch.broadcast_to(v, (B, self.h, T, self.e))
        elif bt == "expand_as":
            k = k[:, :, None].expand_as(torch.empty(B, self.h, 1, T, self.e))[:, :, 0]
            v = v.expand_as(q)
        elif bt == "narrow":
            half = self.e // 2
            k = torch.cat([k.narrow(-1, 0, half), torch.narrow(k, 3, half, self.e - half)], dim=-1)
        elif bt == "index":
            q, k = q[..., self.perm_list], k[..., self.perm_list]
        elif bt == "index_select":
            q = q.index_select(-1, self.perm)
            k = torch.index_select(k, 3, self.perm)
        elif bt == "bigT":
            k = k.T.permute(3, 2, 1, 0)
        if self.score == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.score == "einsum":
            a = torch.softmax(torch.einsum("bhqd,bhkd->bhqk", q, k) * self.e ** -0.5, dim=-1)
            o = torch.einsum("bhqk,bhkd->bhqd", a, v)
        elif self.score == "baddbmm":
            q3, k3, v3 = (t.reshape(B * self.h, T, self.e) for t in (q, k, v))
            s = torch.baddbmm(torch.zeros(B * self.h, T, T), q3, k3.transpose(1, 2), beta=0.0, alpha=self.e ** -0.5)
            o = torch.bmm(torch.softmax(s, dim=-1), v3).view(B, self.h, T, self.e)
        elif self.score.startswith("sinks"):
            s = q @ k.transpose(-1, -2) * self.e ** -0.5
            sink = self.sinks.reshape(1, -1, 1, 1).expand(B, -1, T, 1)
            first = self.score == "sinks_first"
            s = torch.cat([sink, s] if first else [s, sink], dim=-1)
            s = s - s.max(dim=-1, keepdim=True).values
            p = F.softmax(s, dim=-1)
            p = p.narrow(-1, 1, T) if first else p[..., :-1]
            o = torch.matmul(p, v)
        else:
            o = torch.softmax(q @ k.transpose(-1, -2) * self.e ** -0.5, dim=-1) @ v
        o = o.transpose(1, 2).reshape(B, T, self.h * self.e)
        if self.out == "T":
            return o @ self.wo.T
        if self.out == "einsum":
            return torch.einsum("bte,de->btd", o, self.wo)
        return F.linear(o, self.wo)
