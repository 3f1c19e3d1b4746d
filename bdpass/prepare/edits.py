"""From the backend's decisions (``editor.decisions`` of one graph instance) to edits of the
model's modules, each proved equivalent on the graph, and their application.

What an edit is, per decision:

* **BD** (:class:`~bdpass.rewrites.decisions.BdDecision`): every partner's weights (query
  columns, output-projection rows, biases) get ``B`` folded in, *in place* (same
  parameters, same shapes); every source projection module is replaced by a
  :class:`~bdpass.prepare.modules.BDLinear` holding the tensors of its ``bd_linear`` call.
  All values come from ``bd_attention._ComponentMath.tensors`` (the backend's own math,
  float64, rounded once to the weight's dtype).
* **PIFA** (:class:`~bdpass.rewrites.decisions.PifaDecision`): the chain's second linear
  module becomes a :class:`~bdpass.prepare.modules.PivotLinear`, its first an
  :class:`~bdpass.prepare.modules.Absorbed` identity. A chain whose output order the next
  chain absorbs (``restore_order=False``) stays linked to it: both are prepared, the first
  without restoring the order, the next with the absorbed order in its first weight; if the
  next chain cannot be prepared, this one is prepared with the order restored (its factors
  do not depend on the link); a chain that absorbed the order of a chain that cannot be
  prepared is prepared with that order undone (a row permutation of its first factor: the
  pivots of a chain depend on its second weight only).

When a module may be replaced (checked on the graph, per site):

* the weight is the ``weight`` of exactly one module (not tied, the module not shared), an
  ``nn.Linear`` (its own ``forward``) or a transformers ``Conv1D``; the site's bias is that
  module's ``bias``; the linear op ran inside that module's forward (its innermost
  ``nn_module_stack`` entry); the module has no hooks; it computes in its weight's dtype;
* for a PIFA chain, the ops between the two modules only move leading dimensions without
  naming the channel count (``reshape(..., -1)``, ``flatten``/``unsqueeze`` of leading
  dims, ``contiguous``, ...), so that they act the same on the input of the first linear;
  nothing else reads the intermediate (the backend's chain finder checks it).

Partners are folded in place whatever their spelling (``nn.Linear``, ``F.linear`` on a raw
parameter, ``x @ W.T``, einsum weights under views): the fold is written back through the
inverse of the views the graph applied to the parameter.

Every tensor an edit changes or drops must be read once in the whole forward (counted on an
eager run, :class:`ReadCounter`): a weight that another op reads as well (tied weights, a
module called twice, ``weight.norm()`` elsewhere) would see the edit there too.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from ..graph.linears import LinearSite, common_module_path
from ..graph.ops import canonical, dtype_of
from ..report import RewriteRecord
from ..rewrites import bd_attention
from ..rewrites import pifa as pifa_rewrite
from ..rewrites.decisions import BdDecision, PifaDecision
from ..rewrites.pifa_plan import _reshape_sizes, _static
from ..runtime import finalize_tensor
from .modules import Absorbed, BDLinear, PivotLinear

__all__ = ["Edit", "NotPreparable", "ModelIndex", "ReadCounter", "edits_for", "apply_edit"]


# ============================================================================ the model's tensors
_METADATA_GETTERS = {"dtype", "shape", "device", "requires_grad", "is_cuda", "is_cpu", "is_meta", "layout", "ndim",
                     "is_sparse", "is_quantized", "names", "grad_fn", "is_leaf", "grad", "_version", "itemsize",
                     "nbytes", "is_nested", "is_mps", "is_xpu"}
_METADATA_METHODS = {"size", "dim", "numel", "stride", "is_floating_point", "is_complex", "element_size", "data_ptr",
                     "is_contiguous", "get_device", "nelement", "storage_offset", "__len__", "__hash__", "__eq__"}


class ReadCounter(TorchFunctionMode):
    """Counts, during an eager run, the torch calls that read each watched tensor's values
    (calls that only look at its shape, dtype or device are not reads)."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        super().__init__()
        self._watch = {id(t): weakref.ref(t) for t in tensors}
        self.counts: dict[int, int] = {}

    def _is_metadata(self, func: Any) -> bool:
        name = getattr(func, "__name__", None)
        if name == "__get__":
            return getattr(getattr(func, "__self__", None), "__name__", None) in _METADATA_GETTERS
        return name in _METADATA_METHODS

    def _count(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            r = self._watch.get(id(obj))
            if r is not None and r() is obj:
                self.counts[id(obj)] = self.counts.get(id(obj), 0) + 1
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                self._count(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                self._count(o)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._is_metadata(func):
            self._count(args)
            self._count(kwargs)
        return func(*args, **kwargs)

    def reads(self, t: torch.Tensor) -> int:
        return self.counts.get(id(t), 0)


class ModelIndex:
    """The model's tensors by identity: which (module path, attribute) hold each, and how
    often the example forward read it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._owners: dict[int, list[tuple[str, str, weakref.ref]]] = {}
        for path, m in model.named_modules(remove_duplicate=False):
            for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
                if t is not None:
                    self._owners.setdefault(id(t), []).append((path, attr, weakref.ref(t)))
        self.reads: ReadCounter | None = None

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for entries in self._owners.values():
            t = entries[0][2]()
            if t is not None:
                out.append(t)
        return out

    def owners(self, t: torch.Tensor) -> list[tuple[str, str]]:
        return [(p, a) for p, a, r in self._owners.get(id(t), []) if r() is t]

    def name(self, t: torch.Tensor | None, fallback: str = "?") -> str:
        if t is None:
            return fallback
        own = self.owners(t)
        return f"{own[0][0]}.{own[0][1]}".lstrip(".") if own else fallback

    def read_count(self, t: torch.Tensor) -> int | None:
        return None if self.reads is None else self.reads.reads(t)


def _last_component(path: str) -> str:
    toks = [t for t in re.split(r"[.\[\]'\"]+", path) if t]
    return toks[-1] if toks else ""


def _innermost_module(node: torch.fx.Node) -> tuple[str, Any] | None:
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    return (path if isinstance(path, str) else str(path)), typ


def _same_type(entry: Any, cls: type) -> bool:
    """Whether an ``nn_module_stack`` type entry (a class, or its qualified name) is ``cls``."""
    if isinstance(entry, type):
        return entry is cls
    name = str(entry)
    return name == cls.__name__ or name.endswith("." + cls.__name__)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:
        return None
    return Conv1D


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or getattr(m, "_backward_pre_hooks", None) or getattr(m, "_forward_hooks_with_kwargs", None))


def _module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "Linear"
    c = _conv1d_type()
    if c is not None and type(m) is c:
        return "Conv1D"
    return None


@dataclass
class _Backed:
    path: str
    module: nn.Module
    kind: str            # "Linear" | "Conv1D"


def module_site(site: LinearSite, args: Sequence[Any], idx: ModelIndex) -> _Backed | str:
    """The module whose forward computes ``site`` (which may then be replaced by another
    module computing the same function of its input), or why there is none."""
    w = args[site.weight.index]
    own = idx.owners(w)
    wname = idx.name(w, site.weight.name)
    if not own:
        return f"{wname} is not a tensor of the model"
    if len(own) > 1:
        return f"{wname} is held by several modules ({', '.join(f'{p}.{a}'.lstrip('.') for p, a in own)})"
    path, attr = own[0]
    m = idx.model.get_submodule(path) if path else idx.model
    kind = _module_kind(m)
    if kind is None or attr != "weight":
        return (f"{wname} is not the weight of an nn.Linear or Conv1D module ({type(m).__name__}): "
                f"no module to replace")
    b = None if site.bias is None else args[site.bias.index]
    if b is not m.bias:
        return f"the bias of the linear at {path} is not that module's bias"
    if kind == "Linear" and not (site.weight_is_out_in and not site.weight_ops and not site.reshaped):
        return f"{path}: its weight is not applied as nn.Linear applies it"
    if kind == "Conv1D" and (site.weight_is_out_in or site.weight_ops or site.reshaped):
        return f"{path}: its weight is not applied as Conv1D applies it"
    inner = _innermost_module(site.core)
    if inner is None or not _same_type(inner[1], type(m)) or (path and _last_component(inner[0]) != path.rsplit(".", 1)[-1]):
        return f"the linear reading {wname} is not computed inside {path or 'the model'}'s forward"
    if _has_hooks(m):
        return f"{path} has hooks (a replacement would not run them)"
    if dtype_of(site.output) is not None and dtype_of(site.output) != w.dtype:
        return f"{path} computes in {dtype_of(site.output)}, not in its weight's dtype {w.dtype}"
    return _Backed(path, m, kind)


def _single_read(tensors: Sequence[torch.Tensor | None], idx: ModelIndex) -> str | None:
    for t in tensors:
        if t is None:
            continue
        n = idx.read_count(t)
        if n is not None and n > 1:
            return (f"{idx.name(t)} is read {n} times in one forward (tied weights or a module used more than "
                    f"once): an edit would change every use")
    return None


def _owned_once(tensors: Sequence[torch.Tensor | None], idx: ModelIndex, names: Sequence[str]) -> str | None:
    for t, n in zip(tensors, names):
        if t is None:
            continue
        own = idx.owners(t)
        if not own:
            return f"{n} is not a tensor of the model (a constant or an argument): cannot be edited"
        if len(own) > 1:
            return f"{idx.name(t)} is held by several modules: an edit would change all of them"
    return None


# ============================================================================ edits
@dataclass
class NotPreparable:
    """A rewrite the backend made in the graph that has no module-level form here."""
    kind: str
    site: str
    reason: str
    graph: int

    def line(self) -> str:
        return f"not preparable: {self.kind} at {self.site} (graph {self.graph}): {self.reason}"


@dataclass
class Edit:
    """The module-level form of one decision."""
    kind: str                                   # "pifa", or the BD kinds joined ("bd_qk+bd_vo")
    site: str                                   # module path(s) of the model
    graph: int
    records: list[RewriteRecord]
    replace: dict[str, nn.Module] = field(default_factory=dict)      # path -> new module
    fold: list[tuple[str, torch.Tensor, torch.Tensor]] = field(default_factory=list)   # (name, tensor, value)
    dropped: list[torch.Tensor] = field(default_factory=list)        # tensors the model stops holding
    folded: list[str] = field(default_factory=list)                  # names of the tensors folded in place

    @property
    def params_before(self) -> int:
        return sum(r.params_before for r in self.records)

    @property
    def params_after(self) -> int:
        return sum(r.params_after for r in self.records)

    def summary(self) -> dict:
        return {"kind": self.kind, "site": self.site, "graph": self.graph,
                "modules": {p: type(m).__name__ for p, m in self.replace.items()},
                "folded": list(self.folded) or [n for n, _, _ in self.fold],
                "params_before": self.params_before, "params_after": self.params_after}


def _site_name(paths: Sequence[str]) -> str:
    c = common_module_path(paths)
    if c and all(len(p.split(".")) - len(c.split(".")) <= 1 for p in paths):
        return c
    return " -> ".join(dict.fromkeys(paths))


def _value(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (exact: float64 values or int64 indices) as ``like`` holds it."""
    return finalize_tensor(t, like.dtype if t.is_floating_point() else None, like.device)


def _inverse_weight_view(site: LinearSite, param: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """The parameter value whose ``site.weight_matrix`` is ``W`` (d_in, d_out)."""
    if not site.weight_ops:
        return W.t() if site.weight_is_out_in else W
    shapes = [tuple(int(s) for s in param.shape)]
    for name, a in site.weight_ops:
        cur = shapes[-1]
        shapes.append(tuple(a[0]) if name == "reshape" else tuple(cur[d] for d in a[0]))
    out = W
    for (name, a), before in zip(reversed(site.weight_ops), reversed(shapes[:-1])):
        if name == "reshape":
            out = out.reshape(before)
        else:
            perm = list(a[0])
            inv = [perm.index(d) for d in range(len(perm))]
            out = out.permute(inv)
        if name not in ("reshape", "permute"):
            raise AssertionError(name)
    return out


_AGNOSTIC = {"contiguous", "clone", "detach", "alias", "type_as", "to", "cast", "dropout", "flatten", "unflatten",
             "unsqueeze", "squeeze"}


def _between_ok(chain: Any, inner: tuple[_Backed, _Backed]) -> str | None:
    """Why the ops between the chain's two modules would not act alike on the first
    module's input (None if they do). Ops inside either module's own forward (Conv1D's
    reshapes) are part of the module."""
    names = {(type(b.module), b.path.rsplit(".", 1)[-1]) for b in inner}
    for m in chain.between:
        im = _innermost_module(m)
        if im is not None and any(_same_type(im[1], t) and _last_component(im[0]) == n for t, n in names):
            continue
        name = canonical(m)
        if name == "reshape":
            sizes = _reshape_sizes(m)
            if sizes is not None and not isinstance(sizes[-1], torch.fx.Node) and _static(sizes[-1]) == -1:
                continue
            return f"{m.name} reshapes with the chain's inner width {chain.rank} spelled out"
        if name not in _AGNOSTIC:
            return f"{m.name} between the two modules"
    return None


def _pifa_module(d: PifaDecision, restore_order: bool, second: _Backed, requires_grad: bool,
                 input_order: torch.Tensor | None = None) -> PivotLinear:
    """``input_order``: the producer's column order that the factors' first weight absorbed,
    to be undone (the producer stays as it was, so the input arrives in natural order)."""
    f = d.factors
    w = second.module.weight
    chain = d.chain
    mod = PivotLinear(chain.first.d_in, chain.rank, chain.second.d_out, bias=f.b_pivot is not None,
                      restore_order=restore_order, device=w.device, dtype=w.dtype, requires_grad=requires_grad,
                      replaces=second.kind)
    w_pivot = f.w_pivot
    if input_order is not None:     # rows of w_pivot are in the producer's order: w_abs = w_nat[order]
        w_pivot = w_pivot[torch.argsort(input_order.to(w_pivot.device))]
    with torch.no_grad():
        for name, v in (("w_pivot", w_pivot), ("b_pivot", f.b_pivot), ("coeff", f.coeff), ("b_rest", f.b_rest)):
            if v is not None:
                getattr(mod, name).copy_(_value(v, w))
        if restore_order:
            mod.pivots.copy_(f.pivots.to(w.device))
            mod.rest.copy_(f.rest.to(w.device))
    return mod


def _pifa_edits(decisions: list[PifaDecision], args: Sequence[Any], idx: ModelIndex, graph: int):
    edits, bad = [], []
    backed: dict[int, tuple[_Backed, _Backed]] = {}
    why: dict[int, str] = {}
    by_chain = {id(d.chain): k for k, d in enumerate(decisions)}
    for k, d in enumerate(decisions):
        c = d.chain
        b1, b2 = module_site(c.first, args, idx), module_site(c.second, args, idx)
        reason = b1 if isinstance(b1, str) else b2 if isinstance(b2, str) else None
        if reason is None and b1.module is b2.module:
            reason = "both linears are one module"
        if reason is None:
            reason = _between_ok(c, (b1, b2))
        if reason is None:
            reason = _single_read([args[s.index] for x in (c.first, c.second)
                                   for s in (x.weight, x.bias) if s is not None], idx)
        if reason:
            why[k] = reason
        else:
            backed[k] = (b1, b2)
    # a chain whose input arrives in another chain's order: if that chain is not prepared (it
    # stays as it was, its output in natural order), the order its first weight absorbed is
    # undone (a row permutation of w_pivot); a producer whose consumer is not prepared
    # restores its own order
    unabsorb: dict[int, torch.Tensor] = {}
    for k, d in enumerate(decisions):
        if k in why or d.producer is None:
            continue
        p = by_chain.get(id(d.producer))
        if p is None:
            why[k] = "its first weight absorbed the column order of a chain this graph did not decide"
        elif p in why:      # the order exactly as the consumer's factors absorbed it
            unabsorb[k] = pifa_rewrite._column_order(d.producer, args, d.error_budget)
    consumers = {by_chain.get(id(d.producer)): k for k, d in enumerate(decisions) if d.producer is not None}
    for k, d in enumerate(decisions):
        site = _chain_site(d, backed, idx, args)
        if k in why:
            bad.append(NotPreparable("pifa", site, why[k], graph))
            continue
        b1, b2 = backed[k]
        restore = d.restore_order or consumers.get(k) is None or consumers[k] in why
        w = b2.module.weight
        mod = _pifa_module(d, restore, b2, w.requires_grad, unabsorb.get(k))
        ed = Edit("pifa", site, graph, [d.record])
        ed.replace[b2.path] = mod
        w1 = b1.module.weight
        ed.replace[b1.path] = Absorbed(d.chain.first.d_in, d.chain.first.d_out, b2.path, b1.kind, device=w1.device,
                                       dtype=w1.dtype)
        ed.dropped = [t for b in (b1, b2) for t in (b.module.weight, b.module.bias) if t is not None]
        edits.append(ed)
    return edits, bad


def _chain_site(d: PifaDecision, backed: dict, idx: ModelIndex, args: Sequence[Any]) -> str:
    c = d.chain
    paths = [idx.owners(args[s.weight.index]) for s in (c.first, c.second)]
    names = [o[0][0] if o else s.weight.name for o, s in zip(paths, (c.first, c.second))]
    return _site_name(names)


def _bd_edits(d: BdDecision, args: Sequence[Any], idx: ModelIndex, graph: int):
    comp, sites, sources = d.component, d.sites, d.sources
    kinds = "+".join(sorted({r.kind for r in d.records}))
    names = {lin: idx.name(args[sites[lin].weight.index], sites[lin].weight.name) for lin in comp.linears}
    paths = [n.rsplit(".", 1)[0] for n in names.values()]
    site = _site_name(paths)
    backed: dict[int, _Backed] = {}
    reason = None
    for lin in comp.linears:
        s = sites[lin]
        ts = [args[s.weight.index], None if s.bias is None else args[s.bias.index]]
        if lin in sources:
            b = module_site(s, args, idx)
            if isinstance(b, str):
                reason = f"source projection: {b}"
                break
            backed[lin] = b
        else:
            reason = _owned_once(ts, idx, [s.weight.name, s.bias.name if s.bias else ""])
            if reason:
                reason = f"partner projection: {reason}"
                break
        reason = _single_read(ts, idx)
        if reason:
            break
    if reason:
        return None, NotPreparable(kinds, site, reason, graph)
    math_ = bd_attention._ComponentMath(comp, sites, sources, d.error_budget)
    flat = iter(math_.tensors(args, d.factors))
    ed = Edit(kinds, site, graph, list(d.records))
    for lin in comp.linears:
        s = sites[lin]
        w = args[s.weight.index]
        b = None if s.bias is None else args[s.bias.index]
        src = sources.get(lin)
        if src is None:
            wt, bt = next(flat), next(flat)          # (d_out, d_in) folded weight, folded bias
            ed.fold.append((names[lin], w, _value(_inverse_weight_view(s, w, wt.t()), w)))
            if b is not None and not torch.equal(bt, b.detach().to("cpu", torch.float64)):
                ed.fold.append((idx.name(b, s.bias.name), b, _value(bt, b)))   # query biases (not output ones)
            continue
        T, block_table, block_col = bd_attention.op_statics(s, src)
        sel = [next(flat) for _ in range(T)]
        rest = [next(flat) for _ in range(T)]
        blocks = [(next(flat), next(flat)) for _ in block_table]
        mod = BDLinear(s.d_in, s.d_out, [int(t.numel()) for t in sel],
                       [(t, c, bw.shape[1], bb is not None) for t, c, (bw, bb) in zip(block_table, block_col, blocks)],
                       device=w.device, dtype=w.dtype, requires_grad=w.requires_grad, replaces=backed[lin].kind)
        with torch.no_grad():
            for t in range(T):
                getattr(mod, f"sel_{t}").copy_(sel[t])
                getattr(mod, f"rest_{t}").copy_(rest[t])
            for i, (bw, bb) in enumerate(blocks):
                getattr(mod, f"weight_{i}").copy_(_value(bw, w))
                if bb is not None:
                    getattr(mod, f"bias_{i}").copy_(_value(bb, w))
        ed.replace[backed[lin].path] = mod
        ed.dropped += [t for t in (w, b) if t is not None]
    return ed, None


def edits_for(decisions: Sequence[Any], args: Sequence[Any], idx: ModelIndex,
              graph: int) -> tuple[list[Edit], list[NotPreparable]]:
    """The edits of one graph instance's decisions, and the decisions that have none."""
    edits: list[Edit] = []
    bad: list[NotPreparable] = []
    pifa = [d for d in decisions if isinstance(d, PifaDecision)]
    if pifa:
        e, b = _pifa_edits(pifa, args, idx, graph)
        edits += e
        bad += b
    for d in decisions:
        if isinstance(d, BdDecision):
            e, b = _bd_edits(d, args, idx, graph)
            if e is not None:
                edits.append(e)
            if b is not None:
                bad.append(b)
    return edits, bad


def apply_edit(model: nn.Module, edit: Edit) -> None:
    """Fold in place, then swap modules."""
    with torch.no_grad():
        for _, t, v in edit.fold:
            t.copy_(v)
    edit.folded = [n for n, _, _ in edit.fold]
    for path, new in edit.replace.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, new)
    edit.fold.clear()
    edit.dropped.clear()
