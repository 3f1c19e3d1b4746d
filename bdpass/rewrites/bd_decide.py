"""The decisions of BD: which form each source of a component takes, or why the component
is not rewritten (and the skip records that say so).

A form whose error bound (the largest condition number of its blocks) exceeds the budget is
not a candidate. With ``cost_model`` on, the remaining candidates and the original
projection are timed on the machine at the graph's token count (:mod:`bdpass.timing`) and
the fastest candidate is taken if it beats the original; without timing (fake tensors), a
roofline estimate decides (:mod:`bdpass.cost`). With ``cost_model`` off, the most accurate
candidate is taken.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from .. import cost, timing
from ..graph.linears import LinearSite
from ..graph.ops import dtype_of
from ..identities import FactorizationError
from ..report import SkipRecord
from ..runtime import finalize_tensor
from .bd_blocks import op_statics, source_tensors
from .bd_factors import _synthetic, form_factors
from .bd_plan import Component, Group
from .bd_sources import Source


def _time_source(site: LinearSite, src: Source, forms: Sequence[str]) -> dict[str, float]:
    """Seconds of the original projection and of each form, on random inputs and weights of
    the site's shapes, with the verdicts of :func:`bdpass.timing.measure`."""
    import inductor_lowerings  # noqa: F401  (registers the ops)

    dev, dt = site.weight.tensor.device, site.weight.tensor.dtype
    M = max(site.tokens, 1)
    x = torch.randn(M, site.d_in, device=dev, dtype=dt)
    W = torch.randn(site.d_out, site.d_in, device=dev, dtype=dt)
    b = None if site.bias is None else torch.randn(site.d_out, device=dev, dtype=dt)
    fns = {"original": lambda: torch.nn.functional.linear(x, W, b)}
    shapes = {}
    form0 = src.form
    for form in forms:
        src.form = form
        T, block_table, block_col = op_statics(site, src)
        t = [None if v is None else finalize_tensor(v, dt, dev)
             for v in source_tensors(site, src, _synthetic(site, src, form), W.t().double(),
                                     None if b is None else b.double())]
        args = (t[:T], t[T:2 * T], t[2 * T::2], t[2 * T + 1::2], block_table, block_col, site.d_out)
        fns[form] = (lambda a=args: torch.ops.bdpass.bd_linear(x, *a))
        shapes[form] = [[int(args[0][tb].numel()), int(args[2][i].shape[1])] for i, tb in enumerate(block_table)]
    src.form = form0
    problem = {"op": "bd_linear", "M": M, "d_in": site.d_in, "d_out": site.d_out, "dtype": str(dt),
               "bias": site.bias is not None, "blocks": shapes}
    return timing.measure(dev, problem, fns)


def _estimate_source(site: LinearSite, src: Source, forms: Sequence[str]) -> dict[str, float]:
    """Roofline seconds of the original projection and of each form (no real tensors)."""
    dtype = dtype_of(site.output) or site.weight.tensor.dtype
    out = {}
    form0 = src.form
    for form in forms:
        src.form = form
        est = cost.bd_linear(site.tokens, site.d_in, site.d_out, len(src.heads), max(st.g for st in src.sets),
                             op_statics(site, src)[0], dtype, site.weight.tensor.device)
        out["original"], out[form] = est.original, est.rewritten
    src.form = form0
    return out


def decide(comp: Component, sites: Sequence[LinearSite], sources: dict[int, Source], args,
           error_budget: float, cost_model: bool):
    """Choose each source's form. Returns (factors per source, details per source, None) or
    (None, None, the reason not to rewrite).

    With the cost model, each source's forms are timed first (they do not need factors for
    that) and factorized fastest first: the first that is faster than the original and
    within the error budget is taken. Without it, per-head pivots (the most accurate)."""
    chosen, details = {}, {}
    total_orig = total_new = 0.0
    how = None
    for s, src in sources.items():
        site = sites[s]
        forms = src.forms()
        if not cost_model:
            secs, order = None, ["per_head"]
        else:
            if timing.can_time(site.weight.tensor):
                secs, how = _time_source(site, src, forms), f"measured on {timing.machine(site.weight.tensor.device)}"
            else:
                secs, how = _estimate_source(site, src, forms), (f"estimated on {site.weight.tensor.device.type} "
                                                                   f"(roofline; no real tensors to time)")
            order = sorted(forms, key=lambda k: secs[k])
        refused, form = {}, None
        for cand in order:
            if secs is not None and not timing.pays(secs, cand):
                continue                   # slower, or not surely faster (see bdpass.timing)
            try:
                chosen[s] = form_factors(site, src, cand, args, error_budget)
            except FactorizationError as e:
                refused[cand] = str(e)
                continue
            form = cand
            break
        if form is None:
            parts = [f"{k}: {v}" for k, v in refused.items()]
            slow = [k for k in order if k not in refused]
            if secs is not None and slow:
                parts.append(f"cost model: {how}, " + ", ".join(
                    f"{k} {timing.describe(secs, k)}" for k in slow) +
                    f" of the original at {site.tokens} tokens (needs >= {1 / (1 - cost.MARGIN):.2f}x)")
            return None, None, "; ".join(parts)
        src.form = form
        details[s] = {"form": form}
        if secs is not None:
            total_orig += secs["original"]
            total_new += secs[form]
            details[s]["ms" if how.startswith("measured") else "estimated_ms"] = \
                {k: round(v * 1e3, 4) for k, v in secs.items()}
    if cost_model and total_new > (1.0 - cost.MARGIN) * total_orig:
        site = sites[next(iter(sources))]
        return None, None, (f"cost model: the BD projections {how} at {total_orig / total_new:.2f}x of the "
                            f"original at {site.tokens} tokens (needs >= {1 / (1 - cost.MARGIN):.2f}x)")
    return chosen, details, None


def skips_for(groups: list[Group], why: str) -> list[SkipRecord]:
    """One skip per (kind, site) of these groups, naming their contraction nodes."""
    nodes: dict[tuple, set] = defaultdict(set)
    for g in groups:
        nodes[(g.kind, g.site)] |= set(getattr(g, "nodes", ()) or ())
    return [SkipRecord(g.kind, g.site, why, nodes=sorted(nodes[(g.kind, g.site)])) for g in _one_per_site(groups)]


def _one_per_site(groups: list[Group]) -> list[Group]:
    seen, out = set(), []
    for g in groups:
        if (g.kind, g.site) not in seen:
            seen.add((g.kind, g.site))
            out.append(g)
    return out
