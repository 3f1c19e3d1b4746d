"""Linear layers as the analyses see them, whatever their spelling.

A *linear site* computes ``y = x @ W (+ b)`` over the last dimension of ``x``, with ``W``
a ``(d_in, d_out)`` view of a weight placeholder (``nn.Linear``'s ``(d_out, d_in)``
weight transposed, or a ``Conv1D``-style ``(d_in, d_out)`` weight) and ``b`` an optional
1-D weight of size ``d_out``. Recognised spellings: ``F.linear``/``nn.Linear``,
``matmul``/``@``/``mm`` with a (possibly transposed) weight, ``addmm(b, x, W)``, and a
bias added afterwards (``x @ W + b``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx

from .._compat import size_hint
from .ops import arg, canonical, is_transpose_2d, shape_of
from .params import ParamInfo


@dataclass
class LinearSite:
    core: torch.fx.Node
    output: torch.fx.Node            # core, or the node that adds the bias
    input: torch.fx.Node
    weight: ParamInfo
    weight_is_out_in: bool           # True: the tensor is (d_out, d_in) and W = tensor.T
    bias: ParamInfo | None
    d_in: int
    d_out: int
    bias_node: torch.fx.Node | None = None   # the separate add node, if any
    extra_nodes: list = field(default_factory=list)

    @property
    def module_path(self) -> str:
        return self.weight.module_path

    def weight_matrix(self, args: Sequence[torch.Tensor]) -> torch.Tensor:
        """``W`` as ``(d_in, d_out)`` from the runtime arguments of the graph."""
        t = args[self.weight.index]
        return t.t() if self.weight_is_out_in else t

    def bias_vector(self, args: Sequence[torch.Tensor]) -> torch.Tensor | None:
        return None if self.bias is None else args[self.bias.index]

    @property
    def tokens(self) -> int:
        """Rows the site processes for the example inputs (product of leading dims)."""
        shp = shape_of(self.input) or ()
        n = 1
        for d in shp[:-1]:
            h = size_hint(d)
            n *= h if h is not None else 1
        return n

    @property
    def param_count(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias is not None else 0)


def _weight_expr(node, params: dict) -> tuple[ParamInfo, bool] | None:
    """(param, transposed) if ``node`` is a 2-D weight or its transpose."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node in params:
        return (params[node], False) if params[node].tensor.dim() == 2 else None
    if node.op in ("call_function", "call_method") and is_transpose_2d(node):
        src = node.args[0]
        if src in params and params[src].tensor.dim() == 2:
            return params[src], True
    return None


def _bias_param(node, params: dict, d_out: int) -> ParamInfo | None:
    if isinstance(node, torch.fx.Node) and node in params:
        p = params[node]
        if p.tensor.dim() == 1 and p.tensor.shape[0] == d_out:
            return p
    return None


def _is_one(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and v == 1)


def match_linear(node: torch.fx.Node, params: dict) -> LinearSite | None:
    """The linear site whose core op is ``node``, or None."""
    name = canonical(node)
    if name == "linear":
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        we = _weight_expr(w, params)
        if we is None:
            return None
        p, transposed = we
        # F.linear computes x @ w.T: W = p.T unless the graph already transposed p.
        out_in = not transposed
        d_out, d_in = (p.tensor.shape if out_in else p.tensor.shape[::-1])
        bias = None
        if b is not None:
            bias = _bias_param(b, params, d_out)
            if bias is None:
                return None
    elif name == "matmul":
        x, w = arg(node, 0, "input"), arg(node, 1, "other")
        we = _weight_expr(w, params)
        xs = shape_of(x)
        if we is None or xs is None or len(xs) < 1:
            return None
        p, transposed = we
        out_in = transposed
        d_out, d_in = (p.tensor.shape if out_in else p.tensor.shape[::-1])
        bias = None
    elif name == "addmm":
        b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
        if not (_is_one(node.kwargs.get("beta")) and _is_one(node.kwargs.get("alpha"))):
            return None
        we = _weight_expr(w, params)
        if we is None:
            return None
        p, transposed = we
        out_in = transposed
        d_out, d_in = (p.tensor.shape if out_in else p.tensor.shape[::-1])
        bias = _bias_param(b, params, d_out)
        if bias is None:
            return None
    else:
        return None
    xs = shape_of(x)
    if xs is None or not xs or size_hint(xs[-1]) != d_in:
        return None
    site = LinearSite(core=node, output=node, input=x, weight=p, weight_is_out_in=out_in,
                      bias=bias, d_in=int(d_in), d_out=int(d_out))
    if bias is None:
        _absorb_bias_add(site, params)
    return site


def _absorb_bias_add(site: LinearSite, params: dict) -> None:
    """Fold ``y + b`` (b a 1-D weight of size d_out) following the core into the site."""
    users = list(site.core.users)
    if len(users) != 1:
        return
    u = users[0]
    if canonical(u) != "add" or u.kwargs.get("alpha") is not None or len(u.args) != 2:
        return
    other = u.args[1] if u.args[0] is site.core else u.args[0]
    b = _bias_param(other, params, site.d_out)
    if b is None or shape_of(u) != shape_of(site.core):
        return
    site.bias, site.bias_node, site.output = b, u, u


def find_linears(gm: torch.fx.GraphModule, params: dict) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            s = match_linear(node, params)
            if s is not None:
                sites.append(s)
    return sites
