"""PIFA: decide and rewrite the low-rank linear chains ``y = (x A + a) B + b`` found by
:mod:`bdpass.rewrites.pifa_plan` into a pivot GEMM and a coefficient GEMM.

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

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch

from .. import cost, timing
from ..graph.ops import canonical, dtype_of
from ..identities import FactorizationError, pifa_factors
from ..prepare.modules import Absorbed, PivotLinear
from ..report import RewriteRecord, SkipRecord
from ..rules import Decision, PlanContext, Rule
from ..runtime import finalize_tensor
from .editor import GraphEditor
from .pifa_plan import KIND, Chain, find_chains, link_chains, reshape_sizes, static_value

__all__ = ["KIND", "Chain", "PifaRule", "PifaDecision", "find_chains", "link_chains", "select_chains",
           "decide_chain"]


def select_chains(found: Sequence[Chain], inputs: Sequence[torch.Tensor], budget_for: Callable[[Any], float],
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
            res = decide_chain(inputs, found[k], budget_for(_compute_dtype(found[k])), min_saving, cost_model,
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


def _column_order(chain: Chain, args: Sequence[torch.Tensor], error_budget: float) -> torch.Tensor:
    """The chain's output column order ``[pivots, rest]`` (the pivots depend on its second
    weight only, so a producer's own producer does not change them)."""
    f = pifa_factors(chain.first.weight_matrix(args), chain.second.weight_matrix(args),
                     chain.first.bias_vector(args), chain.second.bias_vector(args),
                     error_budget=error_budget)
    return torch.cat([f.pivots, f.rest])


def _factors(chain: Chain, args: Sequence[torch.Tensor], error_budget: float, producer: Chain | None = None,
             input_order: torch.Tensor | None = None):
    """The chain's exact factors (float64) from the graph's arguments; with a ``producer``,
    its first weight's rows in the producer's column order (``input_order``, computed if not
    given)."""
    first, second = chain.first, chain.second
    A = first.weight_matrix(args)
    if producer is not None:    # inputs arrive in the producer's column order
        if input_order is None:
            input_order = _column_order(producer, args, error_budget)
        A = A[input_order.to(A.device)]
    return pifa_factors(A, second.weight_matrix(args), first.bias_vector(args), second.bias_vector(args),
                        dtype=torch.float64, error_budget=error_budget)


def _derived(f, restore_order: bool = True) -> list:
    """The derived inputs of the rewritten chain: the arguments of ``bdpass::pivot_linear``
    when the output columns go back to their places, else the two linears' weights (the
    output stays in ``[pivots, rest]`` order for the next chain to absorb)."""
    if restore_order:
        return [f.w_pivot, f.b_pivot, f.coeff, f.b_rest, f.pivots, f.rest]
    return [f.w_pivot.t(), f.b_pivot, f.coeff.t(), f.b_rest]


def _compute_dtype(chain: Chain) -> torch.dtype:
    return dtype_of(chain.second.core) or chain.second.weight.tensor.dtype


def _param_counts(chain: Chain) -> tuple[int, int]:
    """Weights (biases included) of the chain before and after the rewrite."""
    first, second = chain.first, chain.second
    r, d_in, d_out = chain.rank, first.d_in, second.d_out
    before = d_in * r + r * d_out + (r if first.bias is not None else 0) + (d_out if second.bias is not None else 0)
    has_bias = first.bias is not None or second.bias is not None
    return before, d_in * r + r * (d_out - r) + (d_out if has_bias else 0)


def decide_chain(editor_inputs: Sequence[torch.Tensor], chain: Chain, error_budget: float,
                 min_saving: float, cost_model: bool = True, restore_order: bool = True, factors=None):
    """Whether a chain is rewritten: saving, cost and factorization at the example weights.
    Returns a SkipRecord, or the factors (reused by ``PifaRule.plan``; pass them back in
    ``factors`` to judge the chain again without refactorizing)."""
    first, second = chain.first, chain.second
    before, after = _param_counts(chain)
    saving = (before - after) / before
    nodes = [first.core.name, second.core.name]
    if after >= before:
        return SkipRecord(KIND, chain.site, f"would not shrink the weights ({before:,} -> {after:,}: the "
                                            f"rewritten pair's bias spans all {second.d_out} outputs)", nodes=nodes)
    if saving < min_saving:
        return SkipRecord(KIND, chain.site, f"saves {100 * saving:.2g}% of the chain's weights, below "
                                            f"min_saving={100 * min_saving:.2g}%", nodes=nodes)
    if factors is None:
        try:
            factors = _factors(chain, editor_inputs, error_budget)
        except FactorizationError as e:
            return SkipRecord(KIND, chain.site, str(e), nodes=nodes)
    if cost_model:
        why = _cost_objection(chain, factors, restore_order)
        if why:
            return SkipRecord(KIND, chain.site, why, nodes=nodes)
    return factors


def _cost_objection(chain: Chain, f, restore_order: bool) -> str | None:
    """Why the rewritten chain would not be faster (measured on this machine when the weights
    are real tensors, else a roofline estimate), or None."""
    first, second = chain.first, chain.second
    r, d_in, d_out = chain.rank, first.d_in, second.d_out
    dtype = _compute_dtype(chain)
    dev = second.weight.tensor.device
    M = max(first.tokens, 1)
    if not timing.can_time(second.weight.tensor):
        est = cost.pifa(M, d_in, r, d_out, dtype, dev, restore_order)
        return None if est.pays else est.reason("the PIFA pair", cost.device_model(dev), M)
    import inductor_lowerings  # noqa: F401  (registers the ops)

    x = torch.randn(M, d_in, device=dev, dtype=dtype)
    A, B = torch.randn(r, d_in, device=dev, dtype=dtype), torch.randn(d_out, r, device=dev, dtype=dtype)
    b = torch.randn(d_out, device=dev, dtype=dtype) if second.bias is not None else None
    names = ["w_p", "b_p", "c", "b_r"] + (["piv", "rest"] if restore_order else [])
    d = {k: None if v is None else finalize_tensor(v, dtype, dev)
         for k, v in zip(names, _derived(f, restore_order))}
    linear = torch.nn.functional.linear
    if restore_order:
        def new():
            return torch.ops.bdpass.pivot_linear(x, d["w_p"], d["b_p"], d["c"], d["b_r"], d["piv"], d["rest"])
    else:       # the concatenation fuses into the consumer's element-wise op
        def new():
            yp = linear(x, d["w_p"], d["b_p"])
            return linear(yp, d["c"], d["b_r"])
    problem = {"op": "pifa", "M": M, "d_in": d_in, "r": r, "d_out": d_out, "dtype": str(dtype),
               "bias": b is not None, "restore_order": restore_order}
    ms = timing.measure(dev, problem, {"original": lambda: linear(linear(x, A), B, b), "pifa": new})
    if timing.pays(ms, "pifa"):       # surely faster by the margin, and plausibly so
        return None
    return (f"cost model: the PIFA pair measured at {timing.describe(ms, 'pifa')} of the original on "
            f"{timing.machine(dev)} at {M} tokens (needs >= {1 / (1 - cost.MARGIN):.2f}x)")


@dataclass
class PifaDecision(Decision):
    """A low-rank chain rewritten by PIFA."""
    rule: ClassVar[str] = KIND
    tensor_fields: ClassVar[tuple[str, ...]] = ("input_order", "factors")
    chain: Chain | None = None
    producer: Chain | None = None           # the chain whose column order this one's input arrives in
    input_order: torch.Tensor | None = None  # that order (absorbed by this chain's first weight)
    restore_order: bool = True              # False: the output stays in [pivots, rest] order
    factors: Any = None                     # identities.PifaFactors (float64) at the example weights

    @property
    def weights(self) -> list[str]:
        return [p.name for s in (self.chain.first, self.chain.second) for p in (s.weight, s.bias) if p is not None]


def _record(chain: Chain, f, restore_order: bool) -> RewriteRecord:
    first, second = chain.first, chain.second
    r, d_in, d_out = chain.rank, first.d_in, second.d_out
    before, after = _param_counts(chain)
    return RewriteRecord(
        kind=KIND, site=chain.site, params_before=before, params_after=after,
        flops_saved=2 * r * r, cond=float(f.cond), error_bound=float(f.error_bound),
        expected_growth=float(f.expected_growth),
        details={"d_in": d_in, "r": r, "d_out": d_out, "bias": first.bias is not None or second.bias is not None,
                 "weights": [first.weight.name, second.weight.name],
                 "column_order": "restored" if restore_order else "absorbed by the next chain",
                 "nodes": [first.core.name, second.core.name]})


class PifaRule(Rule):
    """PIFA on low-rank chains (:mod:`bdpass.rewrites.pifa_plan` finds them)."""
    name = KIND
    kinds = (KIND,)
    modules = (PivotLinear, Absorbed)

    def plan(self, ctx: PlanContext) -> list[PifaDecision]:
        opts, args = ctx.opts, ctx.example_inputs
        found, skips = find_chains(ctx.free_linears())
        ctx.report.skipped.extend(skips)
        kept = []
        for c in found:
            why = ctx.refusal([c.first, c.second])
            if why:
                ctx.report.skipped.append(SkipRecord(KIND, c.site, why, nodes=[c.first.core.name, c.second.core.name]))
            else:
                kept.append(c)
        chains, factors, links, skips = select_chains(kept, args, opts.budget_for, opts.min_saving, opts.cost_model)
        ctx.report.skipped.extend(skips)
        producer_of = {c: p for p, c in links.items()}
        out = []
        for k, chain in enumerate(chains):
            prod = chains[producer_of[k]] if k in producer_of else None
            restore = k not in links
            budget = opts.budget_for(_compute_dtype(chain))
            order = None if prod is None else _column_order(prod, args, budget)
            f = factors[k] if prod is None else _factors(chain, args, budget, prod, order)
            linked = (chain.first, chain.second) + ((prod.first, prod.second) if prod is not None else ())
            sources = tuple(sorted({s.weight.index for s in linked} | {s.bias.index for s in linked if s.bias}))

            def recompute(a, chain=chain, prod=prod, restore=restore, budget=budget):
                return _derived(_factors(chain, a, budget, prod), restore)
            unit = [chain] + ([prod] if prod is not None else []) + ([chains[links[k]]] if k in links else [])
            out.append(PifaDecision(
                records=[_record(chain, f, restore)],
                nodes=frozenset(n.core.name for c in unit for n in (c.first, c.second)),
                tensors=_derived(f, restore), recompute=recompute, derived_from=sources,
                dtype=_compute_dtype(chain), device=chain.second.weight.tensor.device, error_budget=budget,
                chain=chain, producer=prod, input_order=order, restore_order=restore, factors=f))
            ctx.claimed.update((chain.first.core, chain.second.core))
        return out

    def rewrite(self, editor: GraphEditor, d: PifaDecision, index: int) -> None:
        """``d.producer``: a rewritten chain whose output, in its concatenated column order,
        feeds this chain's first linear through element-wise ops; this chain's first weight
        absorbed that order. ``d.restore_order=False``: the consumer absorbs this chain's
        order, so the output stays in concatenated order (no gather pass)."""
        import inductor_lowerings  # noqa: F401  (registers the ops)

        chain = d.chain
        first, second = chain.first, chain.second
        r, d_out = chain.rank, second.d_out
        editor.current_rewrite = index
        derived = editor.add_derived(f"pifa{index}", d.derived_from, d.recompute, d.tensors, dtype=d.dtype,
                                     device=d.device)
        target = editor.new(second.output)
        linear = torch._C._nn.linear
        with editor.graph.inserting_before(target):
            x = editor.new(first.input)
            if d.restore_order:
                # pivot columns and the others each written straight to their places
                y = editor.call(torch.ops.bdpass.pivot_linear.default, (x, *derived), origin=second.output)
            else:
                w_p, b_p, c_t, b_r = derived
                yp = editor.call(linear, (x, w_p, b_p), origin=first.output)
                yr = editor.call(linear, (yp, c_t, b_r), origin=second.output)
                y = editor.call(torch.cat, ([yp, yr], -1), origin=second.output)
            for m in chain.between:
                margs = [y] + [editor.new(a) for a in m.args[1:]]
                kwargs = {k: editor.new(v) for k, v in m.kwargs.items()}
                if canonical(m) == "reshape":
                    orig_sizes = reshape_sizes(m)
                    sizes = [editor.new(s) for s in orig_sizes]
                    if static_value(orig_sizes[-1]) == r:
                        sizes[-1] = d_out
                    margs, kwargs = [y, sizes], {}
                y = editor.call(m.target, tuple(margs), kwargs, origin=m, method=(m.op == "call_method"))
        editor.replace(second.output, y)
        removed = [second.output, second.core, *reversed(chain.between), first.output, first.core]
        editor.discard(list(dict.fromkeys(removed)), index)
        editor.current_rewrite = None

    def refit(self, d: PifaDecision, args: Sequence[torch.Tensor]) -> PifaDecision:
        order = None if d.producer is None else _column_order(d.producer, args, d.error_budget)
        f = _factors(d.chain, args, d.error_budget, d.producer, order)
        return dataclasses.replace(d, records=[_record(d.chain, f, d.restore_order)], factors=f,
                                   tensors=_derived(f, d.restore_order), input_order=order)

    def module_edits(self, decisions, args, idx, graph):
        from .pifa_modules import module_edits

        return module_edits(decisions, args, idx, graph)

    def shard_module(self, path, spec, how, get, rank, world, split_of):
        from .pifa_modules import shard_module

        return shard_module(path, spec, how, get, rank, world, split_of)
