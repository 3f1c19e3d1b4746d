"""Canonical names for the torch-level ops found in Dynamo graphs.

Dynamo spells one operation many ways (``torch.matmul``, ``operator.matmul``,
``x.matmul``; ``x.t()``, ``x.T``, ``x.transpose(0, 1)``). The analyses look at
``canonical(node)`` and ``arg(node, i, name)`` only, never at the spelling.

Attribute views reach the graph as ``getattr(x, "T")`` call_function nodes: on a tensor of
rank 2 or less ``T``/``mT`` are ``t``; on a higher rank ``x.T`` reverses *all* dims
(canonical ``"T"``) and ``x.mT`` swaps the last two (canonical ``"mT"``). ``H``/``mH`` are
the same on real tensors.
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
_reg("baddbmm", torch.baddbmm, torch.Tensor.baddbmm)
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
_reg("broadcast_to", torch.broadcast_to, torch.Tensor.broadcast_to)
_reg("expand_as", torch.Tensor.expand_as)
_reg("movedim", torch.movedim, torch.moveaxis, torch.Tensor.movedim, torch.Tensor.moveaxis)
_reg("index_select", torch.index_select, torch.Tensor.index_select)
_reg("select", torch.select, torch.Tensor.select)
_reg("unbind", torch.unbind, torch.Tensor.unbind)
_reg("repeat", torch.Tensor.repeat)
_reg("einsum", torch.einsum, getattr(torch.functional, "einsum", None))
_reg("detach", torch.detach, torch.Tensor.detach)
_reg("alias", getattr(torch.ops.aten.alias, "default", None), torch.ops.aten.alias)
_reg("cast", torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.double)
_reg("to", torch.Tensor.to)
_reg("repeat_interleave", torch.repeat_interleave, torch.Tensor.repeat_interleave)
_reg("sdpa", torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
_reg("softmax", torch.softmax, torch.Tensor.softmax, F.softmax, torch._C._nn.softmax if hasattr(torch._C._nn, "softmax") else None)

_METHODS = {
    "view": "reshape", "reshape": "reshape", "t": "t", "transpose": "transpose", "permute": "permute",
    "matmul": "matmul", "mm": "matmul", "bmm": "matmul", "addmm": "addmm", "baddbmm": "baddbmm", "add": "add", "add_": "add",
    "sub": "sub", "mul": "mul", "mul_": "mul", "div": "div", "neg": "neg", "contiguous": "contiguous",
    "clone": "clone", "flatten": "flatten", "unflatten": "unflatten", "squeeze": "squeeze",
    "unsqueeze": "unsqueeze", "split": "split", "chunk": "chunk", "narrow": "narrow", "expand": "expand",
    "repeat_interleave": "repeat_interleave", "to": "to", "float": "cast", "half": "cast",
    "bfloat16": "cast", "double": "cast", "type_as": "type_as", "softmax": "softmax",
    "swapaxes": "transpose", "swapdims": "transpose", "view_as": "view_as", "reshape_as": "view_as",
    "detach": "detach", "broadcast_to": "broadcast_to", "expand_as": "expand_as", "movedim": "movedim",
    "moveaxis": "movedim", "index_select": "index_select", "select": "select", "unbind": "unbind",
    "repeat": "repeat",
}

_CAST_METHOD_DTYPE = {"float": torch.float32, "half": torch.float16, "bfloat16": torch.bfloat16,
                      "double": torch.float64}


def canonical(node: Any) -> str | None:
    """Canonical op name of a node, or None for ops bdpass does not model."""
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_function":
        if node.target is builtins.getattr and len(node.args) == 2:
            return _attr_view(node)
        try:
            return _FUNCS.get(node.target)
        except TypeError:       # unhashable target
            return None
    if node.op == "call_method":
        if node.target == "type":           # x.type(dtype) casts; x.type() is a string
            return "to" if len(node.args) > 1 or "dtype" in node.kwargs else None
        return _METHODS.get(node.target)
    return None


def _attr_view(node: torch.fx.Node) -> str | None:
    attr = node.args[1]
    if attr not in ("T", "mT", "H", "mH"):
        return None
    src = node.args[0]
    v = _example(src)
    if not isinstance(v, torch.Tensor):
        return None
    if attr in ("H", "mH") and v.is_complex():
        return None                         # conjugates: not a pure view of the values
    if v.dim() <= 2:
        return "t"
    return "T" if attr in ("T", "H") else "mT"


def _example(node: Any) -> Any:
    from .._compat import example_value

    return example_value(node)


def cast_method_dtype(node: torch.fx.Node) -> torch.dtype | None:
    if node.op == "call_method":
        return _CAST_METHOD_DTYPE.get(node.target)
    if node.op == "call_function" and getattr(node.target, "__objclass__", None) is torch._C.TensorBase:
        return _CAST_METHOD_DTYPE.get(getattr(node.target, "__name__", None))
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
    shp = shape_of(node.args[0]) if node.args else None
    if name == "t":
        return shp is None or len(shp) == 2
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
