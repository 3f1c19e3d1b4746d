"""Rewrite rules: one interface, one registry.

A rule owns one exact identity, from finding its sites in a graph to editing a model's
modules and sharding what it made. Everything that applies rewrites loops over
:func:`enabled` / :data:`REGISTRY` and calls the rule; nothing else names a rule:

* the backend (:func:`bdpass.backend.plan_and_rewrite`): ``plan`` then ``rewrite``;
* ``explain`` and the diff tool: the backend's records, with ``kind`` from :func:`kinds`;
* ``prepare`` (:mod:`bdpass.prepare.apply`): ``module_edits`` of the decisions;
* checkpoints and ``shard``: the prepared module classes of ``modules`` and ``shard_module``.

The interface (:class:`Rule`):

* ``plan(ctx)``: find the rule's sites in one graph (``ctx``, :class:`PlanContext`) and
  decide each at the example weights (saving, cost, factorization, error bound): applied,
  as a :class:`Decision` carrying its records, its exact derived tensors and its statics;
  or skipped, as a :class:`~bdpass.report.SkipRecord` in ``ctx.report``. Sites used by an
  earlier rule are in ``ctx.claimed``; a rule claims the linear sites it decided.
* ``rewrite(editor, decision, index)``: write one decision into the graph copy.
* ``refit(decision, args)``: the same decision at other weights of the same graph (another
  layer of a stack, which Dynamo runs through one graph): its factors computed from
  ``args``, the structure and the forms kept. Raises
  :class:`~bdpass.identities.FactorizationError` where the identity does not hold within
  the decision's error budget at those weights.
* ``module_edits(decisions, args, idx, graph)``: the module-level form of one graph's
  decisions of this rule (:class:`bdpass.prepare.edits.Edit`), and the decisions that have
  none (:class:`bdpass.prepare.edits.NotPreparable`).
* ``shard_module(path, spec, how, get, rank, world, split_of)``: one rank's share of a
  prepared module this rule created.

A new identity is one module defining a :class:`Rule` subclass (and its prepared module
classes, subclasses of :class:`bdpass.prepare.modules.PreparedModule`), plus one line in
:data:`_RULE_MODULES`. Rules run in registry order: PIFA first (its chains' linears are
then not BD sources), then BD.
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from .report import GraphReport, RewriteRecord

__all__ = ["Rule", "Decision", "PlanContext", "REGISTRY", "enabled", "kinds", "rule", "rule_for_module"]


@dataclass
class Decision:
    """One applied rewrite as its rule decided it: a plain object that carries everything
    the graph rewrite, the module edit and the runtime need.

    ``tensors``: the exact (float64 / int64) derived tensors at the example weights, in the
    order the rewrite reads them; ``recompute(args)`` gives them again from a graph's
    arguments (weights changed in place); ``derived_from``: the graph inputs they derive
    from.
    ``nodes``: the linear nodes the decision rewrites together (validation refuses them
    together). Subclasses add the rule's statics (sites, forms, tables)."""
    rule: ClassVar[str] = ""
    tensor_fields: ClassVar[tuple[str, ...]] = ()    # the subclass's fields that hold tensors
    records: list[RewriteRecord]
    nodes: frozenset[str]
    tensors: list[torch.Tensor | None]
    recompute: Callable[[Sequence[Any]], list]
    derived_from: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    error_budget: float

    @property
    def weights(self) -> list[str]:
        """Parameter names of the weights the decision rewrites."""
        return [w for r in self.records for w in r.details.get("weights", [])]

    def without_tensors(self) -> "Decision":
        """The decision's structure only (what ``Rule.refit`` needs), its tensors dropped."""
        return dataclasses.replace(self, tensors=[], **{f: None for f in self.tensor_fields})


@dataclass
class PlanContext:
    """What a rule's ``plan`` sees of one graph."""
    gm: torch.fx.GraphModule
    example_inputs: Sequence[Any]
    opts: Any                                   # BDOptions
    report: GraphReport                         # skip records go to report.skipped
    linears: list                               # every LinearSite of the graph
    exclude: dict[str, str] = field(default_factory=dict)    # linear node name -> why it must not be rewritten
    claimed: set = field(default_factory=set)                # core nodes of sites an earlier rule decided
    _readers: dict[int, set] | None = None

    def free_linears(self) -> list:
        """The linear sites no earlier rule decided."""
        return [s for s in self.linears if s.core not in self.claimed]

    def refusal(self, sites: Sequence[Any]) -> str | None:
        """Why the sites must not be rewritten together: a node excluded by validation, or
        a weight also read by a linear outside them (a shared basis, tied layers: a rewrite
        would keep it and add a derived copy). None when they may be."""
        for n in sorted(s.core.name for s in sites):
            if n in self.exclude:
                return self.exclude[n]
        if self._readers is None:
            self._readers = {}
            for s in self.linears:
                for p in (s.weight, s.bias):
                    if p is not None:
                        self._readers.setdefault(p.index, set()).add(s.core)
        cores = {s.core for s in sites}
        for s in sites:
            for p in (s.weight, s.bias):
                if p is not None and self._readers[p.index] - cores:
                    return (f"{p.name} is also read by another linear (a shared basis or tied layers): "
                            f"rewriting would keep it and add a derived copy")
        return None


class Rule(abc.ABC):
    """The interface every rewrite rule implements (see the module docstring)."""
    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()        # the kinds of its RewriteRecords / SkipRecords
    modules: ClassVar[tuple[type, ...]] = ()     # the prepared module classes it creates

    def enabled(self, opts: Any) -> bool:
        """Whether ``opts`` turns any of the rule's kinds on (one option per kind)."""
        return any(getattr(opts, k, False) for k in self.kinds)

    @abc.abstractmethod
    def plan(self, ctx: PlanContext) -> list[Decision]:
        """Find and decide the rule's sites in ``ctx``'s graph; skips go to ``ctx.report``."""

    @abc.abstractmethod
    def rewrite(self, editor: Any, decision: Decision, index: int) -> None:
        """Write ``decision`` into the editor's graph copy as rewrite number ``index``."""

    @abc.abstractmethod
    def refit(self, decision: Decision, args: Sequence[Any]) -> Decision:
        """``decision`` at the weights in ``args`` (another instance of its graph); raises
        ``FactorizationError`` where the identity does not hold within its budget there."""

    @abc.abstractmethod
    def module_edits(self, decisions: Sequence[Decision], args: Sequence[Any], idx: Any,
                     graph: int) -> tuple[list, list]:
        """(edits, not preparable) of one graph instance's decisions of this rule."""

    @abc.abstractmethod
    def shard_module(self, path: str, spec: dict, how: str, get: Callable[[str], Any], rank: int, world: int,
                     split_of: Callable[[str], str | None]) -> tuple[dict, dict]:
        """(local spec, local tensors) of rank ``rank``'s share of a prepared module at
        ``path`` split ``how``; ``split_of(path)`` gives another module's split."""


# the modules that define the rules, in the order they plan
_RULE_MODULES = ("bdpass.rewrites.pifa", "bdpass.rewrites.bd_attention")
REGISTRY: list[Rule] = []


def _load() -> list[Rule]:
    if not REGISTRY:
        found = []
        for name in _RULE_MODULES:
            mod = importlib.import_module(name)
            found += [obj() for obj in vars(mod).values()
                      if isinstance(obj, type) and issubclass(obj, Rule) and not inspect.isabstract(obj)
                      and obj.__module__ == name]
        REGISTRY.extend(found)
    return REGISTRY


def all_rules() -> list[Rule]:
    """Every registered rule, in planning order."""
    return list(_load())


def enabled(opts: Any) -> list[Rule]:
    """The rules ``opts`` turns on, in planning order."""
    return [r for r in _load() if r.enabled(opts)]


def kinds() -> tuple[str, ...]:
    """Every record kind of every rule."""
    return tuple(k for r in _load() for k in r.kinds)


def rule(name: str) -> Rule:
    for r in _load():
        if r.name == name:
            return r
    raise KeyError(f"bdpass: no rule named {name!r} (known: {', '.join(r.name for r in _load())})")


def rule_for_module(type_name: str) -> Rule:
    """The rule that creates prepared modules of class ``type_name``."""
    for r in _load():
        if any(m.__name__ == type_name for m in r.modules):
            return r
    raise ValueError(f"bdpass: unknown prepared module type {type_name!r} in a plan")
