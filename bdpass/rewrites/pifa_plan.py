"""Finding low-rank linear chains ``y = (x A + a) B + b`` (PIFA sites) in a Dynamo graph.

A chain is a linear site whose input, through ops that only move leading dimensions
(view/reshape/flatten/unsqueeze keeping the channel dimension last, contiguous, clone,
detach, eval-mode dropout, a cast to the same dtype), is the output of another linear site,
with an inner width ``r`` below both outer widths. Every linear fed by another linear
through data-movement ops of any kind gets a verdict: a chain, or a skip saying why not
(full rank, a transpose or slice between the two, a shared intermediate, ...). :func:`link_chains` finds chains whose
output reaches the next chain's input only through element-wise ops, so that the next
chain can absorb the column order (see :mod:`bdpass.rewrites.pifa`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from .._compat import example_value, size_hint
from ..graph.linears import LinearSite
from ..graph.params import weight_problem
from ..graph.ops import arg, canonical, cast_method_dtype, dtype_of, shape_of
from ..report import SkipRecord

KIND = "pifa"


@dataclass
class Chain:
    first: LinearSite
    second: LinearSite
    between: list = field(default_factory=list)   # passthrough nodes, from first to second

    @property
    def site(self) -> str:
        """The module holding both linears, or ``first -> second`` (module paths; the
        weights' names for weights of the compiled module itself)."""
        a, b = self.first.module_path, self.second.module_path
        if a == b and a:
            return a
        pa, pb = a.split("."), b.split(".")
        common = []
        for x, y in zip(pa, pb):
            if x != y or not x:
                break
            common.append(x)
        if common and len(common) >= max(len(pa), len(pb)) - 1:
            return ".".join(common)
        return f"{a or self.first.weight.name} -> {b or self.second.weight.name}"

    @property
    def rank(self) -> int:
        return self.first.d_out


def _passthrough_ok(node: torch.fx.Node, r: int) -> str | None:
    """None if ``node`` only moves leading dims of a (..., r) tensor; else a reason."""
    name = canonical(node)
    src = node.args[0] if node.args else None
    si, so = shape_of(src), shape_of(node)
    if si is None or so is None or not si or not so or size_hint(si[-1]) != r or size_hint(so[-1]) != r:
        return f"{node.name} changes the channel dimension"
    if name in ("contiguous", "clone", "detach", "alias"):
        return None
    if name == "type_as":
        return None if dtype_of(node) == dtype_of(src) else "dtype cast between the linears"
    if name == "dropout":
        training = arg(node, 2, "training", True)
        return None if training is False else "dropout in training mode between the linears"
    if name in ("to", "cast"):
        want = cast_method_dtype(node)
        if want is None:
            dt = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
            others = [a for a in list(node.args[1:]) if not isinstance(a, torch.dtype)]
            if len(dt) != 1 or others:
                return f"{node.name}: conversion other than a dtype cast between the linears"
            want = dt[0]
        return None if want == dtype_of(src) else "dtype cast between the linears"
    if name == "reshape":
        sizes = reshape_sizes(node)
        if sizes is None:
            return f"{node.name}: unsupported view arguments"
        last = static_value(sizes[-1])
        if not (last == r or last == -1):
            return f"{node.name}: view does not keep the channel dimension"
        if last == -1 and any(static_value(s) == -1 for s in sizes[:-1]):
            return f"{node.name}: ambiguous view"
        return None
    if name == "flatten":
        end = arg(node, 2, "end_dim", -1)
        return None if isinstance(end, int) and end % len(si) != len(si) - 1 else \
            f"{node.name}: flatten merges the channel dimension"
    if name == "unflatten":
        d = arg(node, 1, "dim")
        return None if isinstance(d, int) and d % len(si) != len(si) - 1 else \
            f"{node.name}: unflatten of the channel dimension"
    if name in ("unsqueeze", "squeeze"):
        d = arg(node, 1, "dim")
        nd = len(so) if name == "unsqueeze" else len(si)
        if isinstance(d, int) and d % nd != nd - 1:
            return None
        return f"{node.name}: {name} on the channel dimension"
    what = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
    return f"{node.name} ('{what}') between the linears: only ops on leading dims are supported"


def static_value(v: Any) -> Any:
    """An int size argument, or the hint of a SymInt-valued node."""
    if isinstance(v, torch.fx.Node):
        return size_hint(example_value(v))
    return v


def reshape_sizes(node: torch.fx.Node) -> list | None:
    rest = list(node.args[1:])
    if "shape" in node.kwargs or "size" in node.kwargs:
        rest = [node.kwargs.get("shape", node.kwargs.get("size"))]
    if len(rest) == 1 and isinstance(rest[0], torch.fx.Node) and rest[0].op == "call_function" \
            and rest[0].target is torch.Size and rest[0].args:
        rest = [rest[0].args[0]]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple, torch.Size)):
        rest = list(rest[0])
    if not rest:
        return None
    return rest


# ops that only move data: a linear reached through them from another linear is a
# linear-of-linear and gets a verdict (those that PIFA cannot carry give the reason)
_WALK = {"contiguous", "clone", "dropout", "to", "cast", "reshape", "flatten", "unsqueeze", "squeeze", "detach",
         "alias", "type_as", "transpose", "permute", "t", "T", "mT", "movedim", "unflatten", "view_as", "expand",
         "expand_as", "broadcast_to", "narrow", "getitem", "select", "split", "chunk", "unbind", "index_select",
         "repeat", "repeat_interleave"}


def find_chains(linears: Sequence[LinearSite]) -> tuple[list[Chain], list[SkipRecord]]:
    by_output = {s.output: s for s in linears}
    chains: list[Chain] = []
    skips: list[SkipRecord] = []
    for second in linears:
        between: list[torch.fx.Node] = []
        n = second.input
        blocked = None
        while isinstance(n, torch.fx.Node) and n not in by_output and len(between) < 64:
            if canonical(n) in _WALK and n.args and isinstance(n.args[0], torch.fx.Node):
                between.append(n)
                n = n.args[0]
            else:
                break
        if n not in by_output:
            continue
        first = by_output[n]
        between.reverse()
        chain = Chain(first, second, between)
        nodes = [first.core.name, second.core.name]
        r = first.d_out
        d_in, d_out = first.d_in, second.d_out
        if r >= min(d_in, d_out):
            skips.append(SkipRecord(KIND, chain.site, f"rank r={r} >= min(d_in, d_out)={min(d_in, d_out)}: "
                                                      f"not a low-rank chain", nodes))
            continue
        if first.reshaped or second.reshaped:
            odd = first if first.reshaped else second
            skips.append(SkipRecord(KIND, chain.site, f"{odd.weight.name} is applied by an einsum that reshapes its "
                                                      f"operand or result; PIFA does not rewrite that form yet", nodes))
            continue
        for m in between:
            blocked = _passthrough_ok(m, r)
            if blocked:
                break
        if blocked is None:
            flow = [first.output] + between
            shared = [m for m in flow if len(m.users) != 1]
            if first.bias_node is not None and len(first.core.users) != 1:
                shared.append(first.core)
            if shared:
                blocked = f"intermediate {shared[0].name} has other users"
        if blocked is None and dtype_of(first.output) != dtype_of(second.core):
            blocked = "the two linears compute in different dtypes"
        if blocked is None:
            blocked = weight_problem([p for s in (first, second) for p in (s.weight, s.bias) if p is not None])
        if blocked:
            skips.append(SkipRecord(KIND, chain.site, blocked, nodes))
            continue
        chains.append(chain)
    return chains, skips


_UNARY_FUNCS = {torch.relu, torch.tanh, torch.sigmoid, torch.exp, torch.neg, torch.erf,
                torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                torch.nn.functional.mish, torch.nn.functional.elu, torch.nn.functional.sigmoid,
                torch.nn.functional.tanh, torch.nn.functional.hardswish}
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "neg", "erf", "contiguous", "clone", "float",
                  "half", "bfloat16"}


def _unary(node: torch.fx.Node) -> bool:
    """An op applied to each element of its single tensor input independently."""
    if node.op == "call_function" and node.target in _UNARY_FUNCS:
        pass
    elif node.op == "call_method" and node.target in _UNARY_METHODS:
        pass
    elif canonical(node) == "dropout" and arg(node, 2, "training", True) is False:
        pass
    else:
        return False
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.fx.Node)]
    return not others and bool(node.args) and isinstance(node.args[0], torch.fx.Node)


def link_chains(chains: Sequence[Chain]) -> dict[int, int]:
    """producer -> consumer: the producer's output reaches the consumer's first linear only
    through element-wise ops, so the consumer can absorb the producer's column order and the
    producer needs no pass to restore it."""
    by_input = {c.first.input: k for k, c in enumerate(chains)}
    links = {}
    for k, c in enumerate(chains):
        n = c.second.output
        while True:
            if len(n.users) != 1:
                break
            u = next(iter(n.users))
            if n in by_input and by_input[n] != k:
                break
            if _unary(u):
                n = u
                continue
            break
        if n in by_input and by_input[n] != k and len(n.users) == 1:
            links[k] = by_input[n]
    return links
