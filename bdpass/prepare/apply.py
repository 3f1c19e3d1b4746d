"""``bdpass.prepare``: rewrite a model's modules once, driven by the backend's analysis.

Steps (see the package documentation for what the result is):

1. An eager run on the example inputs counts how often each of the model's tensors is read
   (:class:`~bdpass.prepare.edits.ReadCounter`): an edit may only touch tensors read once.
2. A compiled run (:func:`~bdpass.prepare.capture.run_captured`): the first instance of
   every graph (a graph with one set of weights; one per layer with ``split_layers``) is
   analysed by :func:`bdpass.backend.decide_graph` exactly as the ``bd`` backend does (find,
   decide, and with ``validate`` the float64 check of the rewritten graph). The other
   instances of the same graph (the other layers of a stack: Dynamo runs them all through
   one graph) refit those decisions to their own weights (:func:`bdpass.backend.refit_graph`:
   each rewrite refactorized, and refused where its identity does not hold within the error
   budget there), unless ``share_analysis=False``. Each instance's outputs are computed
   with the weights before any edit; then its decisions become module edits
   (:func:`~bdpass.prepare.edits.edits_for`, each rule's own) that are applied at once, and
   the decisions and their float64 factors are dropped. So preparing holds the model plus
   one instance's float64 work, never all layers' factors.
3. The plan of the prepared modules goes to ``model.config.quantization_config`` (and a copy
   to ``model.config.bdpass``) for transformers models (``save_pretrained`` writes it), and
   the report to ``model.bdpass_report``.
"""
from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..backend import decide_graph, refit_graph
from ..graph.linears import common_module_path
from ..options import BDOptions
from ..report import GraphReport, Report
from ..runtime import _flat_tensors, compare_outputs
from .capture import CaptureSession, TensorRegistry, run_captured
from .edits import ModelIndex, NotPreparable, ReadCounter, apply_edit, edits_for

log = logging.getLogger("bdpass")

__all__ = ["prepare", "PrepareReport", "state_bytes", "PREPARE_OPTIONS"]

# options of prepare itself, accepted in ``options`` next to the backend's
PREPARE_OPTIONS = {"split_layers": True, "share_analysis": True}


def state_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once."""
    seen: dict = {}
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes() if t.device.type != "meta"
                        else t.numel() * t.element_size())
    return sum(seen.values())


@dataclass
class PrepareReport:
    """What ``prepare`` did: the backend's report per graph instance, the edits made, the
    rewrites that could not be made at module level (with the reason), sizes and times."""
    graphs: list[GraphReport] = field(default_factory=list)
    instances: list[str] = field(default_factory=list)      # the module prefix of each instance's weights
    edits: list[dict] = field(default_factory=list)         # Edit.summary() of each applied edit
    not_preparable: list[NotPreparable] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0
    graphs_compiled: int = 0
    seconds: dict = field(default_factory=dict)
    verified: str | None = None
    # names of the tensors the rewrites read, replace or fold (the rest is left as it was)
    touched: set = field(default_factory=set)

    @property
    def report(self) -> Report:
        """The backend's report of every analysed graph instance."""
        return Report(graphs=list(self.graphs))

    @property
    def rewrites(self):
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def skipped(self):
        return [s for g in self.graphs for s in g.skipped]

    def to_dict(self) -> dict:
        return {"instances": list(self.instances), "edits": list(self.edits),
                "not_preparable": [vars(b) for b in self.not_preparable], "bytes_before": self.bytes_before,
                "bytes_after": self.bytes_after, "graphs_compiled": self.graphs_compiled,
                "seconds": dict(self.seconds), "verified": self.verified,
                "report": self.report.to_dict()}

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        saved = self.bytes_before - self.bytes_after
        pct = 100.0 * saved / self.bytes_before if self.bytes_before else 0.0
        lines = [f"bdpass.prepare: {self.graphs_compiled} graph(s), {len(self.graphs)} instance(s) analysed; "
                 f"{len(self.edits)} rewrite(s) prepared, {len(self.not_preparable)} not preparable, "
                 f"{len(self.skipped)} skipped by the analysis",
                 f"parameter and buffer bytes {self.bytes_before:,} -> {self.bytes_after:,} (-{pct:.1f}%)"]
        for e in self.edits:
            mods = ", ".join(f"{p} -> {t}" for p, t in e["modules"].items())
            fold = f"; folded {', '.join(e['folded'])}" if e["folded"] else ""
            lines.append(f"  {e['kind']} at {e['site']}: {mods}{fold}; weights {e['params_before']:,} -> "
                         f"{e['params_after']:,}")
        lines += [f"  {b.line()}" for b in self.not_preparable]
        if self.seconds:
            s = self.seconds
            lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in s.items()))
        if self.verified:
            lines.append(f"verify: {self.verified}")
        return "\n".join(lines)


class NeedsRealWeights(Exception):
    """Raised by :func:`_prepare` given ``borrowed`` tensors (stand-ins for weights that were
    not read: another layer's values, shapes and dtypes alike) when its analysis or its edits
    would use one of them: the caller reads the real weights and prepares again."""


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _split_options(options: Any) -> tuple[BDOptions, dict]:
    own = dict(PREPARE_OPTIONS)
    if options is None:
        options = {}
    if isinstance(options, Mapping):
        options = dict(options)
        for k in PREPARE_OPTIONS:
            if k in options:
                own[k] = options.pop(k)
        # prepared weights are about memory, and the machine that prepares is seldom the one
        # that serves: its timings do not decide unless asked to (cost_model=True)
        options.setdefault("cost_model", False)
    for k in PREPARE_OPTIONS:
        if not isinstance(own[k], bool):
            raise TypeError(f"bdpass.prepare: option {k!r} must be a bool, got {own[k]!r}")
    return BDOptions.parse(options), own


def _label(args: list, idx: ModelIndex) -> str:
    """The module path all named tensors of a graph instance share ("" if none)."""
    names = [idx.name(t, "") for t in args if isinstance(t, torch.Tensor)]
    mods = [n.rpartition(".")[0] for n in names if n]
    return common_module_path(mods) if mods and all(mods) else ""


def prepare(model: nn.Module, /, *example_args: Any, options: Any = None, inplace: bool = True,
            **example_kwargs: Any) -> nn.Module:
    """Rewrite ``model``'s modules with the ``bd`` backend's decisions on these example inputs
    and return it: an ordinary module, smaller in memory, that works at any input shape.

    ``options``: the backend's (:class:`bdpass.BDOptions`; ``lowering``/``inductor``/
    ``release_weights`` do not apply; ``verify=True`` compares the prepared model's output
    with the original's on the example inputs and raises ``bdpass.VerificationError``),
    except that ``cost_model`` defaults to False here: every legal rewrite within the error
    budget is applied, in its most accurate form, because prepared weights are about memory
    and the machine that prepares is seldom the one that serves (``cost_model=True`` lets
    this machine's timings at the example inputs' size decide, as the backend does);
    plus ``split_layers`` (default True: one graph per block of a layer stack, so that
    preparing holds one layer's float64 work at a time) and ``share_analysis`` (default
    True: the layers of a stack, one graph, are analysed and validated once, at the first
    layer; every other layer refactorizes the same rewrites from its own weights, each
    checked against the error budget). ``inplace=False`` prepares a deep copy and leaves
    ``model`` untouched.

    The model is run twice on the example inputs (eagerly, then compiled), under
    ``no_grad``; ``torch._dynamo.reset()`` is called before and after. What was prepared,
    and what could not be and why, is in ``model.bdpass_report`` (:class:`PrepareReport`).
    A prepared model is static: its factors are not recomputed if weights change."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bdpass.prepare: expected an nn.Module, got {type(model).__name__}")
    opts, own = _split_options(options)
    return _prepare(model, example_args, example_kwargs, opts, own, inplace, {})


def _graph_key(gm: torch.fx.GraphModule, args: list) -> tuple:
    """Graphs of the same code called with inputs of the same shapes and dtypes decide alike
    (the layers of a stack, in one ``prepare`` or in several)."""
    return (gm.code, tuple((tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor)
                           else repr(t) for t in args))


def _prepare(model: nn.Module, example_args: tuple, example_kwargs: dict, opts: BDOptions, own: dict,
             inplace: bool, shared: dict, session: CaptureSession | None = None,
             borrowed: set | None = None) -> nn.Module:
    """:func:`prepare`; ``shared`` maps graph keys (:func:`_graph_key`) to the first
    instance's report and decisions (without tensors), and may be carried from one call to
    the next (the blocks of a checkpoint prepared one at a time), as may ``session`` (the
    capturing backend and Dynamo's cache: a block of a kind already traced is not traced
    again). ``borrowed``: storage addresses (:func:`_storage_key`) of tensors that stand in
    for weights not read (they only shape the run); :class:`NeedsRealWeights` is raised,
    before the model is edited, where a graph would be analysed afresh, a refit would read,
    or an edit would replace, keep or fold, one of them. ``touched`` in the report names the tensors
    that the rewrites read, replaced or folded."""
    from .checkpoint import plan_of, set_config_plan

    model = getattr(model, "_orig_mod", model)
    if not inplace:
        model = copy.deepcopy(model)
    if model.training:
        warnings.warn("bdpass.prepare: the model is in training mode; the analysis sees training-mode "
                      "behaviour (dropout, ...). Call model.eval() first.", stacklevel=2)
    t_start = time.perf_counter()
    rep = PrepareReport(bytes_before=state_bytes(model))
    idx = ModelIndex(model)

    # 1. eager run: how often each tensor is read
    t0 = time.perf_counter()
    counter = ReadCounter(idx.tensors())
    with torch.no_grad(), counter:
        reference = model(*example_args, **example_kwargs)
    idx.reads = counter
    reference = [t.detach().clone() for t in _flat_tensors(_as_flat(reference))] if opts.verify else None
    t_reads = time.perf_counter() - t0

    # 2. compiled run: analyse each instance, apply its edits
    edited = TensorRegistry()
    times = {"analysis": 0.0, "edits": 0.0}
    # shared: graph key -> (its first instance's report, its decisions without tensors): the
    # other instances of a graph (the other layers of a stack) refit those decisions

    def before_call(a: list) -> None:
        for t in a:
            if isinstance(t, torch.Tensor) and t in edited:
                raise RuntimeError(
                    f"bdpass.prepare: {idx.name(t)} was edited by an earlier graph and is read again by another "
                    f"graph of the same forward; the model is left partially prepared (use inplace=False to "
                    f"keep the original)")

    def stand_ins(ts: Any) -> list[str]:
        return [idx.name(t) for t in ts if isinstance(t, torch.Tensor) and _storage_key(t) in borrowed]

    def on_instance(gm: torch.fx.GraphModule, a: list, index: int) -> Any:
        with torch.no_grad():
            out = gm.forward(*a)
        t1 = time.perf_counter()
        key = _graph_key(gm, a) if own["share_analysis"] else None
        first = shared.get(key) if key is not None else None
        if borrowed:
            bad = stand_ins(a[i] for d in first[1] for i in d.derived_from) if first is not None else []
            if bad:
                raise NeedsRealWeights(f"the rewrites read {bad[0]}")
        try:
            if first is not None:
                report, decisions = refit_graph(first[0], first[1], a, opts, index)
            else:
                report, decisions = decide_graph(gm, a, opts, index)
                if borrowed and (report.rewrites or report.skipped) and stand_ins(a):
                    raise NeedsRealWeights(f"graph {index} is analysed afresh (a kind not seen before)")
                if key is not None:
                    shared[key] = (report, [d.without_tensors() for d in decisions])
        except NeedsRealWeights:
            raise
        except Exception as e:
            if opts.strict:
                raise
            report = GraphReport(index=index, lowering="prepare")
            report.fallback = f"internal error during rewriting ({type(e).__name__}: {e})"
            log.warning("bdpass.prepare: graph %d: %s", index, report.fallback)
            decisions = []
        report.lowering = "prepare"
        times["analysis"] += time.perf_counter() - t1
        rep.graphs.append(report)
        rep.instances.append(_label(a, idx))
        if not decisions:
            return out
        t2 = time.perf_counter()
        reads = [a[i] for d in decisions for i in d.derived_from]
        try:
            edits, bad = edits_for(decisions, a, idx, index)
        except Exception as e:
            if opts.strict:
                raise
            edits, bad = [], [NotPreparable("all", rep.instances[-1] or "graph", f"internal error "
                                            f"({type(e).__name__}: {e})", index)]
        del decisions
        if borrowed:
            kept = stand_ins([t for ed in edits for _, t, _ in ed.fold] + [t for ed in edits for t in ed.dropped]
                             + [t for ed in edits for m in ed.replace.values() for t in m.state_dict().values()])
            if kept:
                raise NeedsRealWeights(f"an edit replaces, keeps or folds {kept[0]}")
        rep.touched.update(idx.name(t) for t in reads if isinstance(t, torch.Tensor))
        rep.touched.update(idx.name(t) for ed in edits for t in ed.dropped)
        rep.touched.update(n for ed in edits for n, _, _ in ed.fold)
        for ed in edits:
            for t in ed.dropped:
                edited.add(t)
            for _, t, _ in ed.fold:
                edited.add(t)
            apply_edit(model, ed)
            rep.edits.append(ed.summary())
        rep.not_preparable.extend(bad)
        times["edits"] += time.perf_counter() - t2
        return out

    t0 = time.perf_counter()
    _, rep.graphs_compiled = run_captured(model, example_args, example_kwargs, on_instance, before_call,
                                          split_layers=own["split_layers"], session=session)
    t_run = time.perf_counter() - t0
    rep.seconds = {"total": time.perf_counter() - t_start, "eager read count": t_reads,
                   "compiled run": t_run, "analysis": times["analysis"],
                   "validation": sum(g.validate_seconds for g in rep.graphs), "edits": times["edits"]}
    rep.bytes_after = state_bytes(model)
    for b in rep.not_preparable:
        log.warning("bdpass.prepare: %s", b.line())
    if reference is not None:
        with torch.no_grad():
            got = _flat_tensors(_as_flat(model(*example_args, **example_kwargs)))
        compare_outputs(got, reference, opts.verify_tol, "bdpass.prepare verify")
        rep.verified = "the prepared model matches the original on the example inputs"
    model.bdpass_report = rep
    set_config_plan(model, plan_of(model))
    rep.seconds["total"] = time.perf_counter() - t_start
    return model


def _as_flat(out: Any) -> Any:
    """Tensors of a model output (tuples, lists, dicts, ``ModelOutput``s, caches left out)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        items = out.values() if isinstance(out, Mapping) else out.to_tuple()
        return [_as_flat(v) for v in items]
    if isinstance(out, (list, tuple)):
        return [_as_flat(v) for v in out]
    return []
