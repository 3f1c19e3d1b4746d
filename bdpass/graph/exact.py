"""Running a Dynamo graph in float64: the reference every rewrite is checked against.

:class:`Float64Interpreter` runs an FX graph node by node with every floating value in
float64 (complex values in complex128). Floating dtypes that the graph names (``.to(
torch.bfloat16)``, ``.float()``, ``softmax(dtype=torch.float32)``, ``torch.zeros(...,
dtype=torch.float16)``) become float64, and autocast regions are entered disabled, so a
graph written for half precision runs in float64 from its inputs to its outputs.

Weights are converted when an op reads them, not up front: a graph over a large model
holds one weight at a time in float64, plus the live activations (values are freed after
their last use).

Every run of a graph that is not the model's own run (the float64 reference, the model-dtype
runs of validation) goes through :class:`LocalInterpreter`, which never communicates: a
collective of ``torch.distributed`` is replaced by its local stand-in
(:func:`bdpass.graph.layout.collectives.collective_stand_in`). Ranks of a tensor-parallel
model decide independently (one may rewrite a graph that another leaves alone, or validate a
unit alone); their checks must not pair with another rank's real collectives. A graph that
computes on DTensors (where any op may communicate) or holds a collective without a local
stand-in is not run: :class:`CommunicatingGraph` is raised, and validation refuses the
rewrites.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx
from torch.fx.node import map_aggregate

from .._compat import functorch_levels_restored, is_dtensor

_FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_COMPLEX_DTYPES = {torch.complex32, torch.complex64, torch.complex128}
_TO_DOUBLE_METHODS = {"float", "half", "bfloat16", "double"}
_REINTERPRET = {"view"}          # x.view(dtype) reinterprets bits: left alone


def _widen_dtype(v: Any) -> Any:
    if isinstance(v, torch.dtype):
        if v in _FLOAT_DTYPES:
            return torch.float64
        if v in _COMPLEX_DTYPES:
            return torch.complex128
    return v


def _widen_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.is_floating_point() and v.dtype != torch.float64:
            return v.detach().to(torch.float64)
        if v.is_complex() and v.dtype != torch.complex128:
            return v.detach().to(torch.complex128)
    return v


def _is_enter_autocast(target: Any) -> bool:
    return getattr(target, "__name__", "") == "_enter_autocast"


def _narrow_tensor(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.dtype == torch.float64:
        return v.to(torch.float32)
    return v


class CommunicatingGraph(NotImplementedError):
    """A graph whose extra runs would communicate with other ranks (see the module docstring)."""




class LocalInterpreter(torch.fx.Interpreter):
    """Runs ``gm`` on this rank alone: every collective gives its local stand-in (the same
    for every graph run this way, so two graphs compared on one rank see the same values
    there), and nothing is sent to or received from another rank. Raises
    :class:`CommunicatingGraph` on a DTensor value or a collective without a stand-in."""

    def __init__(self, gm: torch.fx.GraphModule, garbage_collect_values: bool = True):
        super().__init__(gm, garbage_collect_values=garbage_collect_values)

    def run(self, *args: Any, **kwargs: Any) -> Any:
        with functorch_levels_restored():      # a run stopped inside a vmap leaves no level behind
            return super().run(*args, **kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        if n.op in ("call_function", "call_method"):
            from .layout.collectives import collective, collective_stand_in

            c = collective(n)
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            for v in (*args, *kwargs.values()):
                if is_dtensor(v) or (isinstance(v, (list, tuple)) and any(is_dtensor(u) for u in v)):
                    raise CommunicatingGraph(f"{n.name} computes on a DTensor (any op on one may communicate "
                                             "with the other ranks)")
            if c is not None:
                try:
                    return collective_stand_in(n, args, kwargs)
                except NotImplementedError as e:
                    raise CommunicatingGraph(f"{n.name}: {e}") from None
        return self._run_node(n)

    def _run_node(self, n: torch.fx.Node) -> Any:
        return super().run_node(n)


class Float64Interpreter(LocalInterpreter):
    """Runs ``gm`` in float64 (see the module docstring). ``on_value(node, value)`` is
    called with every computed value, if given.

    An op that has no float64 kernel (``grouped_mm`` of MoE layers) runs in float32 and
    its result is widened again; ``narrowed`` lists those nodes, since they bound the
    precision of everything downstream."""

    def __init__(self, gm: torch.fx.GraphModule, on_value: Callable[[torch.fx.Node, Any], None] | None = None):
        super().__init__(gm, garbage_collect_values=True)
        self.on_value = on_value
        self.narrowed: list[str] = []

    def run_node(self, n: torch.fx.Node) -> Any:
        val = super().run_node(n)
        if self.on_value is not None:
            self.on_value(n, val)
        return val

    def _run_node(self, n: torch.fx.Node) -> Any:
        try:
            return super()._run_node(n)
        except (RuntimeError, NotImplementedError) as e:
            if n.op not in ("call_function", "call_method") or "Double" not in str(e):
                raise
            return self._in_float32(n)

    def _in_float32(self, n: torch.fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = map_aggregate(args, lambda v: _narrow_tensor(_widen_tensor(v)))
        kwargs = map_aggregate(kwargs, lambda v: _narrow_tensor(_widen_tensor(v)))
        if n.op == "call_function":
            out = n.target(*args, **kwargs)
        else:
            out = getattr(args[0], n.target)(*args[1:], **kwargs)
        self.narrowed.append(n.name)
        return map_aggregate(out, _widen_tensor)

    def get_attr(self, target, args, kwargs):
        return _widen_tensor(super().get_attr(target, args, kwargs))

    def call_function(self, target, args, kwargs):
        if _is_enter_autocast(target):
            args = list(args)
            if len(args) >= 3:
                args[2] = False
            kwargs = {**kwargs, "enabled": False} if "enabled" in kwargs else kwargs
            return target(*args, **kwargs)
        args = map_aggregate(args, lambda v: _widen_dtype(_widen_tensor(v)))
        kwargs = map_aggregate(kwargs, lambda v: _widen_dtype(_widen_tensor(v)))
        return target(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        self_obj, *rest = args
        self_obj = _widen_tensor(self_obj)
        if target in _TO_DOUBLE_METHODS and isinstance(self_obj, torch.Tensor):
            return self_obj.double() if not self_obj.is_complex() else self_obj
        if target not in _REINTERPRET:
            rest = map_aggregate(rest, lambda v: _widen_dtype(_widen_tensor(v)))
            kwargs = map_aggregate(kwargs, lambda v: _widen_dtype(_widen_tensor(v)))
        else:
            rest = map_aggregate(rest, _widen_tensor)
        return getattr(self_obj, target)(*rest, **kwargs)

    def call_module(self, target, args, kwargs):
        raise RuntimeError("bdpass: float64 runs need a graph without call_module nodes (a Dynamo graph)")


def float64_inputs(inputs: Sequence[Any], weights: set[int]) -> list[Any]:
    """Inputs for a float64 run. Weights (positions in ``weights``) are passed as they are
    and widened where they are read; other tensors are copied now (float64 for floating
    ones) so that a graph that writes into its inputs (a cache) writes into the copies."""
    from .._compat import size_hint

    out = []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.SymInt):       # a symbolic size of a dynamic graph: its value
            t = size_hint(t)
        elif isinstance(t, torch.Tensor) and i not in weights:
            t = _widen_tensor(t)
            if t is inputs[i]:
                t = t.detach().clone()
        out.append(t)
    return out
