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
from .report import GraphReport, NodeRecord
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


def plan_and_rewrite(gm, example_inputs, opts: BDOptions, report: GraphReport):
    """Returns (editor, records) or (None, []) when nothing was rewritten."""
    params = find_params(gm, example_inputs)
    report.params_before = weight_numel(params)
    report.params_after = report.params_before
    linears = find_linears(gm, params)
    editor: GraphEditor | None = None
    records = []
    chains = []
    if opts.pifa:
        found, skips = pifa_rw.find_chains(linears)
        report.skipped.extend(skips)
        chains, factors, links, skips = pifa_rw.select_chains(found, example_inputs, opts.error_budget,
                                                              opts.min_saving, opts.cost_model)
        report.skipped.extend(skips)
        producer_of = {c: p for p, c in links.items()}
        for k, chain in enumerate(chains):
            if editor is None:
                editor = GraphEditor(gm, example_inputs)
            prod = chains[producer_of[k]] if k in producer_of else None
            records.append(pifa_rw.apply_chain(editor, chain, len(records), opts.error_budget,
                                               producer=prod, restore_order=k not in links,
                                               factors=factors[k]))
    if opts.bd_qk or opts.bd_vo:
        from .graph.layout import analyze
        from .rewrites import bd_attention, bd_plan

        used = {n for c in (chains if opts.pifa else []) for n in (c.first.core, c.second.core)}
        bd_sites = [s for s in linears if s.core not in used]
        layout = analyze(gm, bd_sites)
        comps, skips = bd_plan.plan(layout, bd_sites, opts.bd_qk, opts.bd_vo)
        report.skipped.extend(skips)
        for comp in comps:
            if editor is None:
                editor = GraphEditor(gm, example_inputs)
            recs, skips = bd_attention.apply_component(editor, comp, bd_sites, len(records), opts.error_budget,
                                                      opts.cost_model)
            report.skipped.extend(skips)
            records.extend(recs)
    report.rewrites.extend(records)
    report.params_after = report.params_before - sum(r.params_saved for r in records)
    return (editor if records else None), records


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
            editor, records = plan_and_rewrite(gm, example_inputs, opts, report)
            if editor is not None:
                new_gm, new_inputs = editor.finish()
        except Exception as e:
            if opts.strict:
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
                    if opts.strict:
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
    for c in _active_collectors():
        if getattr(c, "keep_graphs", False):
            rewritten = kept_new if isinstance(result, RewrittenGraph) else None
            report.graphs_kept = (gm, rewritten[0] if rewritten else None, list(example_inputs),
                                  rewritten[1] if rewritten else None)
        c.graphs.append(report)
    return result


def bd_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Any = None,
               mode: str | None = None, **kwargs: Any) -> Callable:
    """``torch.compile(model, backend="bd", options={...})``."""
    if kwargs:
        raise TypeError(f"bdpass: unexpected backend argument(s) {sorted(kwargs)}; "
                        f"pass bdpass settings in options={{...}} (valid: {', '.join(BDOptions.valid_names())})")
    opts = BDOptions.parse(options)
    return compile_graph(gm, example_inputs, opts, mode)
