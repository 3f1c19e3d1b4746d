"""Canonical names for the torch-level ops found in Dynamo graphs.

Dynamo spells one operation many ways (``torch.matmul``, ``operator.matmul``,
``x.matmul``; ``x.t()``, ``x.T``, ``x.transpose(0, 1)``). The analyses look at
``canonical(node)`` and ``arg(node, i, name)`` only, never at the spelling.

Attribute views (``x.T``, ``x.mT``, ``x.H``, ``x.mH``) are spelled by the Dynamo release:
``getattr(x, "T")`` call_function nodes up to torch 2.13, the ATen view ops
``aten.numpy_T``/``aten.mT``/``aten.matrix_H``/``aten.mH`` from 2.14 (see
:func:`view_attribute`). Either way, on a tensor of rank 2 or less ``T``/``mT`` are ``t``; on
a higher rank ``x.T`` reverses *all* dims (canonical ``"T"``) and ``x.mT`` swaps the last two
(canonical ``"mT"``). ``H``/``mH``/``adjoint()`` are the same on real tensors.
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
    attr = view_attribute(node)
    if attr is not None:
        return _attr_view(attr, node.args[0])
    if node.op == "call_function":
        try:
            return _FUNCS.get(node.target)
        except TypeError:       # unhashable target
            return None
    if node.op == "call_method":
        if node.target == "type":           # x.type(dtype) casts; x.type() is a string
            return "to" if len(node.args) > 1 or "dtype" in node.kwargs else None
        return _METHODS.get(node.target)
    return None


def _aten_view_attrs() -> dict[Any, str]:
    out: dict[Any, str] = {}
    for op, attr in (("numpy_T", "T"), ("mT", "mT"), ("matrix_H", "H"), ("mH", "mH"), ("adjoint", "mH")):
        packet = getattr(torch.ops.aten, op, None)
        if packet is None:
            continue
        out[packet] = attr
        for overload in packet.overloads():
            out[getattr(packet, overload)] = attr
    out[torch.adjoint] = out[torch.Tensor.adjoint] = "mH"
    return out


_ATEN_VIEW_ATTRS = _aten_view_attrs()
_VIEW_METHODS = {"adjoint": "mH"}


def view_attribute(node: Any) -> str | None:
    """Which attribute view a node spells, whatever the Dynamo release: ``"T"``, ``"mT"``,
    ``"H"`` or ``"mH"`` (``adjoint()`` is ``mH``), else None."""
    if not isinstance(node, torch.fx.Node) or not node.args:
        return None
    if node.op == "call_function":
        if node.target is builtins.getattr:
            return node.args[1] if len(node.args) == 2 and node.args[1] in ("T", "mT", "H", "mH") else None
        try:
            return _ATEN_VIEW_ATTRS.get(node.target)
        except TypeError:
            return None
    if node.op == "call_method":
        return _VIEW_METHODS.get(node.target)
    return None


def _attr_view(attr: str, src: Any) -> str | None:
    v = _example(src)
    if not isinstance(v, torch.Tensor):
        return None
    if attr in ("H", "mH") and v.is_complex():
        return None                         # conjugates: not a pure view of the values
    if v.dim() <= 2:
        return "t"
    return "T" if attr in ("T", "H") else "mT"


def op_label(node: torch.fx.Node) -> str:
    """A short, release-stable name of a call node's target: the method name, the function's
    ``__name__``, or ``aten.<op>`` for an ATen operator (its overload dropped)."""
    t = node.target
    if node.op == "call_method":
        return str(t)
    if isinstance(t, torch._ops.OpOverload):
        t = t.overloadpacket
    if isinstance(t, torch._ops.OpOverloadPacket):
        return f"{t._qualified_op_name.replace('::', '.')}"
    return getattr(t, "__name__", str(t))


# Ops that compute new values from the channels they receive (activations, norms, reductions,
# position-dependent rotations, comparisons, ...). The channel-layout analysis treats any op it
# does not model as one of these: it marks the channels touched, so a rewrite is only missed,
# never wrong. This list names the ones known to really change values; an op that reaches
# tracked channels and is in neither the modelled ops (:func:`canonical`) nor this list is a
# spelling the analysis has not learned (``tests/test_spelling_coverage.py`` fails on it).
VALUE_OPS = frozenset({
    # activations and element-wise math
    "gelu", "silu", "relu", "tanh", "sigmoid", "softplus", "elu", "selu", "leaky_relu", "mish", "hardtanh",
    "exp", "log", "pow", "sqrt", "rsqrt", "square", "abs", "sin", "cos", "clamp", "clamp_min", "clamp_max",
    "erf", "reciprocal", "floor", "round", "sign", "glu", "softmax", "log_softmax",
    # norms and reductions
    "layer_norm", "rms_norm", "group_norm", "batch_norm", "normalize", "mean", "sum", "var", "std",
    "norm", "amax", "amin", "max", "min", "var_mean", "logsumexp", "cumsum",
    # rotations and complex views (RoPE)
    "view_as_complex", "view_as_real", "rotate_half", "polar", "roll", "flip",
    # masking, selection by value, comparisons
    "masked_fill", "where", "eq", "ne", "gt", "lt", "ge", "le", "topk", "sort", "argmax", "scatter",
    "scatter_add", "index_add", "index_copy", "gather", "tril", "triu",
    # contractions the analysis does not pair, convolutions, embeddings
    "conv1d", "conv2d", "conv3d", "embedding", "outer", "dot",
})


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
