"""The ``bd`` torch.compile backend.

Pipeline per Dynamo graph: options -> inference check -> weights -> find sites -> decide
(legality, cost, numerics) -> rewrite a copy of the graph -> lower (Inductor by default)
-> report. Anything unexpected falls back to lowering the unmodified graph, with the
reason logged (``strict=True`` re-raises instead).
"""
from __future__ import annotations

import itertools
import logging
import threading
from typing import Any, Callable, Sequence

import torch
import torch.fx

from . import _compat
from .graph.linears import find_linears
from .graph.ops import dtype_of, shape_of
from .graph.params import find_params, weight_numel
from .options import BDOptions
from .report import GraphReport, NodeRecord, Report, SkipRecord
from .rewrites import pifa as pifa_rw
from .rewrites.editor import GraphEditor
from .runtime import RewrittenGraph

log = logging.getLogger("bdpass")

_graph_counter = itertools.count()
_collectors = threading.local()


def _active_collectors() -> list:
    if not hasattr(_collectors, "stack"):
        _collectors.stack = []
    return _collectors.stack


def node_records(gm: torch.fx.GraphModule, removed_by: dict | None = None) -> list[NodeRecord]:
    out = []
    for n in gm.graph.nodes:
        shp = shape_of(n)
        dt = dtype_of(n)
        if n.op in ("call_function", "call_method"):
            target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        else:
            target = str(n.target)
        rw = n.meta.get("bdpass_rewrite")
        if rw is None and removed_by:
            rw = removed_by.get(n.name)
        out.append(NodeRecord(
            name=n.name, op=n.op, target=str(target),
            args=", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a) for a in n.args)[:200],
            shape=[_compat.size_hint(s) if _compat.size_hint(s) is not None else str(s) for s in shp]
            if shp is not None else None,
            dtype=str(dt).replace("torch.", "") if dt is not None else None,
            rewrite=rw, origin=n.meta.get("bdpass_origin")))
    return out


def _needs_grad(example_inputs: Sequence[Any]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs)


def plan_and_rewrite(gm, example_inputs, opts: BDOptions, report: GraphReport,
                     exclude: dict[str, str] | None = None):
    """Find, decide and apply every rewrite of one graph on a copy of it.

    ``exclude`` maps names of linear nodes (the core op of a linear site) to a reason:
    a chain or BD component that involves any of them is skipped with that reason.
    Returns (editor, records, units) or (None, [], []) when nothing was rewritten;
    ``units[k]`` is the set of linear node names record ``k`` rewrote together (excluding
    any one of them refuses the whole unit)."""
    exclude = exclude or {}
    params = find_params(gm, example_inputs)
    report.params_before = weight_numel(params)
    report.params_after = report.params_before
    linears = find_linears(gm, params)
    # weights read by several linear sites (a basis shared by layers, tied layers): a rewrite
    # of one use would store its own derived copy while the others keep the original
    readers: dict[int, set] = {}
    for s in linears:
        for p in (s.weight, s.bias):
            if p is not None:
                readers.setdefault(p.index, set()).add(s.core)

    def shared_weight(sites) -> str | None:
        cores = {s.core for s in sites}
        for s in sites:
            for p in (s.weight, s.bias):
                if p is not None and readers[p.index] - cores:
                    return (f"{p.name} is also read by another linear (a shared basis or tied layers): "
                            f"rewriting would keep it and add a derived copy")
        return None
    editor: GraphEditor | None = None
    records: list = []
    units: list[frozenset[str]] = []
    chains = []
    if opts.pifa:
        found, skips = pifa_rw.find_chains(linears)
        report.skipped.extend(skips)
        kept = []
        for c in found:
            why = exclude.get(c.first.core.name) or exclude.get(c.second.core.name) or \
                shared_weight([c.first, c.second])
            if why:
                report.skipped.append(SkipRecord(pifa_rw.KIND, c.site, why,
                                                 nodes=[c.first.core.name, c.second.core.name]))
            else:
                kept.append(c)
        chains, factors, links, skips = pifa_rw.select_chains(kept, example_inputs, opts.budget_for,
                                                              opts.min_saving, opts.cost_model)
        report.skipped.extend(skips)
        producer_of = {c: p for p, c in links.items()}
        for k, chain in enumerate(chains):
            if editor is None:
                editor = GraphEditor(gm, example_inputs)
            prod = chains[producer_of[k]] if k in producer_of else None
            records.append(pifa_rw.apply_chain(editor, chain, len(records), opts.budget_for,
                                               producer=prod, restore_order=k not in links,
                                               factors=factors[k]))
            linked = [chain] + ([prod] if prod is not None else []) + \
                     ([chains[links[k]]] if k in links else [])
            units.append(frozenset(n.core.name for c in linked for n in (c.first, c.second)))
    if opts.bd_qk or opts.bd_vo:
        from .graph.layout import analyze
        from .rewrites import bd_attention, bd_plan

        used = {n for c in (chains if opts.pifa else []) for n in (c.first.core, c.second.core)}
        bd_sites = [s for s in linears if s.core not in used]
        layout = analyze(gm, bd_sites, example_inputs)
        comps, skips = bd_plan.plan(layout, bd_sites, opts.bd_qk, opts.bd_vo, min_saving=opts.min_saving,
                                    reshaped_sites=True)
        report.skipped.extend(skips)
        for comp in comps:
            names = frozenset(bd_sites[i].core.name for i in comp.linears)
            why = next((exclude[n] for n in sorted(names) if n in exclude), None) or \
                shared_weight([bd_sites[i] for i in comp.linears])
            if why:
                report.skipped.extend(bd_attention.skips_for(comp.groups, why))
                continue
            if editor is None:
                editor = GraphEditor(gm, example_inputs)
            budget = opts.budget_for(bd_sites[comp.linears[0]].weight.tensor.dtype)
            recs, skips = bd_attention.apply_component(editor, comp, bd_sites, len(records), budget,
                                                      opts.cost_model)
            report.skipped.extend(skips)
            records.extend(recs)
            units.extend(names for _ in recs)
    report.rewrites.extend(records)
    report.params_after = report.params_before - sum(r.params_saved for r in records)
    return (editor, records, units) if records else (None, [], [])


def rewrite_graph(gm, example_inputs, opts: BDOptions, index: int = 0):
    """The decided plan of one Dynamo graph and its graph rewrite: find, decide, rewrite,
    then validate (``opts.validate``). Every user of the analysis (the backend, ``explain``,
    the diff tool, ``prepare``) goes through this function; ``editor.decisions`` holds what
    was decided for each rewrite (weights by parameter name, forms, exact factors).

    Validation: the rewritten graph must match
    the original in float64 (structure) and its output error in the model's dtype must stay
    within the error budget of the original's (numerics). Rewrites that fail are refused
    (each unit of rewrites is tried alone to find them; if none fails alone, all are) and
    the graph is planned again without them.

    Returns (report, editor or None, new graph module, new inputs)."""
    from . import validate as val

    exclude: dict[str, str] = {}
    state = {"seconds": 0.0, "reference": None}
    params = find_params(gm, example_inputs)
    weights = {p.index for p in params.values()}
    budget = min([opts.budget_for(p.tensor.dtype) for p in params.values() if p.tensor.is_floating_point()]
                 or [opts.budget_for(None)])

    def check(editor, new_gm, new_inputs, records) -> tuple[str | None, dict | None, float]:
        """(why it fails or None, measured errors, float64 tolerance)."""
        tol = val.tolerance([r.error_bound for r in records])
        (bad, state["reference"]), dt = val.timed(val.compare, gm, example_inputs, new_gm, editor.exact_inputs(),
                                                  weights, tol, state["reference"])
        state["seconds"] += dt
        if bad is not None:
            return f"validation: the rewritten graph differs from the original in float64 ({bad})", None, tol
        (e0, e1), dt = val.timed(val.measured_errors, gm, example_inputs, new_gm, new_inputs, weights,
                                 state["reference"])
        state["seconds"] += dt
        growth = e1 / max(e0, val.error_floor(example_inputs))
        errors = {"original": e0, "rewritten": e1, "growth": growth}
        if growth > budget:
            return (f"validation: the rewritten graph's output error {e1:.2e} is {growth:.3g}x the original's "
                    f"{e0:.2e}, over the error budget {budget:g}"), errors, tol
        return None, errors, tol

    from . import timing

    t_timing = timing.spent
    while True:
        report = GraphReport(index=index, lowering=opts.lowering)
        editor, records, units = plan_and_rewrite(gm, example_inputs, opts, report, exclude)
        report.validate_seconds = state["seconds"]
        report.timing_seconds = timing.spent - t_timing
        if editor is None:
            return report, None, None, None
        new_gm, new_inputs = editor.finish()
        if not opts.validate:
            return report, editor, new_gm, new_inputs
        if val.fake_inputs(example_inputs):
            report.validation = "skipped: the example inputs are fake tensors"
            log.info("bdpass: graph %d: validation %s", index, report.validation)
            return report, editor, new_gm, new_inputs
        try:
            with val.threads_for(report.params_before):
                why, errors, tol = check(editor, new_gm, new_inputs, records)
        except Exception as e:
            if opts.strict or _compat.is_dynamo_restart(e):
                raise
            why = f"validation could not run ({type(e).__name__}: {str(e)[:200]}); rewrites refused"
            log.warning("bdpass: graph %d: %s", index, why)
            exclude.update({n: why for u in units for n in u})
            continue
        report.validate_seconds = state["seconds"]
        if why is None:
            report.measured_error = errors
            report.validation = (f"passed ({len(records)} rewrite(s); float64 tolerance {tol:.0e}; output error "
                                 f"{errors['rewritten']:.2e} vs {errors['original']:.2e}, "
                                 f"growth {errors['growth']:.2f}x)")
            return report, editor, new_gm, new_inputs
        log.warning("bdpass: graph %d: %s", index, why)
        if opts.strict:
            raise val.RewriteValidationError(f"bdpass: graph {index}: {why}")
        distinct = list(dict.fromkeys(units))
        culprits = []
        if len(distinct) > 1:
            for u in distinct:
                others = {n: "(probe)" for v in distinct if v != u for n in v}
                probe = GraphReport(index=index, lowering=opts.lowering)
                ed, recs, _ = plan_and_rewrite(gm, example_inputs, opts, probe, {**exclude, **others})
                if ed is not None:
                    pg, pin = ed.finish()
                    with val.threads_for(report.params_before):
                        if check(ed, pg, pin, recs)[0] is not None:
                            culprits.append(u)
        exclude.update({n: why for u in (culprits or distinct) for n in u if n not in exclude})


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], opts: BDOptions,
                  mode: str | None = None) -> Callable:
    index = next(_graph_counter)
    report = GraphReport(index=index, lowering=opts.lowering)
    report.nodes_before = node_records(gm)

    def plain(reason: str | None) -> Callable:
        if reason:
            report.fallback = reason
        return _compat.lower(gm, example_inputs, opts.lowering, mode, dict(opts.inductor))

    for t in example_inputs:
        if isinstance(t, torch.nn.Parameter) and t.numel() and t.untyped_storage().nbytes() == 0:
            raise RuntimeError(
                "bdpass: a parameter of this model was released by release_weights=True when an earlier "
                "graph was compiled, so the model cannot be compiled again (new input shapes or a new "
                "graph trigger this). Compile with dynamic=True, or use bdpass.prepare, before releasing.")
    result: Callable
    kept_new = None
    if _needs_grad(example_inputs):
        reason = "gradients required (grad mode on and an input requires grad); compiled without rewrites"
        params = find_params(gm, example_inputs)
        report.params_before = report.params_after = weight_numel(params)
        log.info("bdpass: graph %d: %s", index, reason)
        result = plain(reason)
    else:
        editor = None
        try:
            report, editor, new_gm, new_inputs = rewrite_graph(gm, example_inputs, opts, index)
            report.nodes_before = node_records(gm)
        except Exception as e:
            if opts.strict or _compat.is_dynamo_restart(e) or isinstance(e, _validation_error()):
                raise
            editor = None
            report.rewrites.clear()
            report.params_after = report.params_before
            msg = f"internal error during rewriting ({type(e).__name__}: {e})"
            log.warning("bdpass: graph %d: %s; compiling the original graph", index, msg)
            result = plain(msg)
        else:
            if editor is None:
                result = plain(None)
            else:
                report.nodes_before = node_records(gm, editor.removed_by)
                report.nodes_after = node_records(new_gm)
                try:
                    compiled = _compat.lower(new_gm, new_inputs, opts.lowering, mode, dict(opts.inductor))
                except Exception as e:
                    if opts.strict or _compat.is_dynamo_restart(e):
                        raise
                    msg = f"lowering the rewritten graph failed ({type(e).__name__}: {e})"
                    log.warning("bdpass: graph %d: %s; compiling the original graph", index, msg)
                    report.rewrites.clear()
                    report.params_after = report.params_before
                    report.nodes_after = []
                    result = plain(msg)
                else:
                    wrapper = RewrittenGraph(compiled, editor.groups, gm.forward, index,
                                             verify=opts.verify, verify_tol=opts.verify_tol)
                    wrapper.snapshot(example_inputs)
                    report.derived_bytes = sum(t.numel() * t.element_size() for t in wrapper.derived)
                    if opts.release_weights:
                        phs = [n for n in new_gm.graph.nodes if n.op == "placeholder"]
                        unused = {i for i, n in enumerate(phs[:len(example_inputs)]) if not n.users}
                        report.released_bytes = wrapper.release(example_inputs, unused)
                        log.info("bdpass: graph %d: released %d bytes of replaced weights", index,
                                 report.released_bytes)
                    result = wrapper
                    kept_new = (new_gm, new_inputs)
    for s in report.skipped:
        log.info("bdpass: graph %d: skipped %s at %s: %s", index, s.kind, s.site, s.reason)
    log.info(report.summary())
    _compat.trace_artifact("bdpass_graph_before", lambda: gm.print_readable(print_output=False))
    if kept_new is not None:
        _compat.trace_artifact("bdpass_graph_after", lambda: kept_new[0].print_readable(print_output=False))
    _compat.trace_artifact("bdpass_report", lambda: Report(graphs=[report]).to_json(), "json")
    for c in _active_collectors():
        if getattr(c, "keep_graphs", False):
            rewritten = kept_new if isinstance(result, RewrittenGraph) else None
            report.graphs_kept = (gm, rewritten[0] if rewritten else None, list(example_inputs),
                                  rewritten[1] if rewritten else None)
        c.graphs.append(report)
    return result


def _validation_error():
    from .validate import RewriteValidationError

    return RewriteValidationError


def bd_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Any = None,
               mode: str | None = None, **kwargs: Any) -> Callable:
    """``torch.compile(model, backend="bd", options={...})``."""
    if kwargs:
        raise TypeError(f"bdpass: unexpected backend argument(s) {sorted(kwargs)}; "
                        f"pass bdpass settings in options={{...}} (valid: {', '.join(BDOptions.valid_names())})")
    opts = BDOptions.parse(options)
    return compile_graph(gm, example_inputs, opts, mode)
