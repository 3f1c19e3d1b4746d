"""BD on attention head pairs: forms, factors, decision and rewrite of the components
planned by :mod:`bdpass.rewrites.bd_plan`.

A *source* is a projection that owns BD heads (K or V channels). Each source is rewritten
as one ``bdpass::bd_linear`` call (see :mod:`inductor_lowerings.bd_linear`): per head,
``x[..., S_t] + x[..., R_t] @ W'_h`` written straight into the head's output columns, and
the projection's other columns (e.g. the queries of a fused QKV projection, with their
folded weights) as dense blocks in place; everything downstream of the projection is
untouched. Partner projections (queries, output projections) only get folded weights.

**Forms.** Which rows ``S_t`` a head uses is the *form* of a source:

* ``per_head``: each head its own rows, from QR with column pivoting (the most accurate:
  condition numbers in the tens on random weights);
* ``groups``: two groups of adjacent heads, each sharing one row set;
* ``shared``: one row set for every head of the projection, so that the rest rows are
  gathered once and adjacent heads are one GEMM (the form that pays on CPUs; it costs
  accuracy: see :func:`bdpass.identities.shared_rows`).

A form whose error bound (the largest condition number of its blocks) exceeds the budget is
not a candidate. With ``cost_model`` on, the remaining candidates and the original
projection are timed on the machine at the graph's token count (:mod:`bdpass.timing`) and
the fastest candidate is taken if it beats the original; without timing (fake tensors), a
roofline estimate decides (:mod:`bdpass.cost`). With ``cost_model`` off, the most accurate
candidate is taken.

Everything derived for one connected set of projections is recomputed together from their
current weights when any of them changes (see ``bdpass.runtime``).
"""
from __future__ import annotations

import dataclasses
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import cost, timing
from ..graph.linears import LinearSite
from ..graph.ops import dtype_of
from ..identities import FactorizationError, bd_factors_with_rows, pivot_columns
from ..report import RewriteRecord, SkipRecord
from ..runtime import finalize_tensor
from .bd_plan import Component, Group
from .decisions import BdDecision

from .editor import GraphEditor

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


@dataclass
class SetFactors:
    f: object                 # BdFactors of the set's heads
    rows: torch.Tensor        # (T, g) rows of each table
    table: list[int]          # table (local) of each head


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


def _rest(rows: torch.Tensor, d_in: int) -> torch.Tensor:
    keep = torch.ones(d_in, dtype=torch.bool)
    keep[rows] = False
    return torch.nonzero(keep).flatten()


@dataclass
class BlockLayout:
    """How a source's output is laid out as ``bd_linear`` blocks: ``tables`` lists each
    pivot table as (set index, local table) or None for the dense table; ``blocks`` each
    (table, first column, width, [(set, head) ...] or None for a dense block)."""
    tables: list
    blocks: list


def source_layout(d_out: int, src: Source) -> BlockLayout:
    tables: list = []
    index: dict = {}
    cols = []                               # (col, table, set, head)
    owned = torch.zeros(d_out, dtype=torch.bool)
    for si, st in enumerate(src.sets):
        for h, (grp, t) in enumerate(zip(st.heads, st.head_table(src.form))):
            key = (si, t)
            if key not in index:
                index[key] = len(tables)
                tables.append(key)
            cols.append((grp.cols[0], index[key], si, h, st.g))
            owned[grp.cols[0]:grp.cols[0] + st.g] = True
    dense_t = None
    c = 0
    while c < d_out:                       # dense runs
        if owned[c]:
            c += 1
            continue
        e = c
        while e < d_out and not owned[e]:
            e += 1
        if dense_t is None:
            dense_t = len(tables)
            tables.append(None)
        cols.append((c, dense_t, None, None, e - c))
        c = e
    cols.sort()
    blocks = []
    for col, t, si, h, width in cols:
        last = blocks[-1] if blocks else None
        if (si is not None and last is not None and last[0] == t and last[3] is not None
                and last[1] + last[2] == col):
            last[2] += width
            last[3].append((si, h))
        else:
            blocks.append([t, col, width, None if si is None else [(si, h)]])
    return BlockLayout(tables, [tuple(b) for b in blocks])


def source_tensors(site: LinearSite, src: Source, fac: list[SetFactors], W: torch.Tensor,
                   b: torch.Tensor | None) -> list:
    """A source's derived inputs (exact): every table's sel, every table's rest, then each
    block's weight (K, n) and bias. ``W`` (d_in, d_out) and ``b``: the projection's weights
    with any partner folds applied (they serve the dense blocks)."""
    lay = source_layout(site.d_out, src)
    sel, rest = [], []
    for key in lay.tables:
        if key is None:
            sel.append(torch.zeros(0, dtype=torch.int64))
            rest.append(torch.arange(site.d_in))
        else:
            rows = fac[key[0]].rows[key[1]]
            sel.append(rows)
            rest.append(_rest(rows, site.d_in))
    blocks = []
    for t, c, n, members in lay.blocks:
        if members is None:
            blocks += [W[:, c:c + n], None if b is None else b[c:c + n]]
        else:
            blocks.append(torch.cat([fac[si].f.w_rest[h] for si, h in members], dim=1))
            has_b = fac[members[0][0]].f.bias is not None
            blocks.append(torch.cat([fac[si].f.bias[h] for si, h in members]) if has_b else None)
    return sel + rest + blocks


def op_statics(site: LinearSite, src: Source) -> tuple[int, list[int], list[int]]:
    """(number of tables, block_table, block_col) of a source's ``bd_linear`` call."""
    lay = source_layout(site.d_out, src)
    return len(lay.tables), [blk[0] for blk in lay.blocks], [blk[1] for blk in lay.blocks]


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


# ---------------------------------------------------------------------------- decision
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


def _time_source(site: LinearSite, src: Source, forms: Sequence[str]) -> dict[str, float]:
    """Seconds of the original projection and of each form, on random inputs and weights of
    the site's shapes, with the verdicts of :func:`bdpass.timing.measure`."""
    import inductor_lowerings  # noqa: F401  (registers the ops)

    dev, dt = site.weight.tensor.device, site.weight.tensor.dtype
    M = max(site.tokens, 1)
    x = torch.randn(M, site.d_in, device=dev, dtype=dt)
    W = torch.randn(site.d_out, site.d_in, device=dev, dtype=dt)
    b = None if site.bias is None else torch.randn(site.d_out, device=dev, dtype=dt)
    fns = {"original": lambda: torch.nn.functional.linear(x, W, b)}
    shapes = {}
    form0 = src.form
    for form in forms:
        src.form = form
        T, block_table, block_col = op_statics(site, src)
        t = [None if v is None else finalize_tensor(v, dt, dev)
             for v in source_tensors(site, src, _synthetic(site, src, form), W.t().double(),
                                     None if b is None else b.double())]
        args = (t[:T], t[T:2 * T], t[2 * T::2], t[2 * T + 1::2], block_table, block_col, site.d_out)
        fns[form] = (lambda a=args: torch.ops.bdpass.bd_linear(x, *a))
        shapes[form] = [[int(args[0][tb].numel()), int(args[2][i].shape[1])] for i, tb in enumerate(block_table)]
    src.form = form0
    problem = {"op": "bd_linear", "M": M, "d_in": site.d_in, "d_out": site.d_out, "dtype": str(dt),
               "bias": site.bias is not None, "blocks": shapes}
    return timing.measure(dev, problem, fns)


def _estimate_source(site: LinearSite, src: Source, forms: Sequence[str]) -> dict[str, float]:
    """Roofline seconds of the original projection and of each form (no real tensors)."""
    dtype = dtype_of(site.output) or site.weight.tensor.dtype
    out = {}
    form0 = src.form
    for form in forms:
        src.form = form
        est = cost.bd_linear(site.tokens, site.d_in, site.d_out, len(src.heads), max(st.g for st in src.sets),
                             op_statics(site, src)[0], dtype, site.weight.tensor.device)
        out["original"], out[form] = est.original, est.rewritten
    src.form = form0
    return out


def decide(comp: Component, sites: Sequence[LinearSite], sources: dict[int, Source], args,
           error_budget: float, cost_model: bool):
    """Choose each source's form. Returns (factors per source, details per source, None) or
    (None, None, the reason not to rewrite).

    With the cost model, each source's forms are timed first (they do not need factors for
    that) and factorized fastest first: the first that is faster than the original and
    within the error budget is taken. Without it, per-head pivots (the most accurate)."""
    chosen, details = {}, {}
    total_orig = total_new = 0.0
    how = None
    for s, src in sources.items():
        site = sites[s]
        forms = src.forms()
        if not cost_model:
            secs, order = None, ["per_head"]
        else:
            if timing.can_time(site.weight.tensor):
                secs, how = _time_source(site, src, forms), f"measured on {timing.machine(site.weight.tensor.device)}"
            else:
                secs, how = _estimate_source(site, src, forms), (f"estimated on {site.weight.tensor.device.type} "
                                                                   f"(roofline; no real tensors to time)")
            order = sorted(forms, key=lambda k: secs[k])
        refused, form = {}, None
        for cand in order:
            if secs is not None and not timing.pays(secs, cand):
                continue                   # slower, or not surely faster (see bdpass.timing)
            try:
                chosen[s] = form_factors(site, src, cand, args, error_budget)
            except FactorizationError as e:
                refused[cand] = str(e)
                continue
            form = cand
            break
        if form is None:
            parts = [f"{k}: {v}" for k, v in refused.items()]
            slow = [k for k in order if k not in refused]
            if secs is not None and slow:
                parts.append(f"cost model: {how}, " + ", ".join(
                    f"{k} {timing.describe(secs, k)}" for k in slow) +
                    f" of the original at {site.tokens} tokens (needs >= {1 / (1 - cost.MARGIN):.2f}x)")
            return None, None, "; ".join(parts)
        src.form = form
        details[s] = {"form": form}
        if secs is not None:
            total_orig += secs["original"]
            total_new += secs[form]
            details[s]["ms" if how.startswith("measured") else "estimated_ms"] = \
                {k: round(v * 1e3, 4) for k, v in secs.items()}
    if cost_model and total_new > (1.0 - cost.MARGIN) * total_orig:
        site = sites[next(iter(sources))]
        return None, None, (f"cost model: the BD projections {how} at {total_orig / total_new:.2f}x of the "
                            f"original at {site.tokens} tokens (needs >= {1 / (1 - cost.MARGIN):.2f}x)")
    return chosen, details, None


# ---------------------------------------------------------------------------- rewrite
def apply_component(editor: GraphEditor, comp: Component, sites: Sequence[LinearSite],
                    first_index: int, error_budget: float,
                    cost_model: bool = True) -> tuple[list[RewriteRecord], list[SkipRecord]]:
    import inductor_lowerings  # noqa: F401  (registers the ops)

    norm, why = _normalized(comp)
    if norm is None:
        return [], skips_for(comp.groups, why)
    comp = norm
    sources = _sources(comp)
    skips: list[SkipRecord] = []
    dtypes = {sites[lin].weight.tensor.dtype for lin in comp.linears}
    devices = {sites[lin].weight.tensor.device for lin in comp.linears}
    if len(dtypes) != 1 or len(devices) != 1:
        why = "the component's weights differ in dtype or device"
        return [], skips + skips_for(comp.groups, why)
    fac, details, why = decide(comp, sites, sources, editor.example_inputs, error_budget, cost_model)
    if fac is None:
        return [], skips + skips_for(comp.groups, why)
    math_ = _ComponentMath(comp, sites, sources, error_budget)
    try:
        initial = math_.tensors(editor.example_inputs, fac)
    except FactorizationError as e:
        return [], skips + skips_for(comp.groups, str(e))
    src_of = sorted({i for lin in comp.linears for i in
                     ([sites[lin].weight.index] + ([sites[lin].bias.index] if sites[lin].bias else []))})
    editor.current_rewrite = first_index
    nodes = editor.add_derived(f"bd{first_index}", src_of, lambda a: math_.tensors(a), initial,
                               dtype=dtypes.pop(), device=devices.pop())
    it = iter(nodes)
    linear = torch._C._nn.linear
    for lin in comp.linears:
        site = sites[lin]
        src = sources.get(lin)
        target = editor.new(site.output)
        x = editor.new(site.input)
        with editor.graph.inserting_before(target):
            for name, a in site.prologue:         # e.g. an einsum over several dims
                x = editor.call(name, (x, *a), method=True, origin=site.output)
            if src is None:
                w, b = next(it), next(it)
                y = editor.call(linear, (x, w, b), origin=site.output)
            else:
                T, block_table, block_col = op_statics(site, src)
                sel = [next(it) for _ in range(T)]
                rest = [next(it) for _ in range(T)]
                weight, bias = [], []
                for _ in block_table:
                    weight.append(next(it))
                    bias.append(next(it))
                y = editor.call(torch.ops.bdpass.bd_linear.default,
                                (x, sel, rest, weight, bias, block_table, block_col, site.d_out),
                                origin=site.output)
            if dtype_of(site.output) is not None and dtype_of(site.output) != site.weight.tensor.dtype:
                y = editor.call("to", (y, dtype_of(site.output)), method=True, origin=site.output)
            for name, a in site.epilogue:
                y = editor.call(name, (y, *a), method=True, origin=site.output)
        editor.replace(site.output, y)
        editor.discard([site.output, site.core], first_index)
    editor.current_rewrite = None
    records = _records(comp, sites, sources, fac, details)
    editor.decisions.append(BdDecision(comp, sites, sources, fac, records, error_budget))
    return records, skips


def skips_for(groups: list[Group], why: str) -> list[SkipRecord]:
    """One skip per (kind, site) of these groups, naming their contraction nodes."""
    nodes: dict[tuple, set] = defaultdict(set)
    for g in groups:
        nodes[(g.kind, g.site)] |= set(getattr(g, "nodes", ()) or ())
    return [SkipRecord(g.kind, g.site, why, nodes=sorted(nodes[(g.kind, g.site)])) for g in _one_per_site(groups)]


def _one_per_site(groups: list[Group]) -> list[Group]:
    seen, out = set(), []
    for g in groups:
        if (g.kind, g.site) not in seen:
            seen.add((g.kind, g.site))
            out.append(g)
    return out


def _records(comp: Component, sites: Sequence[LinearSite], sources: dict[int, Source], fac,
             details: dict[int, dict]) -> list[RewriteRecord]:
    cond_of: dict[int, float] = {}
    growth_of: dict[int, float] = {}
    for s, sets in fac.items():
        for st, sf in zip(sources[s].sets, sets):
            for h, g in enumerate(st.heads):
                cond_of[g.gid] = float(sf.f.conds[h])
                growth_of[g.gid] = float(sf.f.expected[h])
    by_key: dict[tuple, list[Group]] = defaultdict(list)
    for g in comp.groups:
        by_key[(g.kind, g.site, g.source)].append(g)
    recs = []
    for (kind, site, src), gs in by_key.items():
        d_in = sites[src].d_in
        d_h = sorted({len(g.cols) for g in gs})
        before = sum(d_in * len(g.cols) for g in gs)
        after = sum((d_in - len(g.cols)) * len(g.cols) for g in gs)
        cond = max(cond_of[g.gid] for g in gs)
        growth = max(growth_of[g.gid] for g in gs)
        partners = sorted({sites[i].weight.name for g in gs for i, _ in (g.q_partners | g.o_partners)})
        d = details.get(src, {})
        recs.append(RewriteRecord(
            kind=kind, site=site, params_before=before, params_after=after,
            flops_saved=2 * sum(len(g.cols) ** 2 for g in gs), cond=cond, error_bound=cond,
            expected_growth=growth,
            details={"heads": len(gs), "d_in": d_in, "d_h": d_h[0] if len(d_h) == 1 else d_h,
                     "projection": sites[src].weight.name, "folded_into": partners,
                     "form": d.get("form", sources[src].form), "shared_basis": d.get("form") == "shared",
                     "nodes": sorted({n for g in gs for n in (getattr(g, "nodes", ()) or ())}),
                     **{k: v for k, v in d.items() if k in ("ms", "estimated_ms")}}))
    return recs

