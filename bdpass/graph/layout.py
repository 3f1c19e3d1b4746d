"""Forward data-flow analysis of channel layouts.

Every linear site's output columns are *tracked*. A value's layout is a small int64
array with the value's rank: size 1 on dimensions along which the channel assignment
does not vary (batch, positions: "free" dims, possibly symbolic), full size on channel
dimensions (static). Entry codes::

    >= 0   tracked: (source << 32) | column of that linear's output
    -1     untracked (not from any linear: a cache, an embedding, a constant)
    <= -2  touched: derived from tracked channels by an op that does not commute with a
           change of basis (RoPE, a norm, a nonlinearity); -2 - k indexes ``reasons``
           (and ``reason_sources``: the linears the touched channels came from)

Layouts propagate through ops that only move channels (views, ``unflatten``, permutes,
``.T``/``.mT``, ``movedim``, splits, ``unbind``, slices, ``narrow``, ``select``, indexing by
constant lists or tensors, ``index_select``, cat, expand/``broadcast_to``/repeat for GQA,
slice-assignment, ``detach``/``alias``, casts, scalar or per-row scaling). At contractions
over channels (``q @ k^T``, an einsum, ``baddbmm``, SDPA) the analysis records which
columns of which linears meet per head (:class:`QKEvent`); through ``probs @ v`` / SDPA
the value layout continues (flagged as having passed attention) until a linear consumes
it (:class:`OEvent`: which input rows of the output projection hold which value
columns). Touched channels reaching a contraction are recorded too, so that every head
gets a verdict, and every attention that :mod:`.contractions` finds without an event is
listed in ``unmatched`` with the reason. Any other use of tracked columns — a graph
output (KV cache), an unmodelled op, a concatenation along positions — is an *escape*,
recorded per column with its reason: rewriting an escaped column would change what the
graph computes.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from .._compat import example_value, is_fake as _compat_is_fake, size_hint
from ..report import KV_CACHE
from .linears import LinearSite, einsum_labels, einsum_operands
from .ops import DTENSOR_ADVICE, Collective, arg, canonical, collective, op_label, shape_of

SHIFT = 32
COLMASK = (1 << SHIFT) - 1
UNTRACKED = -1

_ROPE_MARKERS = {"cos", "sin", "polar", "view_as_complex", "view_as_real"}
_NORM_MARKERS = {"rsqrt", "mean", "var", "norm", "layer_norm", "rms_norm", "var_mean", "std"}
_CLEAN_CTORS = {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like",
                "ones_like", "full_like", "size", "dim", "numel", "stride", "data_ptr"}
_IDENTITY = {"contiguous", "clone", "to", "cast", "type_as", "detach", "alias", "float", "dropout"}


@dataclass
class Layout:
    idx: np.ndarray
    attn: bool = False          # passed through an attention-probabilities contraction

    @property
    def tracked(self) -> bool:
        return bool((self.idx >= 0).any())

    @property
    def marked(self) -> bool:
        return bool((self.idx != UNTRACKED).any())


@dataclass
class QKEvent:
    node: torch.fx.Node
    q_rows: np.ndarray       # (P, E) layout codes of q channels per (query head) pair
    k_rows: np.ndarray       # (P, E) codes of the k channels each q row meets


@dataclass
class AVEvent:
    node: torch.fx.Node
    v_rows: np.ndarray       # (Hv, D) layout codes of v channels per value head


@dataclass
class OEvent:
    site: LinearSite
    rows: np.ndarray         # (d_in,) layout code of each input row of the consuming linear


@dataclass
class Unmatched:
    """An attention contraction (found by :mod:`.contractions`) without a QK/AV event:
    why the analysis could not pair its channels."""
    kind: str                # "bd_qk" (score contraction) | "bd_vo" (value contraction)
    node: torch.fx.Node
    reason: str
    sources: frozenset       # linears whose channels reach the contraction


@dataclass
class LayoutResult:
    sources: list[LinearSite]
    qk: list[QKEvent] = field(default_factory=list)
    av: list[AVEvent] = field(default_factory=list)
    o: list[OEvent] = field(default_factory=list)
    attention: list = field(default_factory=list)          # contractions.Attention of the graph
    unmatched: list[Unmatched] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    reason_sources: list[frozenset] = field(default_factory=list)      # linears each touched code came from
    escapes: dict[int, dict[int, str]] = field(default_factory=dict)   # source -> column -> reason
    # ops with no model in this analysis that received tracked channels (name -> count): each
    # is treated as changing their values; a data-movement op here is a spelling to learn
    unmodelled: dict[str, int] = field(default_factory=dict)

    def reason_of(self, code: int) -> str:
        return self.reasons[-2 - code] if code <= -2 else ("untracked" if code == -1 else "tracked")

    def sources_of(self, codes: np.ndarray) -> set[int]:
        """Linears that the entries (tracked or touched) of a layout array come from."""
        codes = np.asarray(codes)
        out = {int(c) >> SHIFT for c in np.unique(codes[codes >= 0])}
        for c in np.unique(codes[codes <= -2]):
            out |= set(self.reason_sources[-2 - int(c)])
        return out

    def escape_reason(self, src: int, cols: Sequence[int]) -> str | None:
        esc = self.escapes.get(src)
        if not esc:
            return None
        for c in cols:
            r = esc.get(int(c))
            if r is not None:
                return r
        return None


def decode(code: int) -> tuple[int, int]:
    return int(code) >> SHIFT, int(code) & COLMASK


def _hints(shape) -> list[int | None]:
    return [size_hint(s) for s in shape]


def _name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    return getattr(t, "__name__", str(t))


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule, linears: Sequence[LinearSite], example_inputs=None):
        self.gm = gm
        self.inputs = list(example_inputs) if example_inputs is not None else None
        self.placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.sites = list(linears)
        self.res = LayoutResult(sources=self.sites)
        self.L: dict[torch.fx.Node, Any] = {}          # node -> Layout | list[Layout|None] | None
        self.core_of = {s.core: i for i, s in enumerate(self.sites)}
        self.out_of = {s.output: i for i, s in enumerate(self.sites) if s.bias_node is not None}
        self._reason_ids: dict[str, int] = {}
        self.view_base: dict[torch.fx.Node, tuple[torch.fx.Node, Any]] = {}  # view node -> (base, index)
        self.opaque_reasons: dict[torch.fx.Node, str] = {}
        from .contractions import find_attention

        self.res.attention = find_attention(gm)
        self.score_nodes = {a.score for a in self.res.attention}

    # ------------------------------------------------------------------ helpers
    def reason_code(self, text: str, sources: frozenset = frozenset()) -> int:
        key = (text, frozenset(sources))
        k = self._reason_ids.get(key)
        if k is None:
            k = len(self.res.reasons)
            self.res.reasons.append(text)
            self.res.reason_sources.append(frozenset(sources))
            self._reason_ids[key] = k
        return -2 - k

    def touched(self, arr: np.ndarray, reason: str) -> np.ndarray:
        """``arr`` with each tracked entry replaced by the touched code of ``reason`` for its
        source linear."""
        out = np.array(arr, dtype=np.int64, copy=True)
        tracked = out >= 0
        if tracked.any():
            src = out >> SHIFT
            for s in np.unique(src[tracked]):
                out[tracked & (src == s)] = self.reason_code(reason, frozenset({int(s)}))
        return out

    def escape(self, lay: Any, reason: str) -> None:
        for l in (lay if isinstance(lay, list) else [lay]):
            if not isinstance(l, Layout):
                continue
            for code in np.unique(l.idx[l.idx >= 0]):
                src, col = decode(code)
                self.res.escapes.setdefault(src, {}).setdefault(col, reason)

    def touch(self, lay: Layout, reason: str, shape=None) -> Layout:
        """Tracked entries become touched (and their columns escape)."""
        self.escape(lay, reason)
        idx = self.touched(lay.idx, reason)
        if shape is not None:
            idx = _broadcast_to_rank(idx, len(shape))
        return Layout(idx)

    def src_layout(self, node: torch.fx.Node) -> Layout | None:
        """Layout of a movement op's input; records a clean output when there is none."""
        l = self.lay(node.args[0]) if node.args else None
        if l is None:
            self.L[node] = None
        return l

    def lay(self, x: Any) -> Layout | None:
        if isinstance(x, torch.fx.Node):
            v = self.L.get(x)
            return v if isinstance(v, Layout) else None
        return None

    def fresh(self, site_index: int, node: torch.fx.Node) -> Layout | None:
        shp = shape_of(node)
        if shp is None:
            return None
        site = self.sites[site_index]
        d = site.d_out
        idx = (np.int64(site_index) << SHIFT) + np.arange(d, dtype=np.int64)
        extra = sum(len(a[1]) - 1 for name, a in site.epilogue if name == "unflatten")
        base = idx.reshape((1,) * (len(shp) - 1 - extra) + (d,))
        return Layout(_np_ops(base, site.epilogue))

    def why_touch(self, node: torch.fx.Node) -> str:
        """A readable reason for an op that changes tracked channels: RoPE if the other
        operands come from cos/sin/polar, a norm if they come from a reduction."""
        own = _name(node)
        names = {own}
        frontier = [a for a in node.all_input_nodes if not (self.lay(a) is not None and self.lay(a).tracked)]
        seen = set(frontier)
        for _ in range(6):
            nxt = []
            for n in frontier:
                if n.op in ("call_function", "call_method"):
                    names.add(_name(n))
                for a in n.all_input_nodes:
                    if a not in seen:
                        seen.add(a)
                        nxt.append(a)
            frontier = nxt
        if names & _ROPE_MARKERS:
            return "RoPE (position-dependent rotation) on these channels"
        if names & _NORM_MARKERS:
            return "normalization of these channels (e.g. q_norm/k_norm) between projection and contraction"
        return f"'{own}' applied between projection and contraction"

    # ------------------------------------------------------------------ driver
    def run(self) -> LayoutResult:
        for node in self.gm.graph.nodes:
            try:
                self.visit(node)
            except _Unsupported as e:
                self.opaque(node, str(e))
        self.account_for_attention()
        return self.res

    def account_for_attention(self) -> None:
        """Every attention of the graph gets its QK and AV events, or an Unmatched entry
        that says why its channels could not be paired."""
        have_qk = {ev.node for ev in self.res.qk}
        have_av = {ev.node for ev in self.res.av}
        for att in self.res.attention:
            if att.score not in have_qk:
                ops = _contraction_operands(att.score)[:2]
                self.res.unmatched.append(self._unmatched("bd_qk", att.score, ops, "queries and keys"))
            if att.value not in have_av:
                ops = _contraction_operands(att.value)
                ops = ops[2:3] if canonical(att.value) == "sdpa" else ops[1:2] if canonical(att.value) == "matmul" else ops
                self.res.unmatched.append(self._unmatched("bd_vo", att.value, ops, "values"))

    def _unmatched(self, kind: str, node: torch.fx.Node, operands: list, what: str) -> Unmatched:
        lays = [self.lay(o) for o in operands]
        srcs: set[int] = set()
        for l in lays:
            if l is not None:
                srcs |= self.res.sources_of(l.idx)
        reason = self.opaque_reasons.get(node)
        if reason is None:
            touched = [c for l in lays if l is not None for c in np.unique(l.idx[l.idx <= -2])]
            if touched:
                reason = self.res.reason_of(int(touched[0]))
            elif any(l is not None and l.tracked for l in lays):
                reason = f"the {what} are not laid out as heads of channels at this contraction"
            else:
                reason = f"the {what} are not produced by linear projections of this graph"
        return Unmatched(kind, node, reason, frozenset(srcs))

    def opaque(self, node: torch.fx.Node, reason: str | None = None) -> None:
        """Unmodelled use: tracked inputs escape; output is tainted if any input was marked."""
        ins = [self.L.get(a) for a in node.all_input_nodes]
        flat = [l for x in ins for l in (x if isinstance(x, list) else [x]) if isinstance(l, Layout)]
        marked = [l for l in flat if l.marked]
        if not marked:
            self.L[node] = None
            return
        r = reason or self.why_touch(node)
        self.opaque_reasons.setdefault(node, r)
        srcs: set[int] = set()
        for l in marked:
            self.escape(l, r)
            srcs |= self.res.sources_of(l.idx)
        shp = shape_of(node)
        if shp is not None:
            self.L[node] = Layout(np.full((1,) * len(shp), self.reason_code(r, frozenset(srcs)), dtype=np.int64))
        else:
            self.L[node] = None

    def visit(self, node: torch.fx.Node) -> None:
        if node.op == "placeholder" or node.op == "get_attr":
            self.L[node] = None
            return
        if node.op == "output":
            for a in node.all_input_nodes:
                l = self.L.get(a)
                if l is not None:
                    self.escape(l, "escapes as a graph output (e.g. a returned KV cache)")
            return
        if node in self.core_of:
            i = self.core_of[node]
            site = self.sites[i]
            self.consume_by_linear(site)
            self.L[node] = self.fresh(i, node)
            return
        if node in self.out_of:
            self.L[node] = self.fresh(self.out_of[node], node)
            return
        comm = collective(node)
        if comm is not None:
            self.op_collective(node, comm)
            return
        name = canonical(node)
        tname = _name(node) if node.op in ("call_function", "call_method") else ""
        handler = getattr(self, f"op_{name}", None) if name else None
        if handler is None and tname in _CLEAN_CTORS:
            self.L[node] = None
            return
        if handler is None and node.op == "call_function" and node.target is operator.setitem:
            handler = self.op_setitem
        if handler is None and tname in ("copy_",):
            handler = self.op_copy_
        if handler is None and name in _IDENTITY | {"to", "cast"}:
            handler = self.op_identity
        if handler is None and node.op == "call_function" and node.target is builtins.getattr:
            self.L[node] = None    # .shape / .dtype / .device: metadata only
            return
        if handler is None:
            if any(isinstance(l, Layout) and l.tracked for a in node.all_input_nodes
                   for l in (self.L.get(a) if isinstance(self.L.get(a), list) else [self.L.get(a)])):
                key = op_label(node)
                self.res.unmodelled[key] = self.res.unmodelled.get(key, 0) + 1
            self.opaque(node)
            return
        handler(node)

    # ------------------------------------------------------------------ communication
    def op_collective(self, node: torch.fx.Node, c: Collective) -> None:
        """Communication between ranks, modelled for what it does to this rank's channels.

        Tensor parallelism runs one graph per rank (SPMD): another rank's copy of a value has
        the same layout here, but its channels come from *that* rank's weights (its heads, its
        slice of a rank or input dimension), and every rank factorizes its own weights. So:

        * what this rank sends (the input of any collective) escapes: another rank cannot
          fold this rank's basis into what it computes from it;
        * what it receives is touched by the collective: an all-reduce is linear (a sum over
          ranks of tensors with this layout) but each term is in its own rank's basis, so a
          rank cannot fold its partner with one basis; an all-gather is a concatenation along
          its dim of every rank's tensor (the layout is concatenated, every block touched: the
          other blocks are other ranks' channels); a reduce-scatter is this rank's slice of a
          sum; all-to-all and broadcast exchange whole blocks.
        * ``wait_tensor`` only waits: its output is its input's value (the layout passes).
        * DTensor placement changes (``from_local``/``redistribute``/``to_local``): the graph
          computes on DTensors, which bd does not rewrite; channels crossing them are touched.
        """
        if c.kind == "wait":
            return self.op_identity(node)
        if c.kind == "dtensor":
            return self.opaque(node, f"DTensor placement change ({c.name}) between projection and contraction: "
                                     f"the graph computes on DTensors (global shapes, placements), which bd does "
                                     f"not rewrite; {DTENSOR_ADVICE}")
        what = f"{c.name} ({c.reduce_op})" if c.reduce_op else c.name
        sent = f"sent to the other ranks by {what}: a rank cannot fold its partner with another rank's basis"
        received = {
            "all_reduce": "a sum over ranks of terms computed with each rank's own weights",
            "reduce_scatter": "this rank's slice of a sum over ranks of terms computed with each rank's own weights",
            "all_gather": "channels gathered from every rank, each computed with its own rank's weights",
            "all_to_all": "blocks exchanged between ranks, each computed with its own rank's weights",
            "broadcast": "one rank's values, computed with that rank's weights",
        }.get(c.kind)
        first = node.args[0] if node.args else None
        items = list(first) if c.coalesced and isinstance(first, (list, tuple)) else [first]
        if received is None or c.name.startswith(("c10d.", "torch.distributed.")):
            # send/receive, or torch.distributed's in-place API: every tensor it is given is
            # sent and may be overwritten with what other ranks sent
            reason = f"{what}: communication with other ranks between projection and contraction"
            for a in node.all_input_nodes:
                l = self.lay(a)
                if l is not None and l.marked:
                    self.escape(l, sent)
                    self.L[a] = self._received(l.idx, reason, across=0)
            return self.opaque(node, reason)
        reason = (f"{what} between projection and contraction: {received}; a rank cannot fold its partner with "
                  f"another rank's basis")
        value = example_value(node)
        outs = []
        for k, a in enumerate(items):
            l = self.lay(a)
            if l is None or not l.marked:
                outs.append(None)
                continue
            self.escape(l, sent)
            out = value[k] if c.coalesced and isinstance(value, (list, tuple)) else value
            outs.append(self._collected(l, c, reason, shape_of(a),
                                        tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        self.L[node] = outs if c.coalesced else outs[0]
        targets = items if c.inplace else []
        if not c.coalesced and isinstance(node.kwargs.get("out"), torch.fx.Node):
            targets = [node.kwargs["out"]]
        for a, o in zip(targets, outs):
            if isinstance(a, torch.fx.Node):
                self.L[a] = o

    def _received(self, idx: np.ndarray, reason: str, across: int | None = None) -> Layout:
        """``idx`` with every tracked entry touched by ``reason``. ``across``: a dim with
        channels along which ranks exchange blocks: the result cannot vary along it (one code
        naming every source linear)."""
        out = self.touched(idx, reason)
        if across is not None and out.ndim and out.shape[across] != 1:
            marked = out != UNTRACKED
            code = self.reason_code(reason, frozenset(self.res.sources_of(out))) if marked.any() else UNTRACKED
            out = np.full((1,) * out.ndim, code, dtype=np.int64)
        return Layout(out)

    def _collected(self, l: Layout, c: Collective, reason: str, in_shape, out_shape) -> Layout:
        """Layout of what a functional collective returns for an input of layout ``l``."""
        if in_shape is None or not in_shape:
            return self._received(l.idx, reason)
        nd = len(in_shape)
        idx = _broadcast_to_rank(l.idx, nd)
        if c.kind in ("all_reduce", "broadcast"):
            return self._received(idx, reason)
        d = (c.dim or 0) % nd
        if idx.shape[d] == 1:                   # ranks' tensors meet along a dim without channels
            return self._received(idx, reason)
        if c.kind == "all_gather" and out_shape is not None and len(out_shape) == nd:
            # concatenation along d of every rank's tensor: the layout repeats, each block
            # touched (the other blocks are other ranks' channels)
            n_in, n_out = size_hint(in_shape[d]), size_hint(out_shape[d])
            if n_in and n_out and n_out % n_in == 0:
                return Layout(np.concatenate([self._received(idx, reason).idx] * (n_out // n_in), axis=d))
        return self._received(idx, reason, across=d)

    # ------------------------------------------------------------------ linear consumption
    def consume_by_linear(self, site: LinearSite) -> None:
        l = self.lay(site.input)
        if l is None or not l.marked:
            return
        if not l.tracked:
            return
        shp = shape_of(site.input)
        idx = l.idx
        if site.prologue:
            idx = _np_ops(_broadcast_to_rank(idx, len(shp)), site.prologue, _hints(shp))
        idx = _collapse(idx, range(idx.ndim - 1))
        if idx.ndim == 0 or any(s != 1 for s in idx.shape[:-1]):
            self.escape(l, f"channels vary across non-channel dims at the input of {site.weight.name}")
            return
        rows = np.broadcast_to(idx.reshape(-1), (site.d_in,)) if idx.shape[-1] == 1 else idx.reshape(-1)
        if l.attn:
            self.res.o.append(OEvent(site, rows.copy()))
        else:
            self.escape(l, f"consumed directly by the linear {site.weight.name}")

    # ------------------------------------------------------------------ movement ops
    def op_identity(self, node):
        src = node.args[0] if node.args else None
        l = self.lay(src)
        if canonical(node) == "dropout" and arg(node, 2, "training", True) is not False:
            return self.opaque(node, "dropout in training mode")
        if canonical(node) == "to":
            # .to(dtype) / .to(device) only
            for a in list(node.args[1:]) + list(node.kwargs.values()):
                if isinstance(a, torch.fx.Node):
                    return self.opaque(node)
        self.L[node] = Layout(l.idx, l.attn) if l is not None else None
        if l is not None:
            self._alias(node, src)

    def _alias(self, node, src):
        if src in self.view_base:
            self.view_base[node] = self.view_base[src]

    def _reshape_to(self, node, l: Layout, in_shape, out_shape) -> Layout:
        """Reshape a layout along with its value: dimension groups of equal size product are
        paired; a group whose dims are all free stays free (size 1), a group carrying
        channels is materialized (its dims must be static) and reshaped."""
        ih, oh = _hints(in_shape), _hints(out_shape)
        if None in ih or None in oh:
            raise _Unsupported("view with unknown sizes")
        idx = _broadcast_to_rank(l.idx, len(ih))
        groups = _view_groups(ih, oh)
        if groups is None:
            raise _Unsupported("view not expressible as dimension groups")
        full = list(idx.shape)
        out = []
        for (i0, i1), (o0, o1) in groups:
            if all(s == 1 for s in idx.shape[i0:i1]):
                out.extend([1] * (o1 - o0))
                continue
            for k in range(i0, i1):
                if idx.shape[k] == 1 and not _is_static(in_shape[k]):
                    raise _Unsupported("view merges channels with a symbolic dimension")
                full[k] = ih[k]
            out.extend(oh[o0:o1])
        # free groups have product 1 on both sides, so a plain reshape lines up
        arr = np.ascontiguousarray(np.broadcast_to(idx, full)).reshape(out)
        return Layout(arr, l.attn)

    def op_reshape(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        self.L[node] = self._reshape_to(node, l, shape_of(src), shape_of(node))

    op_flatten = op_unflatten = op_squeeze = op_unsqueeze = op_view_as = op_reshape

    def op_t(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        self.L[node] = Layout(np.swapaxes(idx, -1, -2) if nd >= 2 else idx, l.attn)

    def op_T(self, node):
        """``x.T`` on rank > 2: every dim reversed."""
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        self.L[node] = Layout(np.transpose(_broadcast_to_rank(l.idx, nd)), l.attn)

    def op_mT(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        self.L[node] = Layout(np.swapaxes(_broadcast_to_rank(l.idx, nd), -1, -2), l.attn)

    def op_movedim(self, node):
        from .linears import view_permutation

        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        perm = view_permutation(node, nd)
        if perm is None:
            raise _Unsupported("movedim with symbolic dims")
        self.L[node] = Layout(np.transpose(_broadcast_to_rank(l.idx, nd), perm), l.attn)

    def op_repeat(self, node):
        l = self.src_layout(node)
        if l is None:
            return
        reps = list(node.args[1:]) if len(node.args) > 2 else arg(node, 1, "repeats")
        if isinstance(reps, int):
            reps = [reps]
        if reps and len(reps) == 1 and isinstance(reps[0], (list, tuple)):
            reps = list(reps[0])
        nd_out = len(shape_of(node))
        idx = _broadcast_to_rank(l.idx, nd_out)
        reps = [1] * (nd_out - len(reps)) + list(reps)
        tile = []
        for k, r in enumerate(reps):
            if idx.shape[k] == 1:
                tile.append(1)
            elif isinstance(r, int):
                tile.append(r)
            else:
                raise _Unsupported("repeat of a channel dimension by a symbolic count")
        self.L[node] = Layout(np.tile(idx, tile), l.attn)

    def op_select(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        dim, index = arg(node, 1, "dim"), arg(node, 2, "index")
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        d = dim % nd
        if idx.shape[d] == 1:
            self.L[node] = Layout(np.take(idx, 0, axis=d), l.attn)
        elif isinstance(index, int):
            self.L[node] = Layout(np.take(idx, index, axis=d), l.attn)
        else:
            raise _Unsupported("select of a channel dimension at a symbolic index")

    def op_unbind(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        dim = arg(node, 1, "dim", 0)
        shp = shape_of(src)
        nd = len(shp)
        d = dim % nd
        n = size_hint(shp[d])
        if n is None:
            raise _Unsupported("unbind of a symbolic dimension")
        idx = _broadcast_to_rank(l.idx, nd)
        self.L[node] = [Layout(np.take(idx, 0 if idx.shape[d] == 1 else i, axis=d), l.attn) for i in range(n)]

    def op_index_select(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        dim, index = arg(node, 1, "dim"), arg(node, 2, "index")
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        d = dim % nd
        if idx.shape[d] == 1:
            self.L[node] = Layout(idx, l.attn)
            return
        const = self.const_index(index)
        if const is None or const.ndim != 1:
            raise _Unsupported("channels selected by an index whose values are not known at compile time")
        self.L[node] = Layout(np.take(idx, const, axis=d), l.attn)

    def const_index(self, x: Any) -> np.ndarray | None:
        """Integer values of a constant index (a list, a tensor constant of the graph, or
        ``torch.tensor``/``torch.arange`` of literals), or None."""
        if self.inputs is not None and isinstance(x, torch.fx.Node) and x in self.placeholders:
            i = self.placeholders[x]
            return _const_index(self.gm, self.inputs[i]) if i < len(self.inputs) else None
        return _const_index(self.gm, x)

    def op_transpose(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        idx = _broadcast_to_rank(l.idx, nd)
        self.L[node] = Layout(np.swapaxes(idx, d0, d1), l.attn)

    def op_permute(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        dims = list(node.args[1:]) if len(node.args) > 2 else arg(node, 1, "dims")
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = list(dims[0])
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        self.L[node] = Layout(np.transpose(idx, [d % nd for d in dims]), l.attn)

    def op_expand(self, node):
        """expand / expand_as / broadcast_to: broadcast dims carry no channel variation."""
        l = self.src_layout(node)
        if l is None:
            return
        nd_out = len(shape_of(node))
        idx = _broadcast_to_rank(l.idx, nd_out)
        self.L[node] = Layout(idx, l.attn)

    op_broadcast_to = op_expand_as = op_expand

    def op_repeat_interleave(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        reps, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
        if not isinstance(reps, int) or dim is None:
            raise _Unsupported("repeat_interleave with tensor repeats or no dim")
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        if idx.shape[dim % nd] == 1:
            self.L[node] = Layout(idx, l.attn)
        else:
            self.L[node] = Layout(np.repeat(idx, reps, axis=dim % nd), l.attn)

    def op_getitem(self, node):
        src, index = node.args[0], node.args[1]
        v = self.L.get(src)
        if isinstance(v, list):
            self.L[node] = v[index] if isinstance(index, int) else None
            return
        # a basic-index view of src: slice assignment through it writes into src
        self.view_base[node] = (src, index) if src not in self.view_base else (None, None)
        l = self.lay(src)
        if l is None:
            self.L[node] = None
            return
        shp = shape_of(src)
        self.L[node] = Layout(_apply_index(l.idx, index, shp, self.const_index), l.attn)

    def op_narrow(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        dim, start, length = arg(node, 1, "dim"), arg(node, 2, "start"), arg(node, 3, "length")
        if not all(isinstance(v, int) for v in (dim, start, length)):
            raise _Unsupported("narrow with symbolic arguments")
        nd = len(shape_of(src))
        idx = _broadcast_to_rank(l.idx, nd)
        d = dim % nd
        if idx.shape[d] != 1:
            idx = np.take(idx, np.arange(start, start + length), axis=d)
        self.L[node] = Layout(idx, l.attn)

    def _split_sizes(self, node, total, nd, d):
        if canonical(node) == "chunk":
            chunks = arg(node, 1, "chunks")
            step = -(-total // chunks)
            sizes = []
            rem = total
            while rem > 0:
                sizes.append(min(step, rem))
                rem -= step
            return sizes
        s = arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size"))
        if isinstance(s, int):
            sizes = [s] * (total // s) + ([total % s] if total % s else [])
            return sizes
        return [size_hint(x) if not isinstance(x, int) else x for x in s]

    def op_split(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        shp = shape_of(src)
        nd = len(shp)
        dim = arg(node, 2, "dim", 0)
        d = dim % nd
        total = size_hint(shp[d])
        idx = _broadcast_to_rank(l.idx, nd)
        if total is None and (idx.shape[d] != 1 or canonical(node) == "chunk"
                              or isinstance(arg(node, 1, "split_size_or_sections", arg(node, 1, "split_size")), int)):
            raise _Unsupported("split of a dimension whose size is not known at compile time")
        sizes = self._split_sizes(node, total, nd, d)
        if idx.shape[d] == 1:
            # not a channel dimension: every part keeps the layout, whatever its size (the sizes
            # may be data-dependent, e.g. tokens per expert in a mixture-of-experts loop)
            self.L[node] = [Layout(idx, l.attn) for _ in sizes]
            return
        if any(s is None for s in sizes):
            raise _Unsupported("split of a channel dimension at sizes not known at compile time")
        outs = []
        start = 0
        for s in sizes:
            outs.append(Layout(np.take(idx, np.arange(start, start + s), axis=d), l.attn))
            start += s
        self.L[node] = outs

    op_chunk = op_split

    def op_cat(self, node):
        tensors = arg(node, 0, "tensors")
        dim = arg(node, 1, "dim", 0)
        lays = [self.lay(t) for t in tensors]
        if all(l is None for l in lays):
            self.L[node] = None
            return
        out_shape = shape_of(node)
        nd = len(out_shape)
        d = dim % nd
        parts = []
        for t, l in zip(tensors, lays):
            shp = shape_of(t)
            if l is None:
                parts.append((np.full((1,) * nd, UNTRACKED, dtype=np.int64), shp))
            else:
                parts.append((_broadcast_to_rank(l.idx, nd), shp))
        if all(p[0].shape[d] == 1 for p in parts):
            first = parts[0][0]
            same = all(p[0].shape == first.shape and np.array_equal(p[0], first) for p in parts)
            if same:
                self.L[node] = Layout(first, any(l.attn for l in lays if l is not None))
                return
            for l in lays:
                if l is not None:
                    self.escape(l, KV_CACHE)
            self.opaque(node, KV_CACHE)
            return
        # concatenation along a channel dimension: materialize that dim for every part
        arrs = []
        for (a, shp) in parts:
            n = size_hint(shp[d])
            if n is None:
                raise _Unsupported("cat of a symbolic channel dimension")
            tgt = list(a.shape)
            tgt[d] = n
            arrs.append(np.broadcast_to(a, tgt))
        common = [max(a.shape[k] for a in arrs) if k != d else None for k in range(nd)]
        arrs2 = []
        for a in arrs:
            tgt = [common[k] if k != d else a.shape[d] for k in range(nd)]
            arrs2.append(np.broadcast_to(a, tgt))
        self.L[node] = Layout(np.concatenate(arrs2, axis=d), any(l.attn for l in lays if l is not None))

    # ------------------------------------------------------------------ slice assignment
    def _assign(self, base: torch.fx.Node, index: Any, value: Any, node: torch.fx.Node) -> None:
        lv = self.lay(value) if isinstance(value, torch.fx.Node) else None
        lb = self.lay(base)
        if lv is None and lb is None:
            return
        bshape = shape_of(base)
        nd = len(bshape)
        hints = _hints(bshape)
        barr = _broadcast_to_rank(lb.idx, nd) if lb is not None else np.full((1,) * nd, UNTRACKED, dtype=np.int64)
        varr = _broadcast_to_rank(lv.idx, nd) if lv is not None else None
        # materialize every dim that the value's layout varies along (must be static)
        need = list(barr.shape)
        items = _expand_index(index, nd)
        if varr is not None:
            region_shape = _index_result_shape(index, hints)
            if region_shape is None:
                raise _Unsupported("slice assignment with an unsupported index")
            # the base dim of each region dim (an integer index drops its dim from the region)
            region_dims = [k for k, sl in enumerate(items) if not isinstance(sl, int)]
            # dims of the base that the value layout varies along
            vfull = _broadcast_to_rank(varr, len(region_shape))
            for r, s in enumerate(vfull.shape):
                if s != 1:
                    need[region_dims[r]] = hints[region_dims[r]]
            for k, s in enumerate(barr.shape):
                if s != 1:
                    need[k] = hints[k]
        # the dims the region covers only part of (a slice or an integer index) must be
        # materialized too: the layout differs inside and outside the region
        # (a region with symbolic bounds, reached only by an untracked value, is marked whole)
        static = [isinstance(sl, int) or (isinstance(sl, slice) and all(
            v is None or isinstance(v, int) for v in (sl.start, sl.stop, sl.step))) for sl in items]
        for k, sl in enumerate(items):
            if static[k] and sl != slice(None):
                need[k] = hints[k]
        if any(n is None for n in need):
            raise _Unsupported("slice assignment over a symbolic dimension")
        arr = np.array(np.broadcast_to(barr, need))
        region_index = tuple(sl if static[k] and (isinstance(sl, int) or need[k] != 1) else
                             slice(None) for k, sl in enumerate(items))
        target = arr[region_index]
        if varr is None:
            arr[region_index] = UNTRACKED
        else:
            arr[region_index] = np.broadcast_to(_broadcast_to_rank(varr, target.ndim), target.shape)
        attn = (lb.attn if lb is not None else False) or (lv.attn if lv is not None else False)
        self.L[base] = Layout(arr, attn)

    def op_setitem(self, node):
        base, index, value = node.args[0], node.args[1], node.args[2]
        self._assign(base, index, value, node)
        self.L[node] = None

    def op_copy_(self, node):
        dst, src = node.args[0], node.args[1]
        vb = self.view_base.get(dst)
        if vb is not None and vb[0] is not None and vb[1] is not None:
            base, index = vb
            self._assign(base, index, src, node)
            self.L[node] = None
            return
        ls = self.lay(src)
        if ls is not None:
            self.L[dst] = Layout(_broadcast_to_rank(ls.idx, len(shape_of(dst))), ls.attn)
        self.L[node] = self.L.get(dst)

    # ------------------------------------------------------------------ elementwise
    def _scalar_like(self, x) -> bool:
        if isinstance(x, (int, float)):
            return True
        if isinstance(x, torch.fx.Node) and self.L.get(x) is None:
            shp = shape_of(x)
            if shp is None:
                return example_value(x) is not None and not isinstance(example_value(x), torch.Tensor)
            return all(size_hint(s) == 1 for s in shp)
        return False

    def _row_scale(self, l: Layout, other) -> bool:
        """A multiplier that is constant along every channel dim of ``l`` and not derived
        from tracked values: scaling rows commutes with a change of basis of channels."""
        if self._scalar_like(other):
            return True
        if not isinstance(other, torch.fx.Node) or self.L.get(other) is not None:
            return False
        oshp = shape_of(other)
        if oshp is None:
            return False
        idx = l.idx
        nd = max(idx.ndim, len(oshp))
        idx = _broadcast_to_rank(idx, nd)
        oh = [1] * (nd - len(oshp)) + _hints(oshp)
        return all(not (idx.shape[k] != 1 and oh[k] != 1) for k in range(nd))

    def op_mul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        la, lb = self.lay(a), self.lay(b)
        if la is not None and lb is None and self._row_scale(la, b):
            self.L[node] = Layout(la.idx, la.attn)
            return
        if lb is not None and la is None and self._row_scale(lb, a):
            self.L[node] = Layout(lb.idx, lb.attn)
            return
        self._elementwise(node)

    def op_div(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        la = self.lay(a)
        if la is not None and self.lay(b) is None and self._row_scale(la, b):
            self.L[node] = Layout(la.idx, la.attn)
            return
        self._elementwise(node)

    def op_neg(self, node):
        l = self.lay(node.args[0])
        self.L[node] = Layout(l.idx, l.attn) if l is not None else None

    def op_add(self, node):
        self._elementwise(node)

    op_sub = op_add

    def _elementwise(self, node):
        ins = [self.lay(a) for a in node.args if isinstance(a, torch.fx.Node)]
        ins = [l for l in ins if l is not None and l.marked]
        if not ins:
            self.L[node] = None
            return
        reason = self.why_touch(node)
        shp = shape_of(node)
        nd = len(shp) if shp is not None else max(l.idx.ndim for l in ins)
        arrs = [_broadcast_to_rank(l.idx, nd) for l in ins]
        try:
            out_shape = np.broadcast_shapes(*[a.shape for a in arrs])
        except ValueError:
            return self.opaque(node, reason)
        res = np.full(out_shape, UNTRACKED, dtype=np.int64)
        for l, a in zip(ins, arrs):
            self.escape(l, reason)
            a = self.touched(np.broadcast_to(a, out_shape), reason)
            res = np.where((a <= -2) & (res == UNTRACKED), a, res)
        self.L[node] = Layout(res)

    # ------------------------------------------------------------------ contractions
    def op_matmul(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        la, lb = self.lay(a), self.lay(b)
        if la is None and lb is None:
            self.L[node] = None
            return
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None or len(sa) < 2 or len(sb) < 2:
            return self.opaque(node)
        nd = max(len(sa), len(sb))
        ia = _broadcast_to_rank(la.idx, len(sa)) if la is not None else None
        ib = _broadcast_to_rank(lb.idx, len(sb)) if lb is not None else None
        out = self._contract(node, ia, ib, nd)
        if out is not None:
            self.L[node] = Layout(out, True)

    def _contract(self, node, ia, ib, nd) -> np.ndarray | None:
        """``a @ b`` on layout arrays (None: untracked operand). Records QK/AV events and
        escapes; returns the result's layout array when values pass through attention,
        else sets the node's layout (None or opaque) and returns None."""
        a_chan = ia is not None and ia.shape[-1] != 1 and (ia != UNTRACKED).any()
        b_chan_k = ib is not None and ib.shape[-2] != 1 and (ib != UNTRACKED).any()
        b_chan_n = ib is not None and ib.shape[-1] != 1
        if a_chan and b_chan_k:
            self._qk(node, ia, np.swapaxes(ib, -1, -2), nd)
            self.L[node] = None
            return None
        if node in self.score_nodes and a_chan != b_chan_k:
            # attention scores one of whose sides carries no channels of a linear of this
            # graph: queries (or keys) from a cache, a projection rewritten by another pass,
            # or values only touched on the way (e.g. a chain whose input came through a
            # norm). The verdict goes to the QK event (a touched side gives its reason, an
            # untracked one makes the other escape) and the scores carry no channels, so the
            # value path stays analysable
            none = np.full((1,) * nd, UNTRACKED, dtype=np.int64)
            self._qk(node, ia if ia is not None else none, np.swapaxes(ib if ib is not None else none, -1, -2), nd)
            self.L[node] = None
            return None
        a_tracked = ia is not None and (ia >= 0).any()
        b_tracked = ib is not None and (ib >= 0).any()
        a_marked = ia is not None and (ia != UNTRACKED).any()
        b_marked = ib is not None and (ib != UNTRACKED).any()
        if not a_marked and b_marked and ib.shape[-2] == 1 and b_chan_n:
            # probs @ v: positions contracted, channels of v (tracked or touched) carried
            # through, so that every value head gets a verdict
            self._av(node, ib)
            return _broadcast_to_rank(ib, nd)
        if not a_tracked and not b_tracked:
            # Only touched channels meet here; they are never rewritten (they escaped where
            # they were touched), so the result does not depend on any rewrite. Keep the
            # event so that the report can say why this pair was not rewritten.
            if a_marked and b_marked:
                try:
                    self._qk(node, ia, np.swapaxes(ib, -1, -2), nd)
                except _Unsupported:
                    pass
            self.L[node] = None
            return None
        self.opaque(node, "contracted with values that are not attention weights")
        return None

    def op_baddbmm(self, node):
        """``beta * input + alpha * (batch1 @ batch2)`` (scores with an additive bias)."""
        inp, a, b = arg(node, 0, "input"), arg(node, 1, "batch1"), arg(node, 2, "batch2")
        li, la, lb = self.lay(inp), self.lay(a), self.lay(b)
        if li is not None and li.marked:
            return self.opaque(node)
        if la is None and lb is None:
            self.L[node] = None
            return
        ia = _broadcast_to_rank(la.idx, 3) if la is not None else None
        ib = _broadcast_to_rank(lb.idx, 3) if lb is not None else None
        out = self._contract(node, ia, ib, 3)
        if out is not None:
            self.opaque(node, "attention output with an additive term")

    def op_einsum(self, node):
        parsed = einsum_operands(node)
        if parsed is None:
            return self.opaque(node)
        eq, operands = parsed
        lays = [self.lay(o) for o in operands]
        if all(l is None for l in lays):
            self.L[node] = None
            return
        shapes = [shape_of(o) for o in operands]
        if any(s is None for s in shapes):
            return self.opaque(node)
        lab = einsum_labels(eq, [len(s) for s in shapes])
        if lab is None:
            return self.opaque(node, "einsum equation not understood")
        labels, out = lab
        if any(len(set(l)) != len(l) for l in labels + [out]):
            return self.opaque(node, "einsum with a repeated index (a diagonal)")
        arrs = [_broadcast_to_rank(l.idx, len(s)) if l is not None else np.full((1,) * len(s), UNTRACKED, dtype=np.int64)
                for l, s in zip(lays, shapes)]
        if len(operands) == 1:
            if sorted(out) != sorted(labels[0]):
                return self.opaque(node, "einsum reduction over channels")
            self.L[node] = Layout(np.transpose(arrs[0], [labels[0].index(c) for c in out]), lays[0].attn)
            return
        if len(operands) != 2:
            return self.opaque(node, "einsum of more than two operands")
        al, bl = labels
        if any(c not in out and c not in bl for c in al) or any(c not in out and c not in al for c in bl):
            return self.opaque(node, "einsum summing a dimension of one operand")
        C = [c for c in al if c in bl and c not in out]
        batch = [c for c in out if c in al and c in bl]
        af = [c for c in out if c in al and c not in bl]
        bf = [c for c in out if c in bl and c not in al]
        ha = [size_hint(z) for z in shapes[0]]
        hb = [size_hint(z) for z in shapes[1]]
        qa = _group(arrs[0], al, ha, batch, [af, C])                   # (batch..., M, E)
        qb = np.swapaxes(_group(arrs[1], bl, hb, batch, [bf, C]), -1, -2)   # (batch..., E, N)
        nd = len(batch) + 2
        res = self._contract(node, qa if lays[0] is not None else None, qb if lays[1] is not None else None, nd)
        if res is None:
            return
        # (batch..., M, N) -> (batch..., af..., bf...) -> output order
        res = _broadcast_to_rank(res, nd)
        sizes = {c: h for c, h in zip(al, ha)}
        sizes.update({c: h for c, h in zip(bl, hb)})
        parts = []
        for grp, k in ((af, -2), (bf, -1)):
            n = res.shape[k]
            if n == 1:
                parts.append([1] * len(grp))
            else:
                gs = [sizes[c] for c in grp]
                if any(g is None for g in gs):
                    raise _Unsupported("einsum output merges a symbolic dimension with channels")
                parts.append(gs)
        res = res.reshape(res.shape[:-2] + tuple(parts[0]) + tuple(parts[1]))
        cur = batch + af + bf
        self.L[node] = Layout(np.transpose(res, [cur.index(c) for c in out]), True)

    def _pairs(self, q: np.ndarray, k: np.ndarray, nd: int) -> tuple[np.ndarray, np.ndarray]:
        """Broadcast batch dims and flatten to (pairs, E)."""
        q = _collapse(_broadcast_to_rank(q, nd), [nd - 2])
        k = _collapse(_broadcast_to_rank(k, nd), [nd - 2])
        q2 = q.reshape(q.shape[:-2] + (q.shape[-1],)) if q.shape[-2] == 1 else None
        k2 = k.reshape(k.shape[:-2] + (k.shape[-1],)) if k.shape[-2] == 1 else None
        if q2 is None or k2 is None:
            raise _Unsupported("channel layout varies along positions at a contraction")
        E = max(q2.shape[-1], k2.shape[-1])
        batch = np.broadcast_shapes(q2.shape[:-1], k2.shape[:-1])
        qb = np.broadcast_to(q2, batch + (q2.shape[-1],))
        kb = np.broadcast_to(k2, batch + (k2.shape[-1],))
        qb = np.broadcast_to(qb, batch + (E,)).reshape(-1, E)
        kb = np.broadcast_to(kb, batch + (E,)).reshape(-1, E)
        return qb, kb

    def _qk(self, node, q, k, nd):
        qb, kb = self._pairs(q, k, nd)
        if not ((qb != UNTRACKED).any() and (kb != UNTRACKED).any()):
            for arr in (qb, kb):
                self.escape(Layout(arr), "contracted with an untracked tensor (e.g. a cached key)")
        if (qb != UNTRACKED).any() or (kb != UNTRACKED).any():
            self.res.qk.append(QKEvent(node, qb.copy(), kb.copy()))

    def _av(self, node, v):
        v = _collapse(v, [v.ndim - 2])
        if v.shape[-2] != 1:
            raise _Unsupported("value layout varies along positions")
        rows = v.reshape(v.shape[:-2] + (v.shape[-1],)).reshape(-1, v.shape[-1])
        if (rows != UNTRACKED).any():
            self.res.av.append(AVEvent(node, rows.copy()))

    def op_sdpa(self, node):
        q, k, v = arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")
        lq, lk, lv = self.lay(q), self.lay(k), self.lay(v)
        mask = arg(node, 3, "attn_mask")
        if isinstance(mask, torch.fx.Node) and self.lay(mask) is not None and self.lay(mask).marked:
            self.escape(self.lay(mask), "used as an attention mask")
        sq, sk = shape_of(q), shape_of(k)
        nd = len(sq)
        gqa = bool(node.kwargs.get("enable_gqa", False))
        if lq is not None or lk is not None:
            iq = _broadcast_to_rank(lq.idx, nd) if lq is not None else np.full((1,) * nd, UNTRACKED, dtype=np.int64)
            ik = _broadcast_to_rank(lk.idx, nd) if lk is not None else np.full((1,) * nd, UNTRACKED, dtype=np.int64)
            hq, hk = size_hint(sq[-3]) if nd >= 3 else 1, size_hint(sk[-3]) if nd >= 3 else 1
            if gqa and hq != hk and nd >= 3 and ik.shape[-3] != 1:
                ik = np.repeat(ik, hq // hk, axis=-3)
            self._qk(node, iq, ik, nd)
        if lv is None:
            self.L[node] = None
            return
        iv = _broadcast_to_rank(lv.idx, nd)
        sv = shape_of(v)
        hq, hv = size_hint(sq[-3]) if nd >= 3 else 1, size_hint(sv[-3]) if nd >= 3 else 1
        self._av(node, iv)
        if gqa and hq != hv and iv.shape[-3] != 1:
            iv = np.repeat(iv, hq // hv, axis=-3)
        self.L[node] = Layout(iv, True)


class _Unsupported(Exception):
    pass


def _contraction_operands(node: torch.fx.Node) -> list:
    name = canonical(node)
    if name == "einsum":
        parsed = einsum_operands(node)
        return list(parsed[1]) if parsed else []
    if name == "sdpa":
        return [arg(node, 0, "query"), arg(node, 1, "key"), arg(node, 2, "value")]
    if name == "baddbmm":
        return [arg(node, 1, "batch1"), arg(node, 2, "batch2")]
    return [arg(node, 0, "input"), arg(node, 1, "other")]


# ---------------------------------------------------------------------------- utilities
def _is_static(s) -> bool:
    return isinstance(s, int)


def _broadcast_to_rank(idx: np.ndarray, nd: int) -> np.ndarray:
    if idx.ndim == nd:
        return idx
    if idx.ndim < nd:
        return idx.reshape((1,) * (nd - idx.ndim) + idx.shape)
    extra = idx.ndim - nd
    if all(s == 1 for s in idx.shape[:extra]):
        return idx.reshape(idx.shape[extra:])
    raise _Unsupported("rank mismatch")


def _collapse(idx: np.ndarray, axes) -> np.ndarray:
    """Reduce to size 1 each of ``axes`` along which the layout does not vary (a dim that
    was materialized when merged with a channel dim, e.g. batch * heads)."""
    for k in axes:
        if idx.shape[k] > 1:
            first = np.take(idx, [0], axis=k)
            if (idx == first).all():
                idx = first
    return idx


def _group(arr: np.ndarray, labels: str, hints: list, keep: list, groups: list) -> np.ndarray:
    """Transpose a layout array (dims named by ``labels``) to ``keep + groups...`` order and
    merge each group into one dim (size 1 if no channels vary along it)."""
    order = list(keep) + [c for g in groups for c in g]
    arr = np.transpose(arr, [labels.index(c) for c in order])
    shape = list(arr.shape[:len(keep)])
    full = list(arr.shape[:len(keep)])
    k = len(keep)
    for g in groups:
        dims = arr.shape[k:k + len(g)]
        if all(d == 1 for d in dims):
            shape.append(1)
            full.extend([1] * len(g))
        else:
            gs = [hints[labels.index(c)] for c in g]
            if any(z is None for z in gs):
                raise _Unsupported("contraction merges a symbolic dimension with channels")
            shape.append(int(np.prod(gs)) if gs else 1)
            full.extend(gs)
        k += len(g)
    return np.ascontiguousarray(np.broadcast_to(arr, full)).reshape(shape)


def _view_groups(ih: list[int], oh: list[int]):
    """Pair runs of input dims with runs of output dims of equal product."""
    groups = []
    i = o = 0
    ni, no = len(ih), len(oh)
    while i < ni or o < no:
        i0, o0 = i, o
        pi = 1
        po = 1
        if i < ni:
            pi = ih[i]; i += 1
        if o < no:
            po = oh[o]; o += 1
        while pi != po:
            if pi < po and i < ni:
                pi *= ih[i]; i += 1
            elif po < pi and o < no:
                po *= oh[o]; o += 1
            else:
                return None
        # absorb trailing size-1 dims into this group
        while i < ni and ih[i] == 1 and (o >= no or oh[o] != 1):
            i += 1
        while o < no and oh[o] == 1 and (i >= ni or ih[i] != 1):
            o += 1
        groups.append(((i0, i), (o0, o)))
    return groups


def _expand_index(index, nd: int) -> list:
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    n_real = sum(1 for x in index if x is not None and x is not Ellipsis)
    for x in index:
        if x is Ellipsis:
            out.extend([slice(None)] * (nd - n_real))
        elif x is None:
            raise _Unsupported("indexing with None inside slice assignment")
        else:
            out.append(x)
    out.extend([slice(None)] * (nd - len(out)))
    return out


def _index_result_shape(index, hints):
    try:
        items = _expand_index(index, len(hints))
    except _Unsupported:
        return None
    shape = []
    for sl, n in zip(items, hints):
        if isinstance(sl, int):
            continue
        if isinstance(sl, slice):
            if any(isinstance(v, torch.fx.Node) for v in (sl.start, sl.stop, sl.step)):
                return None
            if n is None:
                shape.append(1)
            else:
                shape.append(len(range(*sl.indices(n))))
        else:
            return None
    return shape


def _apply_index(idx: np.ndarray, index, shape, const_index=None) -> np.ndarray:
    """Apply an index (ints, slices, None, Ellipsis and at most one advanced index: a
    constant list or tensor, or any tensor on a dimension without channels) to a layout."""
    nd = len(shape)
    idx = _broadcast_to_rank(idx, nd)
    if not isinstance(index, tuple):
        index = (index,)
    n_real = sum(1 for x in index if x is not None and x is not Ellipsis and not _is_bool_index(x))
    n_real += sum(_bool_rank(x) for x in index if _is_bool_index(x))
    items = []
    for x in index:
        if x is Ellipsis:
            items.extend([slice(None)] * (nd - n_real))
        else:
            items.append(x)
    out = []
    dim = 0
    advanced = 0
    for x in items:
        if x is None:
            out.append(None)
            continue
        if isinstance(x, torch.fx.Node) and not isinstance(example_value(x), torch.Tensor):
            # a SymInt position
            if idx.shape[dim] != 1:
                raise _Unsupported("symbolic index on a channel dimension")
            out.append(0)
            dim += 1
            continue
        if isinstance(x, slice) and any(isinstance(v, torch.fx.Node) for v in (x.start, x.stop, x.step)):
            if idx.shape[dim] != 1:
                raise _Unsupported("symbolic index on a channel dimension")
            out.append(slice(None))
            dim += 1
            continue
        if isinstance(x, bool):
            raise _Unsupported("boolean scalar index")
        if isinstance(x, int):
            out.append(x if idx.shape[dim] != 1 else 0)
            dim += 1
            continue
        if isinstance(x, slice):
            out.append(x if idx.shape[dim] != 1 else slice(None))
            dim += 1
            continue
        # advanced index
        advanced += 1
        if advanced > 1:
            raise _Unsupported("several advanced indices")
        const = const_index(x) if const_index is not None else None
        if const is not None and const.dtype == bool:
            if const.ndim != 1:
                raise _Unsupported("multi-dimensional boolean mask")
            const = np.nonzero(const)[0]
        if idx.shape[dim] == 1:
            rank = const.ndim if const is not None else _index_rank(x)
            if rank is None:
                raise _Unsupported(f"advanced indexing ({type(x).__name__})")
            out.append(np.zeros((1,) * rank, dtype=np.int64))
        elif const is not None:
            out.append(const.astype(np.int64))
        else:
            raise _Unsupported("channels indexed by a tensor whose values are not known at compile time")
        dim += 1
    return idx[tuple(out)]


def _is_bool_index(x) -> bool:
    v = example_value(x) if isinstance(x, torch.fx.Node) else None
    return isinstance(v, torch.Tensor) and v.dtype == torch.bool


def _bool_rank(x) -> int:
    return example_value(x).dim()


def _index_rank(x) -> int | None:
    if isinstance(x, (list, tuple)):
        return np.asarray(x).ndim
    v = example_value(x) if isinstance(x, torch.fx.Node) else x
    if isinstance(v, torch.Tensor):
        if v.dtype == torch.bool:
            return None
        return v.dim()
    return None


def _const_index(gm: torch.fx.GraphModule, x: Any) -> np.ndarray | None:
    """Integer (or boolean) values of a constant index, or None when not known."""
    try:
        if isinstance(x, (list, tuple)):
            if not all(isinstance(v, (int, bool, list, tuple)) for v in x):
                return None
            a = np.asarray(x)
            return a if a.dtype.kind in "iub" else None
        if isinstance(x, torch.Tensor):
            if _compat_is_fake(x) or x.is_floating_point() or x.is_complex():
                return None
            return x.detach().cpu().numpy()
        if not isinstance(x, torch.fx.Node):
            return None
        if x.op == "get_attr":
            obj = gm
            for part in str(x.target).split("."):
                obj = getattr(obj, part)
            return _const_index(gm, obj)
        if x.op == "call_function" and x.target is torch.tensor and x.args:
            return _const_index(gm, x.args[0])
        if x.op == "call_function" and x.target is torch.arange:
            a = [v for v in x.args]
            if a and all(isinstance(v, int) for v in a):
                return np.arange(*a)
            return None
        if canonical(x) in ("to", "contiguous", "clone", "detach", "alias") and x.args:
            return _const_index(gm, x.args[0])
    except Exception:
        return None
    return None


def _np_ops(idx: np.ndarray, ops, shape=None) -> np.ndarray:
    """Apply a site's prologue/epilogue calls (permute, flatten, unflatten) to a layout
    array; ``shape`` (hints of the value's sizes) lets flatten materialize channel dims."""
    cur = list(shape) if shape is not None else list(idx.shape)
    for name, a in ops:
        if name == "permute":
            perm = list(a[0])
            idx = np.transpose(_broadcast_to_rank(idx, len(perm)), perm)
            cur = [cur[d] for d in perm]
        elif name == "flatten":
            s, e = a[0] % idx.ndim, a[1] % idx.ndim
            group = idx.shape[s:e + 1]
            if all(g == 1 for g in group):
                idx = idx.reshape(idx.shape[:s] + (1,) + idx.shape[e + 1:])
            else:
                sizes = cur[s:e + 1]
                if any(z is None for z in sizes):
                    raise _Unsupported("flatten of a symbolic channel dimension")
                full = idx.shape[:s] + tuple(sizes) + idx.shape[e + 1:]
                idx = np.ascontiguousarray(np.broadcast_to(idx, full)).reshape(
                    idx.shape[:s] + (int(np.prod(sizes)),) + idx.shape[e + 1:])
            prod = None if any(z is None for z in cur[s:e + 1]) else int(np.prod(cur[s:e + 1]))
            cur = cur[:s] + [prod] + cur[e + 1:]
        elif name == "unflatten":
            d, sizes = a[0] % idx.ndim, tuple(a[1])
            if idx.shape[d] == 1:
                idx = idx.reshape(idx.shape[:d] + (1,) * len(sizes) + idx.shape[d + 1:])
            else:
                idx = idx.reshape(idx.shape[:d] + sizes + idx.shape[d + 1:])
            cur = cur[:d] + list(sizes) + cur[d + 1:]
        else:
            raise _Unsupported(f"unknown site reshape {name}")
    return idx


def analyze(gm: torch.fx.GraphModule, linears: Sequence[LinearSite], example_inputs=None) -> LayoutResult:
    """Channel layouts of ``gm``. ``example_inputs`` (optional) give the values of index
    tensors that are graph inputs (buffers), so that channels selected by them are followed."""
    return _Analysis(gm, linears, example_inputs).run()
