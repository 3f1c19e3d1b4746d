"""The provenance driver: the channel-layout analysis of a graph, node by node.

:class:`_Analysis` visits the graph's nodes in order. A linear site's output gets fresh
tracked columns; each other node gets its layout from a handler ``op_<canonical name>``:
the movement ops, slice assignment and elementwise ops here, the contractions in
:mod:`.attention`, the collectives in :mod:`.collectives` (mixed in). A node without a
handler is *opaque*: its tracked inputs escape and its output is touched. Escapes, touched
codes and their reasons, and the ops without a model are collected in :class:`LayoutResult`,
which :func:`analyze` returns.
"""
from __future__ import annotations

import builtins
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from ..._compat import example_value, size_hint
from ...report import KV_CACHE
from ..linears import LinearSite
from ..ops import arg, canonical, op_label, shape_of
from .algebra import (SHIFT, UNTRACKED, ChannelLayout, _apply_index, _broadcast_to_rank,
                      _const_index, _expand_index, _hints, _index_result_shape, _is_static, _np_ops,
                      _Unsupported, _view_groups, decode)
from .attention import AVEvent, OEvent, QKEvent, Unmatched, _AttentionOps
from .collectives import _CollectiveOps, collective

_ROPE_MARKERS = {"cos", "sin", "polar", "view_as_complex", "view_as_real"}
_NORM_MARKERS = {"rsqrt", "mean", "var", "norm", "layer_norm", "rms_norm", "var_mean", "std"}
_CLEAN_CTORS = {"new_empty", "new_zeros", "new_ones", "new_full", "empty_like", "zeros_like",
                "ones_like", "full_like", "size", "dim", "numel", "stride", "data_ptr"}
_IDENTITY = {"contiguous", "clone", "to", "cast", "type_as", "detach", "alias", "float", "dropout"}


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


def _name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    t = node.target
    return getattr(t, "__name__", str(t))


class _Analysis(_AttentionOps, _CollectiveOps):
    def __init__(self, gm: torch.fx.GraphModule, linears: Sequence[LinearSite], example_inputs=None):
        self.gm = gm
        self.inputs = list(example_inputs) if example_inputs is not None else None
        self.placeholders = {n: i for i, n in enumerate(n for n in gm.graph.nodes if n.op == "placeholder")}
        self.sites = list(linears)
        self.res = LayoutResult(sources=self.sites)
        self.L: dict[torch.fx.Node, Any] = {}          # node -> ChannelLayout | list[ChannelLayout|None] | None
        self.core_of = {s.core: i for i, s in enumerate(self.sites)}
        self.out_of = {s.output: i for i, s in enumerate(self.sites) if s.bias_node is not None}
        self._reason_ids: dict[str, int] = {}
        self.view_base: dict[torch.fx.Node, tuple[torch.fx.Node, Any]] = {}  # view node -> (base, index)
        self.opaque_reasons: dict[torch.fx.Node, str] = {}
        from ..contractions import find_attention

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
            if not isinstance(l, ChannelLayout):
                continue
            for code in np.unique(l.idx[l.idx >= 0]):
                src, col = decode(code)
                self.res.escapes.setdefault(src, {}).setdefault(col, reason)

    def touch(self, lay: ChannelLayout, reason: str, shape=None) -> ChannelLayout:
        """Tracked entries become touched (and their columns escape)."""
        self.escape(lay, reason)
        idx = self.touched(lay.idx, reason)
        if shape is not None:
            idx = _broadcast_to_rank(idx, len(shape))
        return ChannelLayout(idx)

    def src_layout(self, node: torch.fx.Node) -> ChannelLayout | None:
        """Layout of a movement op's input; records a clean output when there is none."""
        l = self.lay(node.args[0]) if node.args else None
        if l is None:
            self.L[node] = None
        return l

    def lay(self, x: Any) -> ChannelLayout | None:
        if isinstance(x, torch.fx.Node):
            v = self.L.get(x)
            return v if isinstance(v, ChannelLayout) else None
        return None

    def fresh(self, site_index: int, node: torch.fx.Node) -> ChannelLayout | None:
        shp = shape_of(node)
        if shp is None:
            return None
        site = self.sites[site_index]
        d = site.d_out
        idx = (np.int64(site_index) << SHIFT) + np.arange(d, dtype=np.int64)
        extra = sum(len(a[1]) - 1 for name, a in site.epilogue if name == "unflatten")
        base = idx.reshape((1,) * (len(shp) - 1 - extra) + (d,))
        return ChannelLayout(_np_ops(base, site.epilogue))

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

    def opaque(self, node: torch.fx.Node, reason: str | None = None) -> None:
        """Unmodelled use: tracked inputs escape; output is tainted if any input was marked."""
        ins = [self.L.get(a) for a in node.all_input_nodes]
        flat = [l for x in ins for l in (x if isinstance(x, list) else [x]) if isinstance(l, ChannelLayout)]
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
            self.L[node] = ChannelLayout(np.full((1,) * len(shp), self.reason_code(r, frozenset(srcs)), dtype=np.int64))
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
            if any(isinstance(l, ChannelLayout) and l.tracked for a in node.all_input_nodes
                   for l in (self.L.get(a) if isinstance(self.L.get(a), list) else [self.L.get(a)])):
                key = op_label(node)
                self.res.unmodelled[key] = self.res.unmodelled.get(key, 0) + 1
            self.opaque(node)
            return
        handler(node)

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
        self.L[node] = ChannelLayout(l.idx, l.attn) if l is not None else None
        if l is not None:
            self._alias(node, src)

    def _alias(self, node, src):
        if src in self.view_base:
            self.view_base[node] = self.view_base[src]

    def _reshape_to(self, node, l: ChannelLayout, in_shape, out_shape) -> ChannelLayout:
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
        return ChannelLayout(arr, l.attn)

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
        self.L[node] = ChannelLayout(np.swapaxes(idx, -1, -2) if nd >= 2 else idx, l.attn)

    def op_T(self, node):
        """``x.T`` on rank > 2: every dim reversed."""
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        self.L[node] = ChannelLayout(np.transpose(_broadcast_to_rank(l.idx, nd)), l.attn)

    def op_mT(self, node):
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        self.L[node] = ChannelLayout(np.swapaxes(_broadcast_to_rank(l.idx, nd), -1, -2), l.attn)

    def op_movedim(self, node):
        from ..linears import view_permutation

        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd = len(shape_of(src))
        perm = view_permutation(node, nd)
        if perm is None:
            raise _Unsupported("movedim with symbolic dims")
        self.L[node] = ChannelLayout(np.transpose(_broadcast_to_rank(l.idx, nd), perm), l.attn)

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
        self.L[node] = ChannelLayout(np.tile(idx, tile), l.attn)

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
            self.L[node] = ChannelLayout(np.take(idx, 0, axis=d), l.attn)
        elif isinstance(index, int):
            self.L[node] = ChannelLayout(np.take(idx, index, axis=d), l.attn)
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
        self.L[node] = [ChannelLayout(np.take(idx, 0 if idx.shape[d] == 1 else i, axis=d), l.attn) for i in range(n)]

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
            self.L[node] = ChannelLayout(idx, l.attn)
            return
        const = self.const_index(index)
        if const is None or const.ndim != 1:
            raise _Unsupported("channels selected by an index whose values are not known at compile time")
        self.L[node] = ChannelLayout(np.take(idx, const, axis=d), l.attn)

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
        self.L[node] = ChannelLayout(np.swapaxes(idx, d0, d1), l.attn)

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
        self.L[node] = ChannelLayout(np.transpose(idx, [d % nd for d in dims]), l.attn)

    def op_expand(self, node):
        """expand / expand_as / broadcast_to: broadcast dims carry no channel variation."""
        l = self.src_layout(node)
        if l is None:
            return
        nd_out = len(shape_of(node))
        idx = _broadcast_to_rank(l.idx, nd_out)
        self.L[node] = ChannelLayout(idx, l.attn)

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
            self.L[node] = ChannelLayout(idx, l.attn)
        else:
            self.L[node] = ChannelLayout(np.repeat(idx, reps, axis=dim % nd), l.attn)

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
        self.L[node] = ChannelLayout(_apply_index(l.idx, index, shp, self.const_index), l.attn)

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
        self.L[node] = ChannelLayout(idx, l.attn)

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
            self.L[node] = [ChannelLayout(idx, l.attn) for _ in sizes]
            return
        if any(s is None for s in sizes):
            raise _Unsupported("split of a channel dimension at sizes not known at compile time")
        outs = []
        start = 0
        for s in sizes:
            outs.append(ChannelLayout(np.take(idx, np.arange(start, start + s), axis=d), l.attn))
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
                self.L[node] = ChannelLayout(first, any(l.attn for l in lays if l is not None))
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
        self.L[node] = ChannelLayout(np.concatenate(arrs2, axis=d), any(l.attn for l in lays if l is not None))

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
        self.L[base] = ChannelLayout(arr, attn)

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
            self.L[dst] = ChannelLayout(_broadcast_to_rank(ls.idx, len(shape_of(dst))), ls.attn)
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

    def _row_scale(self, l: ChannelLayout, other) -> bool:
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
            self.L[node] = ChannelLayout(la.idx, la.attn)
            return
        if lb is not None and la is None and self._row_scale(lb, a):
            self.L[node] = ChannelLayout(lb.idx, lb.attn)
            return
        self._elementwise(node)

    def op_div(self, node):
        a, b = arg(node, 0, "input"), arg(node, 1, "other")
        la = self.lay(a)
        if la is not None and self.lay(b) is None and self._row_scale(la, b):
            self.L[node] = ChannelLayout(la.idx, la.attn)
            return
        self._elementwise(node)

    def op_neg(self, node):
        l = self.lay(node.args[0])
        self.L[node] = ChannelLayout(l.idx, l.attn) if l is not None else None

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
        self.L[node] = ChannelLayout(res)


def analyze(gm: torch.fx.GraphModule, linears: Sequence[LinearSite], example_inputs=None) -> LayoutResult:
    """Channel layouts of ``gm``. ``example_inputs`` (optional) give the values of index
    tensors that are graph inputs (buffers), so that channels selected by them are followed."""
    return _Analysis(gm, linears, example_inputs).run()
