"""PIFA: rewrite low-rank linear chains ``y = (x A + a) B + b`` (inner width r below both
outer widths) into a pivot GEMM and a coefficient GEMM.

Finding: every linear site whose input, through ops that only move leading dimensions
(view/reshape/flatten/unsqueeze keeping the channel dimension last, contiguous, clone,
eval-mode dropout, a cast to the same dtype), is the output of another linear site.

Rewriting (``P``: pivot columns, ``R``: the rest, positions restored by one gather that
Inductor fuses with the concatenation)::

    yP = x @ (A B[:, P]) + (a B[:, P] + b[P])
    yR = yP @ C' + (b[R] - b[P] C')           C' = B[:, P]^-1 B[:, R]
    y  = cat([yP, yR], -1)[..., inv_perm]

The leading-dimension ops that sat between the two linears are replayed on ``y``.

LoRA's additive form ``x W + (x A) B`` contains the chain ``(x A) B``; it is found like any
other chain, but at adapter ranks its saving ``r / (d_in + d_out)`` is far below
``min_saving`` (0.2% at r=16, d=4096), so it is skipped with that reason: merging the
adapter into ``W`` is the better transformation and is left to the user.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from .._compat import example_value, size_hint
from .. import cost
from ..graph.linears import LinearSite
from ..graph.params import weight_problem
from ..graph.ops import arg, canonical, cast_method_dtype, dtype_of, shape_of
from ..identities import FactorizationError, pifa_factors
from ..report import RewriteRecord, SkipRecord
from .editor import GraphEditor

KIND = "pifa"


@dataclass
class Chain:
    first: LinearSite
    second: LinearSite
    between: list = field(default_factory=list)   # passthrough nodes, from first to second

    @property
    def site(self) -> str:
        a, b = self.first.module_path, self.second.module_path
        if a == b:
            return a or self.second.weight.name
        pa, pb = a.split("."), b.split(".")
        common = []
        for x, y in zip(pa, pb):
            if x != y:
                break
            common.append(x)
        if common and len(common) >= max(len(pa), len(pb)) - 1:
            return ".".join(common)
        return f"{a} -> {b}"

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
    if name in ("contiguous", "clone"):
        return None
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
        sizes = _reshape_sizes(node)
        if sizes is None:
            return f"{node.name}: unsupported view arguments"
        last = _static(sizes[-1])
        if not (last == r or last == -1):
            return f"{node.name}: view does not keep the channel dimension"
        if last == -1 and any(_static(s) == -1 for s in sizes[:-1]):
            return f"{node.name}: ambiguous view"
        return None
    if name == "flatten":
        end = arg(node, 2, "end_dim", -1)
        return None if isinstance(end, int) and end % len(si) != len(si) - 1 else \
            f"{node.name}: flatten merges the channel dimension"
    if name in ("unsqueeze", "squeeze"):
        d = arg(node, 1, "dim")
        nd = len(so) if name == "unsqueeze" else len(si)
        if isinstance(d, int) and d % nd != nd - 1:
            return None
        return f"{node.name}: {name} on the channel dimension"
    return f"{node.name} ({node.target}) between the linears"


def _static(v: Any) -> Any:
    """An int size argument, or the hint of a SymInt-valued node."""
    if isinstance(v, torch.fx.Node):
        return size_hint(example_value(v))
    return v


def _reshape_sizes(node: torch.fx.Node) -> list | None:
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


def find_chains(linears: Sequence[LinearSite]) -> tuple[list[Chain], list[SkipRecord]]:
    by_output = {s.output: s for s in linears}
    chains: list[Chain] = []
    skips: list[SkipRecord] = []
    for second in linears:
        between: list[torch.fx.Node] = []
        n = second.input
        blocked = None
        while isinstance(n, torch.fx.Node) and n not in by_output:
            if canonical(n) in ("contiguous", "clone", "dropout", "to", "cast", "reshape", "flatten",
                                "unsqueeze", "squeeze") and n.args:
                between.append(n)
                n = n.args[0]
            else:
                break
        if n not in by_output:
            continue
        first = by_output[n]
        between.reverse()
        chain = Chain(first, second, between)
        r = first.d_out
        d_in, d_out = first.d_in, second.d_out
        if r >= min(d_in, d_out):
            # A full-rank pair is not a low-rank chain; only report genuinely narrow ones.
            if r < max(d_in, d_out):
                skips.append(SkipRecord(KIND, chain.site, f"rank r={r} >= min(d_in, d_out)={min(d_in, d_out)}"))
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
            skips.append(SkipRecord(KIND, chain.site, blocked))
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


def select_chains(found: Sequence[Chain], inputs: Sequence[torch.Tensor], error_budget: float,
                  min_saving: float, cost_model: bool):
    """Decide every chain, knowing which ones hand their column order to the next.

    A producer is first judged without the gather pass; if its consumer is then refused,
    it is judged again with the pass (and so on, until nothing changes).
    Returns (accepted chains, their factors, links among them, skip records)."""
    accepted = list(range(len(found)))
    skips: dict[int, SkipRecord] = {}
    factors: dict[int, Any] = {}
    assumed_link: dict[int, bool] = {}
    while True:
        links = link_chains([found[k] for k in accepted])
        linked = {accepted[p] for p in links}
        changed = False
        for k in list(accepted):
            has_link = k in linked
            if assumed_link.get(k) == has_link and k in factors:
                continue
            assumed_link[k] = has_link
            res = decide_chain(inputs, found[k], error_budget, min_saving, cost_model,
                               restore_order=not has_link, factors=factors.get(k))
            if isinstance(res, SkipRecord):
                skips[k] = res
                accepted.remove(k)
                factors.pop(k, None)
                changed = True
            else:
                factors[k] = res
        if not changed:
            break
    chains = [found[k] for k in accepted]
    return chains, [factors[k] for k in accepted], link_chains(chains), [skips[k] for k in sorted(skips)]


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


def _column_order(chain: Chain, args: Sequence[torch.Tensor], error_budget: float) -> torch.Tensor:
    f = pifa_factors(chain.first.weight_matrix(args), chain.second.weight_matrix(args),
                     chain.first.bias_vector(args), chain.second.bias_vector(args),
                     error_budget=error_budget)
    return torch.cat([f.pivots, f.rest])


def _factors_fn(chain: Chain, error_budget: float, producer: Chain | None = None):
    first, second = chain.first, chain.second
    dtype = dtype_of(second.core) or second.weight.tensor.dtype

    def compute(args: Sequence[torch.Tensor]):
        A = first.weight_matrix(args)
        if producer is not None:    # inputs arrive in the producer's column order
            A = A[_column_order(producer, args, error_budget).to(A.device)]
        return pifa_factors(A, second.weight_matrix(args), first.bias_vector(args), second.bias_vector(args),
                            dtype=dtype, error_budget=error_budget)

    def tensors(args: Sequence[torch.Tensor]) -> list:
        f = compute(args)
        return [f.w_pivot.t().contiguous(), f.b_pivot, f.coeff.t().contiguous(), f.b_rest,
                f.inv_perm.to(f.w_pivot.device)]

    return compute, tensors


def decide_chain(editor_inputs: Sequence[torch.Tensor], chain: Chain, error_budget: float,
                 min_saving: float, cost_model: bool = True, restore_order: bool = True, factors=None):
    """Whether a chain is rewritten: saving, cost and factorization at the example weights.
    Returns a SkipRecord, or the factors (reused by ``apply_chain``; pass them back in
    ``factors`` to judge the chain again without refactorizing)."""
    first, second = chain.first, chain.second
    r, d_in, d_out = chain.rank, first.d_in, second.d_out
    saving = r / (d_in + d_out)
    if saving < min_saving:
        return SkipRecord(KIND, chain.site, f"saves {100 * saving:.2g}% of the chain's weights, below "
                                            f"min_saving={100 * min_saving:.2g}%")
    if cost_model:
        dtype = dtype_of(second.core) or second.weight.tensor.dtype
        est = cost.pifa(first.tokens, d_in, r, d_out, dtype, second.weight.tensor.device, restore_order)
        if not est.pays:
            return SkipRecord(KIND, chain.site, est.reason("the PIFA pair", cost.device_model(
                second.weight.tensor.device), first.tokens))
    if factors is not None:
        return factors
    try:
        return _factors_fn(chain, error_budget)[0](editor_inputs)
    except FactorizationError as e:
        return SkipRecord(KIND, chain.site, str(e))


def apply_chain(editor: GraphEditor, chain: Chain, index: int, error_budget: float,
                producer: Chain | None = None, restore_order: bool = True, factors=None) -> RewriteRecord:
    """Rewrite one accepted chain (see ``decide_chain``).

    ``producer``: a rewritten chain whose output, in its concatenated column order, feeds
    this chain's first linear through element-wise ops; this chain's first weight absorbs
    that order. ``restore_order=False``: the consumer absorbs this chain's order, so the
    output stays in concatenated order (no gather pass). ``factors``: those computed by
    ``decide_chain`` (valid only without a producer)."""
    first, second = chain.first, chain.second
    r, d_in, d_out = chain.rank, first.d_in, second.d_out
    compute, tensors_fn = _factors_fn(chain, error_budget, producer)
    f = factors if (factors is not None and producer is None) else compute(editor.example_inputs)
    linked = (first, second) + ((producer.first, producer.second) if producer is not None else ())
    sources = [s.weight.index for s in linked] + [s.bias.index for s in linked if s.bias is not None]
    initial = [f.w_pivot.t().contiguous(), f.b_pivot, f.coeff.t().contiguous(), f.b_rest,
               f.inv_perm.to(f.w_pivot.device)]
    editor.current_rewrite = index
    w_p, b_p, c_t, b_r, inv = editor.add_derived(f"pifa{index}", sources, tensors_fn, initial)
    target = editor.new(second.output)
    linear = torch._C._nn.linear
    with editor.graph.inserting_before(target):
        x = editor.new(first.input)
        yp = editor.call(linear, (x, w_p, b_p), origin=first.output)
        yr = editor.call(linear, (yp, c_t, b_r), origin=second.output)
        y = editor.call(torch.cat, ([yp, yr], -1), origin=second.output)
        if restore_order:
            y = editor.call(torch.index_select, (y, -1, inv), origin=second.output)
        for m in chain.between:
            args = [y] + [editor.new(a) for a in m.args[1:]]
            kwargs = {k: editor.new(v) for k, v in m.kwargs.items()}
            if canonical(m) == "reshape":
                orig_sizes = _reshape_sizes(m)
                sizes = [editor.new(s) for s in orig_sizes]
                if _static(orig_sizes[-1]) == r:
                    sizes[-1] = d_out
                args, kwargs = [y, sizes], {}
            y = editor.call(m.target, tuple(args), kwargs, origin=m, method=(m.op == "call_method"))
    editor.replace(second.output, y)
    removed = [second.output, second.core, *reversed(chain.between), first.output, first.core]
    removed = [n for n in dict.fromkeys(removed)]
    editor.discard(removed, index)
    editor.current_rewrite = None
    bias_before = (r if first.bias is not None else 0) + (d_out if second.bias is not None else 0)
    has_bias = first.bias is not None or second.bias is not None
    return RewriteRecord(
        kind=KIND, site=chain.site,
        params_before=d_in * r + r * d_out + bias_before,
        params_after=d_in * r + r * (d_out - r) + (d_out if has_bias else 0),
        flops_saved=2 * r * r, cond=float(f.cond), error_bound=float(f.error_bound),
        details={"d_in": d_in, "r": r, "d_out": d_out, "bias": has_bias,
                 "weights": [first.weight.name, second.weight.name],
                 "column_order": "restored" if restore_order else "absorbed by the next chain"},
    )
