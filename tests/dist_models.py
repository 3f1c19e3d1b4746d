"""Tensor-parallel models for ``tests/test_distributed.py``.

Each model is one class written the way tensor-parallel serving code writes it (gpt-fast,
Megatron): an instance built with ``group=None`` is the unsharded model; :func:`shard`
builds the instance of one rank, holding only its slices of the full model's weights, whose
forward ends every row-parallel projection with an all-reduce through
``torch.distributed._functional_collectives`` (traced by Dynamo into the graph as
``_c10d_functional.all_reduce`` + ``wait_tensor``). The same classes, unsharded, are what
``parallelize_module`` shards in the DTensor tests (:data:`DTENSOR_PLANS`): their forwards
size heads with ``-1`` so that local shards run through the same code.

Sharding (``TP_PLAN`` of each class, by parameter name):

* ``("col", block)``: column-parallel, output rows of the ``nn.Linear`` weight split in
  whole blocks of ``block`` rows (a head's rows, a rank slice);
* ``("row", block)``: row-parallel, input columns split likewise; the projection's output
  is this rank's partial sum;
* anything not listed is replicated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum of the ranks' partial results (the all-reduce after a row-parallel projection)."""
    if group is None:
        return x
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(x, "sum", group)


def rope(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over x's last dim (positions along dim -2)."""
    T, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=x.device), inv)
    emb = torch.cat((freqs, freqs), dim=-1).to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * emb.cos() + torch.cat((-x2, x1), dim=-1) * emb.sin()


class MLA(nn.Module):
    """DeepSeek-V2(-Lite)-shaped multi-head latent attention (no q compression): K-nope and V
    of every head come from one latent through ``kv_b_proj``; RoPE only on the decoupled
    ``rope_dim`` part (shared key). Heads are split across ranks: ``q_proj`` and ``kv_b_proj``
    column-parallel by heads, ``o_proj`` row-parallel, the latent path replicated.

    Per rank, BD applies to its own heads: K-nope of ``kv_b_proj`` with ``q_proj``'s nope
    columns (bd_qk), V of ``kv_b_proj`` with ``o_proj``'s rows (bd_vo)."""

    def __init__(self, hidden=64, heads=4, latent=32, nope=16, rope_dim=8, v_dim=16, group=None):
        super().__init__()
        self.cfg = dict(hidden=hidden, heads=heads, latent=latent, nope=nope, rope_dim=rope_dim, v_dim=v_dim)
        self.group = group
        self.nope, self.rd, self.vd, self.latent = nope, rope_dim, v_dim, latent
        self.q_proj = nn.Linear(hidden, heads * (nope + rope_dim), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, latent + rope_dim, bias=False)
        self.kv_a_layernorm = nn.RMSNorm(latent)
        self.kv_b_proj = nn.Linear(latent, heads * (nope + v_dim), bias=False)
        self.o_proj = nn.Linear(heads * v_dim, hidden, bias=False)
        self.TP_PLAN = {"q_proj.weight": ("col", nope + rope_dim), "kv_b_proj.weight": ("col", nope + v_dim),
                        "o_proj.weight": ("row", v_dim)}

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.nope + self.rd).transpose(1, 2)
        q_nope, q_pe = torch.split(q, [self.nope, self.rd], dim=-1)
        ckv, k_pe = torch.split(self.kv_a_proj_with_mqa(x), [self.latent, self.rd], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(ckv)).view(B, T, -1, self.nope + self.vd).transpose(1, 2)
        k_nope, v = torch.split(kv, [self.nope, self.vd], dim=-1)
        h = kv.shape[1]
        k_pe = rope(k_pe.view(B, 1, T, self.rd))
        q = torch.cat([q_nope, rope(q_pe)], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, h, T, self.rd)], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return reduce(self.o_proj(o.transpose(1, 2).reshape(B, T, h * self.vd)), self.group)


class GQABlock(nn.Module):
    """A Llama-style decoder block with grouped-query attention (RoPE on every q/k channel)
    and a SwiGLU MLP. KV heads are split across ranks, each with its group of query heads:
    q/k/v column-parallel by (KV) heads, ``o_proj`` row-parallel; ``gate``/``up``
    column-parallel, ``down`` row-parallel. RoPE forbids BD-QK; BD-VO applies per rank to its
    own KV heads (each folded into the ``o_proj`` rows of every query head of its group)."""

    def __init__(self, hidden=64, heads=8, kv_heads=4, head_dim=16, ffn=96, group=None):
        super().__init__()
        self.cfg = dict(hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, ffn=ffn)
        self.group = group
        self.hd, self.g = head_dim, heads // kv_heads
        self.attn_norm = nn.RMSNorm(hidden)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.mlp_norm = nn.RMSNorm(hidden)
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)
        self.TP_PLAN = {"q_proj.weight": ("col", self.g * head_dim), "k_proj.weight": ("col", head_dim),
                        "v_proj.weight": ("col", head_dim), "o_proj.weight": ("row", self.g * head_dim),
                        "gate.weight": ("col", 1), "up.weight": ("col", 1), "down.weight": ("row", 1)}

    def forward(self, x):
        B, T, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, -1, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, -1, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, -1, self.hd).transpose(1, 2)
        kvh = k.shape[1]
        q, k = rope(q), rope(k)
        k = k[:, :, None].expand(B, kvh, self.g, T, self.hd).reshape(B, kvh * self.g, T, self.hd)
        v = v[:, :, None].expand(B, kvh, self.g, T, self.hd).reshape(B, kvh * self.g, T, self.hd)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + reduce(self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), self.group)
        h = self.mlp_norm(x)
        return x + reduce(self.down(F.silu(self.gate(h)) * self.up(h)), self.group)


class LowRankMLP(nn.Module):
    """An SVD-compressed MLP (``up = u_up(v_up(x))``, ``down = u_down(v_down(h))``) whose rank
    dimension is split across ranks: every ``v_*`` column-parallel over its rank, every
    ``u_*`` row-parallel over it. On each rank each pair is a low-rank chain of rank
    ``r / world`` whose output is a partial sum: all-reduced, then the (replicated) bias is
    added once. PIFA applies per rank to its local chains; the column order of the up chain
    cannot pass to the down chain (the all-reduce sums terms whose pivots differ per rank)."""

    def __init__(self, d=64, ffn=128, r_up=32, r_down=32, group=None):
        super().__init__()
        self.cfg = dict(d=d, ffn=ffn, r_up=r_up, r_down=r_down)
        self.group = group
        self.v_up = nn.Linear(d, r_up, bias=False)
        self.u_up = nn.Linear(r_up, ffn, bias=False)
        self.b_up = nn.Parameter(torch.randn(ffn) * 0.1)
        self.v_down = nn.Linear(ffn, r_down, bias=False)
        self.u_down = nn.Linear(r_down, d, bias=False)
        self.b_down = nn.Parameter(torch.randn(d) * 0.1)
        self.TP_PLAN = {"v_up.weight": ("col", 1), "u_up.weight": ("row", 1),
                        "v_down.weight": ("col", 1), "u_down.weight": ("row", 1)}

    def forward(self, x):
        h = F.gelu(reduce(self.u_up(self.v_up(x)), self.group) + self.b_up)
        return x + reduce(self.u_down(self.v_down(h)), self.group) + self.b_down


# --------------------------------------------------------------------------- collectives between
class RowParallelKeys(nn.Module):
    """Attention whose K projection is row-parallel (input channels split across ranks), so an
    all-reduce of partial sums sits between the projection and the score contraction; Q, V
    and O are replicated. BD-QK must be refused: each rank's term would be in the basis of its
    own weight slice, and no rank can fold its query with another rank's basis."""

    def __init__(self, hidden=64, heads=4, head_dim=16, world=1, group=None):
        super().__init__()
        self.cfg = dict(hidden=hidden, heads=heads, head_dim=head_dim, world=world)
        self.group = group
        self.h, self.hd = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden // world, heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.TP_PLAN = {"k_proj.weight": ("row", 1)}

    def forward(self, x):
        B, T, D = x.shape
        if self.group is not None:      # this rank's share of the input channels
            import torch.distributed as dist

            w = dist.get_world_size(self.group)
            xk = x.view(B, T, w, -1)[:, :, dist.get_rank(self.group)]
        else:
            xk = x
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = reduce(self.k_proj(xk), self.group).view(B, T, self.h, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class GatheredHeads(nn.Module):
    """Attention computed on every rank over all heads, from K and V projections that are
    column-parallel by heads and gathered along the channel dimension
    (what ``all_gather_tensor(.., gather_dim=-1)`` does: ``all_gather_into_tensor`` along dim 0,
    then a chunk and a concatenation along channels). Q and O are replicated. Both BD pairs must be
    refused: this rank's K/V channels are sent to the other ranks, and the channels gathered
    from them were computed with their weights."""

    def __init__(self, hidden=64, heads=4, head_dim=16, world=1, group=None):
        super().__init__()
        self.cfg = dict(hidden=hidden, heads=heads, head_dim=head_dim, world=world)
        self.group = group
        self.h, self.hd = heads, head_dim
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, heads * head_dim // world, bias=False)
        self.v_proj = nn.Linear(hidden, heads * head_dim // world, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.TP_PLAN = {"k_proj.weight": ("col", head_dim), "v_proj.weight": ("col", head_dim)}

    def gather(self, t):
        if self.group is None:
            return t
        import torch.distributed._functional_collectives as funcol

        # all_gather_tensor(t, -1, group) written out: Dynamo in torch 2.11 does not trace the
        # helper that all_gather_tensor calls for a gather_dim other than 0
        # (torch._utils._maybe_view_chunk_cat), so that call breaks the graph and leaves the
        # collective between two graphs; newer Dynamo traces it into these same ops.
        gathered = funcol.all_gather_tensor(t, 0, self.group)
        return torch.cat(torch.chunk(gathered, self.cfg["world"], dim=0), dim=-1)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.gather(self.k_proj(x)).view(B, T, self.h, self.hd).transpose(1, 2)
        v = self.gather(self.v_proj(x)).view(B, T, self.h, self.hd).transpose(1, 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


# --------------------------------------------------------------------------- sharding
def skeleton(full: nn.Module, world: int, group) -> nn.Module:
    """An empty module of one rank of ``world``: ``full``'s class with local sizes (heads,
    ranks, widths divided by ``world`` where the plan splits them), reducing over ``group``."""
    cfg = dict(full.cfg)
    split = {"MLA": ["heads"], "GQABlock": ["heads", "kv_heads", "ffn"], "LowRankMLP": ["r_up", "r_down"],
             "RowParallelKeys": [], "GatheredHeads": []}[type(full).__name__]
    for k in split:
        assert cfg[k] % world == 0, (k, cfg[k], world)
        cfg[k] //= world
    if "world" in cfg:
        cfg["world"] = world
    return type(full)(**cfg, group=group)


def shard(full: nn.Module, rank: int, world: int, group) -> nn.Module:
    """The module of ``rank`` of ``world`` (:func:`skeleton`), holding copies of its slices of
    ``full``'s weights (nothing else of them)."""
    local = skeleton(full, world, group)
    state = {}
    for name, t in full.state_dict().items():
        how = full.TP_PLAN.get(name)
        if how is None:
            state[name] = t.clone()
            continue
        kind, block = how
        dim = 0 if kind == "col" else 1
        n = t.shape[dim]
        assert n % (block * world) == 0, (name, n, block, world)
        per = n // world
        state[name] = t.narrow(dim, rank * per, per).clone()
    local.load_state_dict(state)
    return local


def build(name: str, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """The unsharded model ``name`` with random weights (scaled so attention is not uniform)."""
    torch.manual_seed(seed)
    m = {"mla": MLA, "gqa": GQABlock, "lowrank": LowRankMLP, "row_keys": RowParallelKeys,
         "gathered": GatheredHeads}[name]()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 2 and ("q_proj" in n or "k_proj" in n):
                p.mul_(2.0)
    return m.to(dtype).eval()


def dtensor_plan(name: str) -> dict:
    """``parallelize_module`` plan of model ``name`` (ColwiseParallel/RowwiseParallel)."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if name == "mla":
        return {"q_proj": ColwiseParallel(), "kv_b_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}
    if name == "gqa":
        return {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
                "o_proj": RowwiseParallel(), "gate": ColwiseParallel(), "up": ColwiseParallel(),
                "down": RowwiseParallel()}
    if name == "lowrank":
        return {"v_up": ColwiseParallel(), "u_up": RowwiseParallel(), "v_down": ColwiseParallel(),
                "u_down": RowwiseParallel()}
    raise KeyError(name)


def module_plan(full: nn.Module) -> dict:
    """``TP_PLAN`` by module path, as :func:`bdpass.shard.load_sharded` takes it."""
    return {name.rpartition(".")[0]: kind for name, (kind, _) in full.TP_PLAN.items()}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


