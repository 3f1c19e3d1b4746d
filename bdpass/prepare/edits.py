"""From the backend's decisions (``editor.decisions`` of one graph instance) to edits of the
model's modules, each proved equivalent on the graph, and their application.

Each rule makes the edits of its own decisions (its ``module_edits``; BD's in
:mod:`bdpass.rewrites.bd_modules`, PIFA's in :mod:`bdpass.rewrites.pifa_modules`): module
replacements by prepared modules and in-place folds of partner weights. This module holds
what they share: the model's tensors (:class:`ModelIndex`, :class:`ReadCounter`), the
checks below, :class:`Edit` and its application.

When a module may be replaced (checked on the graph, per site):

* the weight is the ``weight`` of exactly one module (not tied, the module not shared), an
  ``nn.Linear`` (its own ``forward``) or a transformers ``Conv1D``; the site's bias is that
  module's ``bias``; the linear op ran inside that module's forward (its innermost
  ``nn_module_stack`` entry); the module has no hooks; it computes in its weight's dtype;
* a folded tensor is owned by exactly one module (:func:`owned_once`); a fold is written
  back through the inverse of the views the graph applied to the parameter
  (:func:`inverse_weight_view`).

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

from .. import rules
from ..graph.linears import LinearSite, common_module_path
from ..graph.ops import dtype_of
from ..report import RewriteRecord
from ..rules import Decision
from ..runtime import finalize_tensor

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


def last_component(path: str) -> str:
    toks = [t for t in re.split(r"[.\[\]'\"]+", path) if t]
    return toks[-1] if toks else ""


def innermost_module(node: torch.fx.Node) -> tuple[str, Any] | None:
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    path, typ = list(stack.values())[-1]
    return (path if isinstance(path, str) else str(path)), typ


def same_type(entry: Any, cls: type) -> bool:
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


def module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward:
        return "Linear"
    c = _conv1d_type()
    if c is not None and type(m) is c:
        return "Conv1D"
    return None


@dataclass
class Backed:
    path: str
    module: nn.Module
    kind: str            # "Linear" | "Conv1D"


def module_site(site: LinearSite, args: Sequence[Any], idx: ModelIndex) -> Backed | str:
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
    kind = module_kind(m)
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
    inner = innermost_module(site.core)
    if inner is None or not same_type(inner[1], type(m)) or \
            (path and last_component(inner[0]) != path.rsplit(".", 1)[-1]):
        return f"the linear reading {wname} is not computed inside {path or 'the model'}'s forward"
    if _has_hooks(m):
        return f"{path} has hooks (a replacement would not run them)"
    if dtype_of(site.output) is not None and dtype_of(site.output) != w.dtype:
        return f"{path} computes in {dtype_of(site.output)}, not in its weight's dtype {w.dtype}"
    return Backed(path, m, kind)


def single_read(tensors: Sequence[torch.Tensor | None], idx: ModelIndex) -> str | None:
    for t in tensors:
        if t is None:
            continue
        n = idx.read_count(t)
        if n is not None and n > 1:
            return (f"{idx.name(t)} is read {n} times in one forward (tied weights or a module used more than "
                    f"once): an edit would change every use")
    return None


def owned_once(tensors: Sequence[torch.Tensor | None], idx: ModelIndex, names: Sequence[str]) -> str | None:
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


def site_name(paths: Sequence[str]) -> str:
    c = common_module_path(paths)
    if c and all(len(p.split(".")) - len(c.split(".")) <= 1 for p in paths):
        return c
    return " -> ".join(dict.fromkeys(paths))


def as_stored(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` (exact: float64 values or int64 indices) as ``like`` holds it."""
    return finalize_tensor(t, like.dtype if t.is_floating_point() else None, like.device)


def inverse_weight_view(site: LinearSite, param: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
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


def edits_for(decisions: Sequence[Decision], args: Sequence[Any], idx: ModelIndex,
              graph: int) -> tuple[list[Edit], list[NotPreparable]]:
    """The edits of one graph instance's decisions (each rule's ``module_edits`` of its
    own), and the decisions that have none."""
    edits: list[Edit] = []
    bad: list[NotPreparable] = []
    for r in rules.all_rules():
        mine = [d for d in decisions if d.rule == r.name]
        if mine:
            e, b = r.module_edits(mine, args, idx, graph)
            edits += e
            bad += b
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
