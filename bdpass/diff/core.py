"""Graph diff: the graph before and after the ``bd`` backend, aligned, with numerics.

``bdpass.diff(model, *args, options=None, **kwargs)`` compiles ``model`` with the ``bd``
backend (inference, ``no_grad``, ``torch._dynamo.reset()`` before and after), keeps every
compiled Dynamo graph (several with graph breaks) and returns a :class:`Diff`:

Alignment
    Nodes that a rewrite did not touch keep their name in the rewritten graph, so the two
    node lists are aligned by name (an LCS over the names in graph order). What is left
    are rewritten regions: nodes of the original graph a rewrite removed (tagged with the
    rewrite in ``GraphReport.nodes_before``) and nodes it created (tagged with
    ``bdpass_rewrite`` / ``bdpass_origin``; new weight inputs take the region of their
    users), shown side by side. One region is one rewrite step: a PIFA chain, or a BD
    attention component (its ``bd_qk``/``bd_vo`` records). Inside a region, the node that
    *replaces* an original node - a new node whose value leaves the region (used by an
    untouched node, another region, or returned) - is paired with its ``origin`` on one
    row. Other new nodes are *internal* (pivot rows, partial products, concatenations):
    they compute other quantities than any original node, even where the shapes agree.

Numerics
    Each graph is run through an ``fx.Interpreter`` that records every node: the original
    graph in float64 (floating inputs, parameters included, cast to float64: the
    reference), the original graph in the model dtype, the rewritten graph in the model
    dtype (its derived weights as the backend computed them) and, when it differs, the
    rewritten graph in float64 (same derived weights, cast). Each graph is measured on the
    inputs the model fed it (after a graph break: the model-dtype values of the previous
    graph). For every node with a floating tensor value, the model-dtype value is compared
    with the float64 value of the original node of the same name; a replacement with the
    float64 value of its ``origin``. Internal nodes are compared with the float64 run of
    the rewritten graph (marked ``*`` / ``ref_kind == "new64"``). Measures, on the finite
    entries (a mismatch in the pattern of inf/nan counts as an infinite error):

    * ``max_abs``  = max |y - y64|
    * ``rel_l2``   = ||y - y64||_2 / ||y64||_2
    * ``sqnr_db``  = 10 log10(||y64||^2 / ||y - y64||^2)   (inf when exact)

    ``dev64`` is ``rel_l2`` between the two float64 runs at a node: the effect of rounding
    the derived weights to the model dtype, or a value that is not the original one.

BD spans
    BD replaces a q/k/v projection by one whose output is the original in another
    per-head basis; the basis cancels in the attention scores (q, k) or in the output
    projection (v). Between the two, untouched nodes carry values that legitimately
    differ from the original graph. Such nodes (``basis_changed``: ``dev64 > 0.1``, fed
    from a BD replacement whose own inputs are in the original basis, and not returned
    by the graph) are compared with the float64 run of the rewritten graph instead, so
    their error is rounding error only; the key comparison is where the basis cancels
    (the output-projection replacement, the scores), which is against the original.

Divergence rule
    The backend's error budget for the model dtype (``B``: option ``error_budget``, by default
    100 in float32 and 8 in bfloat16/float16) is the largest factor by which a rewrite may
    multiply the rounding error of the computation it replaces. With ``u``
    the unit roundoff of the model dtype (``finfo.eps / 2``: 6.0e-8 for float32, 3.9e-3
    for bfloat16, 4.9e-4 for float16), a node (untouched, or a replacement paired with its
    origin) *diverges* when::

        rel_l2(rewritten) > max(2 * rel_l2(original), B * u)

    i.e. the rewritten graph is more than twice as far from float64 as the original graph
    at the same node, and further than one rounding amplified by the full budget (the
    floor keeps exact or near-exact nodes, where twice the original error is 0 or
    noise, from being flagged). A non-finite rewritten error where the original one is
    finite always diverges. ``Diff.first_divergence`` is the first diverging node in
    graph order (graphs in compile order), or None. ``Diff.worst_growth`` is the largest
    ratio rewritten / original error over those nodes, whether or not it diverges.

Costs
    Parameter bytes are weight elements (``GraphReport.params_*``) times the element size
    of the model dtype. FLOPs: the matmul-class FLOPs of each run counted by
    ``torch.utils.flop_counter`` (this input, whole graph, before and after), and the
    per-token saving the rewrites claim (``RewriteRecord.flops_saved``).

The tool is meant for small models and inputs: the float64 values of every node are kept
in memory while the diff is built.

Modules: this one is the driver (:func:`diff`, :func:`build_diff`); :mod:`.model` holds the
data (:class:`Diff`, :class:`GraphDiff`, :class:`Row`, :class:`Region`, :class:`Stats`, ...),
:mod:`.align` pairs the nodes of the two graphs, :mod:`.numerics` measures them and applies
the divergence rule; :mod:`.formatting` is shared by the renderers :mod:`.render_text`,
:mod:`.render_html` and :mod:`.render_json`.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

import torch

from ..api import collect_reports
from ..backend import bd_backend
from ..options import BDOptions
from ..report import Report
from .align import align_graph
# the data and the numerics stay reachable here too (bdpass.diff.core.Row, .stats, ...)
from .model import NOTHING_FOUND, Diff, GraphDiff, Region, Row, RuleRow, Stats  # noqa: F401
from .numerics import BASIS_DEV, _Recorder, measure_graph, stats  # noqa: F401


def diff(model: Any, *args: Any, options: Any = None, **kwargs: Any) -> Diff:
    """Compile ``model`` with the ``bd`` backend on these inputs and diff every compiled graph.

    The model is run once (inference, ``no_grad``); then each graph is re-run through an
    interpreter in float64 and in the model dtype (see the module docstring)."""
    opts = BDOptions.parse(options)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend=lambda gm, ex: bd_backend(gm, ex, options=opts),
                                 dynamic=False)
        with collect_reports(keep_graphs=True) as report, torch.no_grad():
            compiled(*args, **kwargs)
    finally:
        torch._dynamo.reset()
    return build_diff(report, opts)


def build_diff(report: Report, options: Any = None) -> Diff:
    """A Diff from a Report collected with ``collect_reports(keep_graphs=True)``."""
    opts = BDOptions.parse(options)
    graphs = []
    numels: Counter = Counter()
    for pos, g in enumerate(report.graphs):
        gd = GraphDiff(position=pos, report=g)
        align_graph(gd)
        kept = g.graphs_kept
        if kept is None:
            gd.numerics_error = "graphs were not kept (collect_reports(keep_graphs=True))"
        else:
            for t in kept[2]:
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    numels[t.dtype] += t.numel()
            gd.dtype = _dominant_dtype(kept[2])
        graphs.append(gd)
    dtype = max(numels, key=lambda d: numels[d]) if numels else None
    u = float(torch.finfo(dtype).eps) / 2 if dtype is not None else None
    floor = opts.budget_for(dtype) * u if u is not None else None
    for gd in graphs:
        if gd.report.graphs_kept is not None:
            try:
                measure_graph(gd, floor)
            except Exception as e:  # a graph the interpreter cannot re-run: diff without numerics
                for r in gd.rows:
                    r.orig = r.new = None
                    r.diverged = False
                gd.first_divergence = None
                msg = str(e).strip().splitlines()
                gd.numerics_error = f"{type(e).__name__}: {msg[0] if msg else ''}"
    return Diff(report=report, graphs=graphs, options=opts,
                dtype=str(dtype).replace("torch.", "") if dtype is not None else None,
                unit_roundoff=u, floor=floor)


def _dominant_dtype(inputs: Sequence[Any]) -> str | None:
    c: Counter = Counter()
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            c[t.dtype] += t.numel()
    if not c:
        return None
    return str(max(c, key=lambda d: c[d])).replace("torch.", "")
