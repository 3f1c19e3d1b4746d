"""What the rewrites decided for one graph, kept in a form both appliers can read: the
graph rewrite of the backend (which made them) and the module editing of ``prepare``.

Each decision names its weights by the model's parameter names (through the linear sites'
``ParamInfo``) and carries the exact factors computed from the example weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..graph.linears import LinearSite
from ..report import RewriteRecord


@dataclass
class PifaDecision:
    """A low-rank chain rewritten by PIFA."""
    chain: Any                      # pifa_plan.Chain
    producer: Any | None            # the chain whose column order this one's input arrives in
    restore_order: bool             # False: the output stays in [pivots, rest] order
    factors: Any                    # identities.PifaFactors (float64) at the example weights
    record: RewriteRecord
    error_budget: float

    @property
    def weights(self) -> list[str]:
        return [p.name for s in (self.chain.first, self.chain.second) for p in (s.weight, s.bias) if p is not None]


@dataclass
class BdDecision:
    """A connected set of projections rewritten by BD: sources (K/V projections, one
    ``bd_linear`` each, in a chosen form) and partners (Q columns, O rows folded)."""
    component: Any                  # bd_plan.Component (heads in ascending channel order)
    sites: Sequence[LinearSite]     # the linear sites the component's indices refer to
    sources: dict                   # linear index -> bd_sources.Source (with its form)
    factors: dict                   # linear index -> [bd_factors.SetFactors] at the example weights
    records: list[RewriteRecord] = field(default_factory=list)
    error_budget: float = 100.0

    @property
    def weights(self) -> list[str]:
        return [p.name for i in self.component.linears for p in (self.sites[i].weight, self.sites[i].bias)
                if p is not None]
