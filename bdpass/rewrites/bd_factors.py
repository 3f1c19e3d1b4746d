"""BD factors of a source's head sets in a form (:mod:`bdpass.rewrites.bd_sources`), and
every derived tensor of a component computed from them.

:func:`form_factors` factorizes the heads of each head set on the rows of their pivot
tables (per head: QR with column pivoting; grouped or shared: one row set per table);
:func:`_synthetic` gives factors of the same shapes with random values, for timing.
:class:`_ComponentMath` computes all derived inputs of a rewritten component (the
sources' ``bd_linear`` tensors, the partners' folded weights) from current weights; the
backend recomputes them together whenever any of the component's weights changes (see
``bdpass.runtime``), and :mod:`bdpass.prepare` stores them.
"""
from __future__ import annotations

import types
from typing import Sequence

import torch

from ..graph.linears import LinearSite
from ..identities import FactorizationError, bd_factors_with_rows, pivot_columns
from .bd_blocks import source_tensors
from .bd_plan import Component, Group
from .bd_sources import SetFactors, Source


# ---------------------------------------------------------------------------- factors
def _stack(site: LinearSite, args, heads: list[Group]):
    W = site.weight_matrix(args).detach().to("cpu", torch.float64)
    b = site.bias_vector(args)
    b = None if b is None else b.detach().to("cpu", torch.float64)
    Wh = torch.stack([W[:, list(h.cols)] for h in heads])
    bh = None if b is None else torch.stack([b[list(h.cols)] for h in heads])
    return Wh, bh


def _table_rows(Wh: torch.Tensor, form: str, table: list[int]) -> torch.Tensor:
    """Rows (T, g) of each pivot table of a form."""
    if form == "per_head":
        return torch.stack([pivot_columns(Wh[h].T, Wh.shape[2]) for h in range(Wh.shape[0])])
    T = max(table) + 1
    return torch.stack([_shared_rows(Wh[[h for h in range(Wh.shape[0]) if table[h] == t]]) for t in range(T)])


def _shared_rows(Wh: torch.Tensor) -> torch.Tensor:
    """One row set for all heads of ``Wh`` (H, d_in, g)."""
    from .. import identities

    fn = getattr(identities, "shared_rows", None)
    if fn is not None:
        return fn(Wh)[0]
    # QR with column pivoting of the stacked heads, each normalised to unit Frobenius norm
    H, d_in, g = Wh.shape
    norm = Wh / Wh.flatten(1).norm(dim=1).clamp_min(1e-300)[:, None, None]
    return pivot_columns(norm.permute(0, 2, 1).reshape(H * g, d_in), g)


def form_factors(site: LinearSite, src: Source, form: str, args, budget: float) -> list[SetFactors]:
    """BD factors of every head set of a source in one form (raises FactorizationError)."""
    out = []
    for st in src.sets:
        Wh, bh = _stack(site, args, st.heads)
        table = st.head_table(form)
        rows = _table_rows(Wh, form, table)
        f = bd_factors_with_rows(Wh, rows[table], bh, dtype=torch.float64, error_budget=budget)
        out.append(SetFactors(f, rows, table))
    return out


class _ComponentMath:
    """All derived tensors of one component, computed from the graph's arguments."""

    def __init__(self, comp: Component, sites: Sequence[LinearSite], sources: dict[int, Source],
                 error_budget: float):
        self.comp = comp
        self.sites = sites
        self.sources = sources
        self.budget = error_budget

    def factors(self, args) -> dict[int, list[SetFactors]]:
        """{source linear: factors of its head sets} from current weights."""
        return {s: form_factors(self.sites[s], src, src.form, args, self.budget)
                for s, src in self.sources.items()}

    def tensors(self, args, fac=None) -> list[torch.Tensor | None]:
        """The derived inputs of the rewritten graph, exact (float64 values, int64 indices):
        per linear, a source's :func:`source_tensors`, a partner's folded ``[w, b]``."""
        fac = fac if fac is not None else self.factors(args)
        basis = {}
        for s, sets in fac.items():
            for st, sf in zip(self.sources[s].sets, sets):
                for h, g in enumerate(st.heads):
                    basis[g.gid] = sf.f.basis64[h]
        out: list[torch.Tensor | None] = []
        for lin in self.comp.linears:
            site = self.sites[lin]
            W = site.weight_matrix(args).detach().to("cpu", torch.float64).clone()
            b = site.bias_vector(args)
            b = None if b is None else b.detach().to("cpu", torch.float64).clone()
            if not bool(torch.isfinite(W).all()) or (b is not None and not bool(torch.isfinite(b).all())):
                # a NaN folded with B would spread over the whole head
                raise FactorizationError(f"non-finite weights in {site.weight.name}")
            W0, b0 = W.clone(), (None if b is None else b.clone())
            for g in self.comp.groups:
                B = basis[g.gid]
                for (qs, qcols) in g.q_partners:
                    if qs == lin:
                        W[:, list(qcols)] = W0[:, list(qcols)] @ B.T
                        if b is not None:
                            b[list(qcols)] = b0[list(qcols)] @ B.T
                for (os_, rows) in g.o_partners:
                    if os_ == lin:
                        W[list(rows), :] = B @ W0[list(rows), :]
            src = self.sources.get(lin)
            out += [W.t(), b] if src is None else source_tensors(site, src, fac[lin], W, b)
        return out


def _synthetic(site: LinearSite, src: Source, form: str) -> list[SetFactors]:
    """Factors with the shapes and table structure of a form but random values: what timing
    needs (a form's speed does not depend on which rows it pivots on, only on how many
    tables and blocks it has), without the cost of factorizing."""
    g = torch.Generator().manual_seed(0)
    out = []
    for st in src.sets:
        table = st.head_table(form)
        T, H, K = max(table) + 1, len(st.heads), site.d_in - st.g
        rows = torch.stack([torch.randperm(site.d_in, generator=g)[:st.g].sort().values for _ in range(T)])
        f = types.SimpleNamespace(w_rest=torch.randn(H, K, st.g, generator=g, dtype=torch.float64),
                                  bias=None if site.bias is None else torch.randn(H, st.g, generator=g,
                                                                                  dtype=torch.float64))
        out.append(SetFactors(f, rows, table))
    return out
