"""Communication between ranks: which graph nodes are collectives, and what they do.

:func:`collective` says what a communication node does (:class:`Collective`: an all-reduce,
all-gather, reduce-scatter, all-to-all, broadcast, point-to-point, ``wait_tensor`` or a
DTensor placement change), whatever tracer spelled it. :func:`collective_stand_in` gives
the local value that checks run instead of communicating (:mod:`bdpass.graph.exact`).
:class:`_CollectiveOps` (mixed into the driver's :class:`~.driver._Analysis`) models what
each one does to this rank's channel layouts; ``DTENSOR_ADVICE`` is what a verdict about
DTensors advises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ..._compat import example_value, size_hint
from ..ops import arg, shape_of
from .algebra import UNTRACKED, ChannelLayout, _broadcast_to_rank

# Communication between ranks (torch.distributed). Dynamo traces the functional collectives
# (``torch.distributed._functional_collectives``, and ``dist.all_reduce`` & co. remapped to
# them) into ``_c10d_functional`` ops, each followed by ``wait_tensor``; graphs built by other
# tracers may hold the legacy ``c10d_functional`` ops or the Python wrappers themselves.
# Tensor-parallel DTensor modules add placement changes (``DTensor.from_local``,
# ``.redistribute``, ``.to_local``). None of these is an identity on the values of a rank;
# :class:`Collective` says what each one does, and :class:`_CollectiveOps` models it explicitly.

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


class _CollectiveOps:
    """Handlers of collectives in the channel-layout analysis."""

    def op_collective(self, node: torch.fx.Node, c: Collective) -> None:
        """Communication between ranks, modelled for what it does to this rank's channels.

        Tensor parallelism runs one graph per rank (SPMD): another rank's copy of a value has
        the same layout here, but its channels come from *that* rank's weights (its heads, its
        slice of a rank or input dimension), and every rank factorizes its own weights. So:

        * what this rank sends (the input of any collective) escapes: another rank cannot
          fold this rank's basis into what it computes from it;
        * what it receives is touched by the collective: an all-reduce is linear (a sum over
          ranks of tensors with this layout) but each term is in its own rank's basis, so a
          rank cannot fold its partner with one basis; an all-gather is a concatenation along
          its dim of every rank's tensor (the layout is concatenated, every block touched: the
          other blocks are other ranks' channels); a reduce-scatter is this rank's slice of a
          sum; all-to-all and broadcast exchange whole blocks.
        * ``wait_tensor`` only waits: its output is its input's value (the layout passes).
        * DTensor placement changes (``from_local``/``redistribute``/``to_local``): the graph
          computes on DTensors, which bd does not rewrite; channels crossing them are touched.
        """
        if c.kind == "wait":
            return self.op_identity(node)
        if c.kind == "dtensor":
            return self.opaque(node, f"DTensor placement change ({c.name}) between projection and contraction: "
                                     f"the graph computes on DTensors (global shapes, placements), which bd does "
                                     f"not rewrite; {DTENSOR_ADVICE}")
        what = f"{c.name} ({c.reduce_op})" if c.reduce_op else c.name
        sent = f"sent to the other ranks by {what}: a rank cannot fold its partner with another rank's basis"
        received = {
            "all_reduce": "a sum over ranks of terms computed with each rank's own weights",
            "reduce_scatter": "this rank's slice of a sum over ranks of terms computed with each rank's own weights",
            "all_gather": "channels gathered from every rank, each computed with its own rank's weights",
            "all_to_all": "blocks exchanged between ranks, each computed with its own rank's weights",
            "broadcast": "one rank's values, computed with that rank's weights",
        }.get(c.kind)
        first = node.args[0] if node.args else None
        items = list(first) if c.coalesced and isinstance(first, (list, tuple)) else [first]
        if received is None or c.name.startswith(("c10d.", "torch.distributed.")):
            # send/receive, or torch.distributed's in-place API: every tensor it is given is
            # sent and may be overwritten with what other ranks sent
            reason = f"{what}: communication with other ranks between projection and contraction"
            for a in node.all_input_nodes:
                l = self.lay(a)
                if l is not None and l.marked:
                    self.escape(l, sent)
                    self.L[a] = self._received(l.idx, reason, across=0)
            return self.opaque(node, reason)
        reason = (f"{what} between projection and contraction: {received}; a rank cannot fold its partner with "
                  f"another rank's basis")
        value = example_value(node)
        outs = []
        for k, a in enumerate(items):
            l = self.lay(a)
            if l is None or not l.marked:
                outs.append(None)
                continue
            self.escape(l, sent)
            out = value[k] if c.coalesced and isinstance(value, (list, tuple)) else value
            outs.append(self._collected(l, c, reason, shape_of(a),
                                        tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        self.L[node] = outs if c.coalesced else outs[0]
        targets = items if c.inplace else []
        if not c.coalesced and isinstance(node.kwargs.get("out"), torch.fx.Node):
            targets = [node.kwargs["out"]]
        for a, o in zip(targets, outs):
            if isinstance(a, torch.fx.Node):
                self.L[a] = o

    def _received(self, idx: np.ndarray, reason: str, across: int | None = None) -> ChannelLayout:
        """``idx`` with every tracked entry touched by ``reason``. ``across``: a dim with
        channels along which ranks exchange blocks: the result cannot vary along it (one code
        naming every source linear)."""
        out = self.touched(idx, reason)
        if across is not None and out.ndim and out.shape[across] != 1:
            marked = out != UNTRACKED
            code = self.reason_code(reason, frozenset(self.res.sources_of(out))) if marked.any() else UNTRACKED
            out = np.full((1,) * out.ndim, code, dtype=np.int64)
        return ChannelLayout(out)

    def _collected(self, l: ChannelLayout, c: Collective, reason: str, in_shape, out_shape) -> ChannelLayout:
        """Layout of what a functional collective returns for an input of layout ``l``."""
        if in_shape is None or not in_shape:
            return self._received(l.idx, reason)
        nd = len(in_shape)
        idx = _broadcast_to_rank(l.idx, nd)
        if c.kind in ("all_reduce", "broadcast"):
            return self._received(idx, reason)
        d = (c.dim or 0) % nd
        if idx.shape[d] == 1:                   # ranks' tensors meet along a dim without channels
            return self._received(idx, reason)
        if c.kind == "all_gather" and out_shape is not None and len(out_shape) == nd:
            # concatenation along d of every rank's tensor: the layout repeats, each block
            # touched (the other blocks are other ranks' channels)
            n_in, n_out = size_hint(in_shape[d]), size_hint(out_shape[d])
            if n_in and n_out and n_out % n_in == 0:
                return ChannelLayout(np.concatenate([self._received(idx, reason).idx] * (n_out // n_in), axis=d))
        return self._received(idx, reason, across=d)
