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
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------- collectives
# Communication between ranks (torch.distributed). Dynamo traces the functional collectives
# (``torch.distributed._functional_collectives``, and ``dist.all_reduce`` & co. remapped to
# them) into ``_c10d_functional`` ops, each followed by ``wait_tensor``; graphs built by other
# tracers may hold the legacy ``c10d_functional`` ops or the Python wrappers themselves.
# Tensor-parallel DTensor modules add placement changes (``DTensor.from_local``,
# ``.redistribute``, ``.to_local``). None of these is an identity on the values of a rank;
# :class:`Collective` says what each one does, and :mod:`.layout` models it explicitly.

# kind of each op: "all_reduce" (elementwise sum/avg/max... over ranks), "all_gather"
# (concatenation of every rank's tensor along ``dim``), "reduce_scatter" (this rank's slice
# along ``dim`` of the sum over ranks), "all_to_all" (blocks exchanged along dim 0),
# "broadcast" (one rank's tensor), "p2p" (send/receive), "wait" (completion: returns its
# input's value), "dtensor" (a DTensor placement change: local <-> global views and the
# collectives they imply)
_COLLECTIVE_OPS = {
    # name: (kind, reduce-op argument index or None, dim, in-place, coalesced)
    "all_reduce": ("all_reduce", 1, None, False, False),
    "all_reduce_": ("all_reduce", 1, None, True, False),
    "all_reduce_coalesced": ("all_reduce", 1, None, False, True),
    "all_reduce_coalesced_": ("all_reduce", 1, None, True, True),
    "all_gather_into_tensor": ("all_gather", None, 0, False, False),
    "all_gather_into_tensor_out": ("all_gather", None, 0, False, False),
    "all_gather_into_tensor_coalesced": ("all_gather", None, 0, False, True),
    "reduce_scatter_tensor": ("reduce_scatter", 1, 0, False, False),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1, 0, False, True),
    "all_to_all_single": ("all_to_all", None, 0, False, False),
    "broadcast": ("broadcast", None, None, False, False),
    "broadcast_": ("broadcast", None, None, True, False),
    "isend": ("p2p", None, None, False, False),
    "irecv": ("p2p", None, None, False, False),
    "batch_p2p_ops": ("p2p", None, None, False, True),
    "wait_tensor": ("wait", None, None, False, False),
}
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd")
# torch.distributed's in-place collectives (c10d ops and the Python API): kind, reduce-op
# keyword/position
_C10D_INPLACE = {"allreduce_": "all_reduce", "allgather_": "all_gather", "_allgather_base_": "all_gather",
                 "reduce_scatter_": "reduce_scatter", "_reduce_scatter_base_": "reduce_scatter",
                 "alltoall_": "all_to_all", "alltoall_base_": "all_to_all", "broadcast_": "broadcast",
                 "send": "p2p", "recv_": "p2p", "recv_any_source_": "p2p", "reduce_": "all_reduce",
                 "gather_": "all_gather", "scatter_": "broadcast"}
_DTENSOR_METHODS = {"to_local", "redistribute", "full_tensor"}
# what a verdict about DTensors advises
DTENSOR_ADVICE = ("prepare the model before sharding it, or shard it by hand with local tensors and functional "
                  "collectives (docs/serving.md)")


@dataclass(frozen=True)
class Collective:
    kind: str
    name: str                   # as written in verdicts, e.g. "_c10d_functional.all_reduce"
    reduce_op: str | None = None
    dim: int | None = None      # dim along which ranks' tensors are concatenated or sliced
    inplace: bool = False
    coalesced: bool = False     # lists of tensors in, list out


def _op_qualname(target: Any) -> str | None:
    """``namespace::name`` of an OpOverload or OpOverloadPacket, else None."""
    if isinstance(target, torch._ops.OpOverload):
        target = target.overloadpacket
    if isinstance(target, torch._ops.OpOverloadPacket):
        return getattr(target, "_qualified_op_name", None)
    return None


def _funcol_wrappers() -> dict:
    """The Python functions of ``torch.distributed._functional_collectives`` (and
    ``torch.distributed``'s in-place API), when a tracer keeps them as graph targets."""
    out: dict = {}
    try:
        import torch.distributed as dist
        import torch.distributed._functional_collectives as fc
    except Exception:           # a build of torch without distributed
        return out
    # name: (kind, reduce-op position, dim position or fixed dim, in-place, coalesced)
    table = {
        "all_reduce": ("all_reduce", 1, None, False, False),
        "all_reduce_coalesced": ("all_reduce", 1, None, False, True),
        "all_gather_tensor": ("all_gather", None, ("arg", 1, "gather_dim", 0), False, False),
        "all_gather_tensor_autograd": ("all_gather", None, ("arg", 1, "gather_dim", 0), False, False),
        "all_gather_into_tensor_coalesced": ("all_gather", None, 0, False, True),
        "reduce_scatter_tensor": ("reduce_scatter", 1, ("arg", 2, "scatter_dim", 0), False, False),
        "reduce_scatter_tensor_autograd": ("reduce_scatter", 1, ("arg", 2, "scatter_dim", 0), False, False),
        "reduce_scatter_tensor_coalesced": ("reduce_scatter", 1, ("arg", 2, "scatter_dim", 0), False, True),
        "all_to_all_single": ("all_to_all", None, 0, False, False),
        "all_to_all_single_autograd": ("all_to_all", None, 0, False, False),
        "broadcast": ("broadcast", None, None, False, False),
        "wait_tensor": ("wait", None, None, False, False),
    }
    for name, spec in table.items():
        fn = getattr(fc, name, None)
        if fn is not None:
            out[fn] = ("funcol." + name, spec)
    for name, kind in (("all_reduce", "all_reduce"), ("all_gather_into_tensor", "all_gather"),
                       ("reduce_scatter_tensor", "reduce_scatter"), ("all_to_all_single", "all_to_all"),
                       ("broadcast", "broadcast"), ("reduce", "all_reduce")):
        fn = getattr(dist, name, None)
        if fn is not None and fn not in out:
            red = ("kw", "op") if kind == "all_reduce" else None
            out[fn] = ("torch.distributed." + name, (kind, red, 0 if kind in ("all_gather", "reduce_scatter",
                                                                              "all_to_all") else None, True, False))
    return out


_WRAPPERS: dict | None = None


def _dtensor_functions() -> set:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        return set()
    return {getattr(DTensor, n) for n in ("from_local", "to_local", "redistribute", "full_tensor")
            if hasattr(DTensor, n)}


_DTENSOR_FUNCS: set | None = None
# torch 2.11's Dynamo records DTensor placement changes as call_function nodes on closures of
# its own (the placements bound in), named "prim from_local" (``DTensor.from_local``),
# "prim_redistribute" and "prim_to_local" (the methods); newer Dynamo records
# ``DTensor.from_local`` and the methods themselves.
_DYNAMO_DTENSOR_WRAPPERS = {"prim from_local": "from_local", "prim_redistribute": "redistribute",
                            "prim_to_local": "to_local"}


def _dynamo_dtensor_wrapper(target: Any) -> str | None:
    """The DTensor function or method a Dynamo wrapper stands for (``from_local``...), or None."""
    if not callable(target) or not str(getattr(target, "__module__", "")).startswith("torch._dynamo."):
        return None
    return _DYNAMO_DTENSOR_WRAPPERS.get(getattr(target, "__name__", None))


def _reduce_name(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v.lower()
    name = getattr(v, "name", None)         # ReduceOp.RedOpType
    if isinstance(name, str):
        return name.lower()
    return str(v).rsplit(".", 1)[-1].lower()


def collective(node: Any) -> Collective | None:
    """What a communication node does (None for any other node)."""
    global _WRAPPERS, _DTENSOR_FUNCS
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "call_method":
        if node.target in _DTENSOR_METHODS:
            return Collective("dtensor", f"DTensor.{node.target}")
        return None
    if node.op != "call_function":
        return None
    target = node.target
    qual = _op_qualname(target)
    if qual is not None:
        ns, _, name = qual.partition("::")
        if ns in _COLLECTIVE_NAMESPACES:
            spec = _COLLECTIVE_OPS.get(name)
            if spec is None:
                return Collective("p2p" if "send" in name or "recv" in name else "other", f"{ns}.{name}")
            kind, red, dim, inplace, coalesced = spec
            if ns == "c10d_functional" and red is not None:
                red = 1                     # legacy schema: (self, reduceOp, tag, ranks, group_size)
            rop = _reduce_name(arg(node, red)) if red is not None else None
            return Collective(kind, f"{ns}.{name}", rop, dim, inplace, coalesced)
        if ns == "c10d":
            kind = _C10D_INPLACE.get(name, "other")
            return Collective(kind, f"c10d.{name}", None, 0 if kind in ("all_gather", "reduce_scatter",
                                                                         "all_to_all") else None,
                              True, kind in ("all_gather", "all_to_all"))
        return None
    if _WRAPPERS is None:
        _WRAPPERS = _funcol_wrappers()
        _DTENSOR_FUNCS = _dtensor_functions()
    try:
        if target in _DTENSOR_FUNCS:
            return Collective("dtensor", f"DTensor.{getattr(target, '__name__', target)}")
        wrapped = _dynamo_dtensor_wrapper(target)
        if wrapped is not None:
            return Collective("dtensor", f"DTensor.{wrapped}")
        hit = _WRAPPERS.get(target)
    except TypeError:                       # unhashable target
        return None
    if hit is None:
        return None
    name, (kind, red, dim, inplace, coalesced) = hit
    if isinstance(red, tuple):
        rop = _reduce_name(node.kwargs.get(red[1], "sum"))
    else:
        rop = _reduce_name(arg(node, red, "reduceOp")) if red is not None else None
    if isinstance(dim, tuple):
        dim = arg(node, dim[1], dim[2], dim[3])
        dim = dim if isinstance(dim, int) else None
    return Collective(kind, name, rop, dim, inplace, coalesced)


def collective_stand_in(node: torch.fx.Node, args: tuple, kwargs: dict) -> Any:
    """A local value of the shape and dtype a functional collective ``node`` returns, computed
    from this rank's input alone (no communication): the input itself for an all-reduce,
    broadcast or wait, ``group_size`` copies concatenated for an all-gather, the first slice
    for a reduce-scatter, the input for an even all-to-all.

    For checks that run a graph more than once on one rank (validation of a rewrite, runs
    in float64): their extra runs must not communicate, or ranks that decided differently
    (one rewrote, another did not) would pair one rank's check with another's real call.
    Both graphs of a check see the same stand-ins, and no rewrite crosses a collective (the
    analysis refuses it), so a rewrite that changes what a collective is given still shows
    at the outputs. Raises ``NotImplementedError`` for what has no local stand-in
    (point-to-point, in-place ``torch.distributed`` calls, DTensor placement changes)."""
    c = collective(node)
    if c is None:
        raise ValueError(f"{node.name} is not a collective")
    x = args[0] if args else None

    def one(t: torch.Tensor, k: int | None) -> torch.Tensor:
        if c.kind in ("wait",):
            return t
        if c.kind in ("all_reduce", "broadcast"):
            return t if c.inplace else t.clone()
        out = example_shape(k)
        d = (c.dim or 0) % max(t.dim(), 1)
        if out is None and c.name.startswith("_c10d_functional") and c.kind in ("all_gather", "reduce_scatter"):
            n = args[1] if c.kind == "all_gather" else args[2]        # group_size
            if isinstance(n, int):
                out = list(t.shape)
                out[d] = out[d] * n if c.kind == "all_gather" else out[d] // n
        if c.kind == "all_gather":
            n = out[d] // t.shape[d] if out is not None and t.shape[d] else None
            if n is None:
                raise NotImplementedError(f"{c.name}: unknown group size")
            return torch.cat([t] * n, dim=d)
        if c.kind == "reduce_scatter":
            n = t.shape[d] // out[d] if out is not None and out[d] else None
            if n is None:
                raise NotImplementedError(f"{c.name}: unknown group size")
            return t.chunk(n, dim=d)[0].clone()
        if c.kind == "all_to_all":
            if out is not None and tuple(out) == tuple(t.shape):
                return t.clone()
            raise NotImplementedError(f"{c.name} with uneven splits")
        raise NotImplementedError(c.name)

    def example_shape(k: int | None):
        from .._compat import example_value, size_hint

        v = example_value(node)
        if k is not None and isinstance(v, (list, tuple)):
            v = v[k]
        if not isinstance(v, torch.Tensor):
            return None
        hints = [size_hint(s) for s in v.shape]
        return None if None in hints else hints

    if c.kind == "wait":
        return x
    if c.kind in ("dtensor", "p2p", "other") or c.name.startswith(("c10d.", "torch.distributed.")):
        raise NotImplementedError(f"{c.name} has no local stand-in")
    if c.coalesced:
        return [one(t, k) for k, t in enumerate(x)]
    if not isinstance(x, torch.Tensor):
        raise NotImplementedError(f"{c.name}: input is not a tensor")
    return one(x, None)
