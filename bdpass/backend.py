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

from . import _compat, rules
from .graph.linears import find_linears
from .graph.ops import dtype_of, shape_of
from .graph.params import find_params, weight_numel
from .options import BDOptions
from .report import GraphReport, NodeRecord, Report, SkipRecord
from .rewrites.editor import GraphEditor
from .rules import PlanContext
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


def plan_decisions(gm, example_inputs, opts: BDOptions, report: GraphReport,
                   exclude: dict[str, str] | None = None) -> list:
    """Plan every enabled rule on one graph (:mod:`bdpass.rules`, in registry order): the
    decisions, their records in ``report.rewrites`` and the skips in ``report.skipped``.

    ``exclude`` maps names of linear nodes (the core op of a linear site) to a reason: a
    decision that involves any of them is skipped with that reason."""
    params = find_params(gm, example_inputs)
    report.params_before = weight_numel(params)
    ctx = PlanContext(gm, example_inputs, opts, report, find_linears(gm, params), dict(exclude or {}))
    decisions = [d for r in rules.enabled(opts) for d in r.plan(ctx)]
    report.rewrites.extend(r for d in decisions for r in d.records)
    report.params_after = report.params_before - sum(r.params_saved for r in report.rewrites)
    return decisions


def plan_and_rewrite(gm, example_inputs, opts: BDOptions, report: GraphReport,
                     exclude: dict[str, str] | None = None):
    """:func:`plan_decisions`, then each decision written into a copy of the graph by its
    rule. Returns (editor, records, units) or (None, [], []) when nothing was decided;
    ``units[k]`` is the set of linear node names record ``k`` rewrote together (excluding
    any one of them refuses the whole unit); ``editor.decisions`` holds the decisions."""
    decisions = plan_decisions(gm, example_inputs, opts, report, exclude)
    if not decisions:
        return None, [], []
    editor = GraphEditor(gm, example_inputs)
    records: list = []
    units: list[frozenset[str]] = []
    for d in decisions:
        rules.rule(d.rule).rewrite(editor, d, len(records))
        records.extend(d.records)
        units.extend(d.nodes for _ in d.records)
    editor.decisions = decisions
    return editor, records, units


def decide_graph(gm, example_inputs, opts: BDOptions, index: int = 0) -> tuple[GraphReport, list]:
    """The report and decisions of one graph, for ``prepare``: with ``opts.validate`` (the
    default) through :func:`rewrite_graph`, whose float64 check needs the rewritten graph;
    without it, planned only (no graph is rewritten)."""
    if opts.validate:
        report, editor, _, _ = rewrite_graph(gm, example_inputs, opts, index)
        return report, ([] if editor is None else editor.decisions)
    report = GraphReport(index=index, lowering=opts.lowering)
    return report, plan_decisions(gm, example_inputs, opts, report)


def refit_graph(first: GraphReport, decisions: Sequence[Any], example_inputs, opts: BDOptions,
                index: int) -> tuple[GraphReport, list]:
    """The decisions of graph ``first`` (already planned and validated) at the weights of
    another instance of the same graph (another layer of a stack): each refactorized by its
    rule (``Rule.refit``); one whose identity does not hold within its error budget at these
    weights is skipped with the reason. Returns the instance's report and decisions."""
    from .identities import FactorizationError

    report = GraphReport(index=index, lowering=first.lowering, params_before=first.params_before,
                         skipped=list(first.skipped))
    out = []
    refused = 0
    for d in decisions:
        try:
            new = rules.rule(d.rule).refit(d, example_inputs)
        except FactorizationError as e:
            refused += 1
            report.skipped.extend(SkipRecord(r.kind, r.site, f"at this instance's weights: {e}",
                                             nodes=list(r.details.get("nodes", []))) for r in d.records)
            continue
        out.append(new)
        report.rewrites.extend(new.records)
    report.params_after = report.params_before - sum(r.params_saved for r in report.rewrites)
    report.validation = (f"shared with graph {first.index} (the same graph at other weights; its check: "
                         f"{first.validation or 'none'}); each rewrite refactorized here within its error budget"
                         + (f", {refused} refused" if refused else ""))
    return report, out


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
