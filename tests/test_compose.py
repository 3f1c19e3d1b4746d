"""Rewrites composed the way compressed models compose them: a low-rank chain feeding
another, in every pair of spellings, directly and through the ops that sit between real
layers (activation, norm, residual, scale, cast)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import side_by_side
from lowrank_models import AsvdLinear, Conv1DChain, MatmulChain, SvdLinear


class TransposedChain(nn.Module):
    """Weights stored (out, in) and applied as ``x @ W.T``."""

    def __init__(self, d_in, r, d_out):
        super().__init__()
        self.V = nn.Parameter(torch.randn(r, d_in) / d_in ** 0.5)
        self.U = nn.Parameter(torch.randn(d_out, r) / r ** 0.5)
        self.b = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x):
        return (x @ self.V.T) @ self.U.T + self.b


PAIRS = {
    "linear": lambda d_in, r, d_out: SvdLinear(d_in, r, d_out, bias_v=True),
    "flinear": lambda d_in, r, d_out: AsvdLinear(d_in, r, d_out),
    "conv1d": lambda d_in, r, d_out: Conv1DChain(d_in, r, d_out),
    "matmul": lambda d_in, r, d_out: MatmulChain(d_in, r, d_out),
    "matmul_T": lambda d_in, r, d_out: TransposedChain(d_in, r, d_out),
}

CONNECTORS = {
    "direct": lambda m, y: y,
    "gelu": lambda m, y: F.gelu(y),
    "layernorm": lambda m, y: m.norm(y),
    "residual": lambda m, y: y + m.skip,
    "scale": lambda m, y: y * 0.5,
    "cast": lambda m, y: y.double().to(y.dtype),
}


class Stack(nn.Module):
    def __init__(self, first: str, second: str, connector: str, d: int = 48, r: int = 20):
        super().__init__()
        self.a = PAIRS[first](d, r, d)
        self.b = PAIRS[second](d, r, d)
        self.norm = nn.LayerNorm(d)
        self.connector = connector
        self.skip = None

    def forward(self, x):
        y = self.a(x)
        if self.connector == "residual":
            self.skip = x
        return self.b(CONNECTORS[self.connector](self, y))


@pytest.mark.parametrize("first,second", list(itertools.product(sorted(PAIRS), repeat=2)))
@pytest.mark.parametrize("connector", sorted(CONNECTORS))
def test_chain_feeds_chain(first, second, connector):
    torch.manual_seed(7)
    model = Stack(first, second, connector)
    x = torch.randn(2, 5, 48)
    bd_err, ind_err, _, _, report = side_by_side(
        model, (x,), options={"cost_model": False, "min_saving": 0.0, "lowering": "aot_eager"})
    kinds = [r.kind for r in report.rewrites]
    assert kinds == ["pifa", "pifa"], str(report)
    bound = max(r.error_bound for r in report.rewrites)
    floor = 8 * torch.finfo(torch.float32).eps / 2
    assert bd_err <= bound * max(ind_err, floor), (bd_err, ind_err, bound)
