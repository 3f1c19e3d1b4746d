"""The sources of a BD component and their forms.

A *source* is a projection that owns BD heads (K or V channels); its heads are grouped in
head sets, one per head size, in output-column order. Which rows ``S_t`` a head uses is the
*form* of a source:

* ``per_head``: each head its own rows, from QR with column pivoting (the most accurate:
  condition numbers in the tens on random weights);
* ``groups``: two groups of adjacent heads, each sharing one row set;
* ``shared``: one row set for every head of the projection, so that the rest rows are
  gathered once and adjacent heads are one GEMM (the form that pays on CPUs; it costs
  accuracy: see :func:`bdpass.identities.shared_rows`).

:meth:`HeadSet.head_table` maps each head of a set to its row set (pivot table) in a form;
:class:`SetFactors` holds a head set's factors in a form.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch

from .bd_plan import Component, Group

FORMS = ("per_head", "groups", "shared")
N_GROUPS = 2


# ---------------------------------------------------------------------------- groups
def _normalized(comp: Component) -> tuple[Component | None, str | None]:
    """The component with every head's channels in ascending order (its partners' channels
    permuted alike, which keeps each matched pair), or a reason it cannot be lowered."""
    groups = []
    for g in comp.groups:
        order = sorted(range(len(g.cols)), key=lambda j: g.cols[j])
        cols = tuple(g.cols[j] for j in order)
        if cols != tuple(range(cols[0], cols[0] + len(cols))):
            return None, "a head's channels are not one contiguous block of the projection's output"
        qp = {(i, tuple(c[j] for j in order)) for i, c in g.q_partners}
        op = {(i, None if r is None else tuple(r[j] for j in order)) for i, r in g.o_partners}
        groups.append(dataclasses.replace(g, cols=cols, q_partners=qp, o_partners=op))
    sources = {g.source for g in groups}
    for g in groups:
        if any(i in sources for i, _ in g.o_partners):
            return None, "a projection is both rewritten by BD and an output projection of it"
    return Component(list(comp.linears), groups), None


@dataclass
class HeadSet:
    """The BD heads of one size in a projection, in output-column order."""
    g: int
    heads: list[Group]

    def head_table(self, form: str) -> list[int]:
        """Table (local to the set) of each head in a form."""
        H = len(self.heads)
        if form == "per_head":
            return list(range(H))
        if form == "groups":
            return [h * N_GROUPS // H for h in range(H)]
        return [0] * H


@dataclass
class Source:
    """A projection that owns BD heads: its head sets (one per head size)."""
    lin: int
    sets: list[HeadSet]
    form: str = "per_head"

    @property
    def heads(self) -> list[Group]:
        return [h for st in self.sets for h in st.heads]

    def forms(self) -> list[str]:
        return [f for f in FORMS if f != "groups" or min(len(st.heads) for st in self.sets) >= 2 * N_GROUPS]


def _sources(comp: Component) -> dict[int, Source]:
    by_src: dict[int, dict[int, list[Group]]] = defaultdict(lambda: defaultdict(list))
    for g in comp.groups:
        by_src[g.source][len(g.cols)].append(g)
    return {s: Source(s, [HeadSet(g, sorted(hs, key=lambda h: h.cols[0])) for g, hs in sorted(sizes.items())])
            for s, sizes in by_src.items()}


@dataclass
class SetFactors:
    """The BD factors of one head set in one form."""
    f: object                 # BdFactors of the set's heads
    rows: torch.Tensor        # (T, g) rows of each table
    table: list[int]          # table (local) of each head
