"""Canonical names for the torch-level ops found in Dynamo graphs.

Dynamo spells one operation many ways (``torch.matmul``, ``operator.matmul``,
``x.matmul``; ``x.t()``, ``x.T``, ``x.transpose(0, 1)``). The analyses look at
``canonical(node)`` and ``arg(node, i, name)`` only, never at the spelling.
"""
from __future__ import annotations

import builtins
import operator
from typing import Any

import torch
import torch.nn.functional as F
import torch.fx

_FUNCS: dict[Any, str] = {}


def _reg(name: str, *fns: Any) -> None:
    for fn in fns:
        if fn is not None:
            _FUNCS[fn] = name


_reg("linear", torch._C._nn.linear, F.linear)
_reg("matmul", operator.matmul, torch.matmul, torch.Tensor.matmul, torch.mm, torch.Tensor.mm,
     torch.bmm, torch.Tensor.bmm)
_reg("addmm", torch.addmm, torch.Tensor.addmm)
_reg("add", operator.add, torch.add, torch.Tensor.add, operator.iadd)
_reg("sub", operator.sub, torch.sub, torch.Tensor.sub)
_reg("mul", operator.mul, torch.mul, torch.Tensor.mul, operator.imul)
_reg("div", operator.truediv, torch.div, torch.Tensor.div, operator.itruediv)
_reg("neg", operator.neg, torch.neg, torch.Tensor.neg)
_reg("t", torch.t, torch.Tensor.t)
_reg("transpose", torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.swapdims)
_reg("permute", torch.permute, torch.Tensor.permute)
_reg("reshape", torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
_reg("flatten", torch.flatten, torch.Tensor.flatten)
_reg("unflatten", torch.unflatten, torch.Tensor.unflatten)
_reg("squeeze", torch.squeeze, torch.Tensor.squeeze)
_reg("unsqueeze", torch.unsqueeze, torch.Tensor.unsqueeze)
_reg("contiguous", torch.Tensor.contiguous)
_reg("clone", torch.clone, torch.Tensor.clone)
_reg("dropout", F.dropout, torch.dropout)
_reg("cat", torch.cat, torch.concat, torch.concatenate)
_reg("split", torch.split, torch.Tensor.split)
_reg("chunk", torch.chunk, torch.Tensor.chunk)
_reg("narrow", torch.narrow, torch.Tensor.narrow)
_reg("getitem", operator.getitem)
_reg("expand", torch.Tensor.expand)
_reg("repeat_interleave", torch.repeat_interleave, torch.Tensor.repeat_interleave)
_reg("sdpa", torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_reg("softmax", torch.softmax, torch.Tensor.softmax, F.softmax, torch._C._nn.softmax if hasattr(torch._C._nn, "softmax") else None)

_METHODS = {
    "view": "reshape", "reshape": "reshape", "t": "t", "transpose": "transpose", "permute": "permute",
    "matmul": "matmul", "mm": "matmul", "bmm": "matmul", "addmm": "addmm", "add": "add", "add_": "add",
    "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div", "neg": "neg", "contiguous": "contiguous",
    "clone": "clone", "flatten": "flatten", "unflatten": "unflatten", "squeeze": "squeeze",
    "unsqueeze": "unsqueeze", "split": "split", "chunk": "chunk", "narrow": "narrow", "expand": "expand",
    "repeat_interleave": "repeat_interleave", "to": "to", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "type_as": "type_as", "softmax": "softmax",
    "swapaxes": "transpose", "swapdims": "transpose", "view_as": "view_as", "reshape_as": "view_as",
}

_CAST_METHOD_DTYPE = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                      "double": torch.float64}


def canonical(node: Any) -> str | None:
    """Canonical op name of a node, or None for ops bdpass does not model."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) == 2:
            attr = node.args[1]
            return {"T": "t", "mT": "t"}.get(attr)
        return _FUNCS.get(node.target)
    if node.op == "call_method":
        return _METHODS.get(node.target)
    return None


def cast_method_dtype(node: torch.fx.Node) -> torch.dtype | None:
    if node.op == "call_method":
        return _CAST_METHOD_DTYPE.get(node.target)
    return None


def arg(node: torch.fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def shape_of(node: Any) -> tuple | None:
    from .._compat import example_value

    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def dtype_of(node: Any) -> torch.dtype | None:
    from .._compat import example_value

    v = example_value(node)
    if isinstance(v, torch.Tensor):
        return v.dtype
    return None


def is_transpose_2d(node: torch.fx.Node) -> bool:
    """True if ``node`` swaps the two dims of a 2-D tensor."""
    name = canonical(node)
    if name == "t":
        return True
    shp = shape_of(node.args[0]) if node.args else None
    if shp is None or len(shp) != 2:
        return False
    if name == "transpose":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        return isinstance(d0, int) and isinstance(d1, int) and {d0 % 2, d1 % 2} == {0, 1}
    if name == "permute":
        dims = node.args[1:] if len(node.args) > 2 else (arg(node, 1, "dims") or ())
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return [d % 2 if isinstance(d, int) else None for d in dims] == [1, 0]
    return False
