"""Small low-rank chains in the spellings real models use."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SvdLinear(nn.Module):
    """SVD-LLM style: ``u_proj(v_proj(x))``."""

    def __init__(self, d_in, r, d_out, bias_v=False, bias_u=True):
        super().__init__()
        self.v_proj = nn.Linear(d_in, r, bias=bias_v)
        self.u_proj = nn.Linear(r, d_out, bias=bias_u)

    def forward(self, x):
        return self.u_proj(self.v_proj(x))


def to_pairs(layers) -> None:
    """Every ``nn.Linear`` of the attention and MLP of transformers decoder ``layers`` made
    a rank-50% :class:`SvdLinear` (a low-rank checkpoint of a custom class)."""
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, nn.Linear):
                    r = min(lin.in_features, lin.out_features) // 2
                    setattr(parent, name, SvdLinear(lin.in_features, r, lin.out_features,
                                                    bias_u=lin.bias is not None))


def random_linears(model: nn.Module, seed: int = 1) -> nn.Module:
    """Every ``nn.Linear`` weight of ``model`` drawn with variance ``1 / in_features``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
    return model


class AsvdLinear(nn.Module):
    """ASVD style: ``F.linear(F.linear(x, V), U) + bias``."""

    def __init__(self, d_in, r, d_out, bias=True):
        super().__init__()
        self.V = nn.Parameter(torch.randn(r, d_in) / d_in ** 0.5)
        self.U = nn.Parameter(torch.randn(d_out, r) / r ** 0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1) if bias else None

    def forward(self, x):
        y = F.linear(F.linear(x, self.V), self.U)
        return y + self.bias if self.bias is not None else y


class Conv1D(nn.Module):
    """GPT-2's Conv1D: weight is (d_in, d_out), ``addmm`` over a flattened input."""

    def __init__(self, nx, nf):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1DChain(nn.Module):
    def __init__(self, d_in, r, d_out):
        super().__init__()
        self.down = Conv1D(d_in, r)
        self.up = Conv1D(r, d_out)

    def forward(self, x):
        return self.up(self.down(x))


class MatmulChain(nn.Module):
    """``x @ A``, flattened to 2-D in between, ``@ B + b``."""

    def __init__(self, d_in, r, d_out):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_in, r) / d_in ** 0.5)
        self.B = nn.Parameter(torch.randn(r, d_out) / r ** 0.5)
        self.b = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        h = (x @ self.A).reshape(-1, self.A.shape[1])
        return (h @ self.B + self.b).reshape(*x.shape[:-1], -1)


class LowRankMLP(nn.Module):
    """A residual block whose two projections are low-rank chains."""

    def __init__(self, d, r, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = SvdLinear(d, r, hidden)
        self.down = SvdLinear(hidden, r, d)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(self.norm(x))))


class SharedIntermediate(nn.Module):
    """The rank-r intermediate is also returned: the chain must not be rewritten."""

    def __init__(self, d_in, r, d_out):
        super().__init__()
        self.a = nn.Linear(d_in, r)
        self.b = nn.Linear(r, d_out)

    def forward(self, x):
        h = self.a(x)
        return self.b(h), h.sum(-1)


class LoraLinear(nn.Module):
    """``x W + (x A) B`` with a rank-4 adapter."""

    def __init__(self, d, r=4):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x))


class Dense(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.l1 = nn.Linear(d, 2 * d)
        self.l2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))
