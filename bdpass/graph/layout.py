"""Forward data-flow analysis of channel layouts.

Every linear site's output columns are *tracked*. A value's layout is a small int64
array with the value's rank: size 1 on dimensions along which the channel assignment
does not vary (batch, positions: "free" dims, possibly symbolic), full size on channel
dimensions (static). Entry codes::

    >= 0   tracked: (source << 32) | column of that linear's output
    -1     untracked (not from any linear: a cache, an embedding, a constant)
    <= -2  touched: derived from tracked channels by an op that does not commute with a
           change of basis (RoPE, a norm, a nonlinearity); -2 - k indexes ``reasons``

Layouts propagate through ops that only move channels (views, permutes, splits, slices,
cat, expand/repeat for GQA, slice-assignment, casts, scalar or per-row scaling). At
contractions over channels (``q @ k^T``, SDPA) the analysis records which columns of
which linears meet per head (:class:`QKEvent`); through ``probs @ v`` / SDPA the value
layout continues (flagged as having passed attention) until a linear consumes it
(:class:`OEvent`: which input rows of the output projection hold which value columns).
Any other use of tracked columns — a graph output (KV cache), an unmodelled op, a
concatenation along positions — is an *escape*, recorded per column with its reason:
rewriting an escaped column would change what the graph computes.
"""
from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx

from .._compat import example_value, size_hint
from .linears import LinearSite
from .ops import arg, canonical, shape_of

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
class LayoutResult:
    sources: list[LinearSite]
    qk: list[QKEvent] = field(default_factory=list)
    av: list[AVEvent] = field(default_factory=list)
    o: list[OEvent] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    escapes: dict[int, dict[int, str]] = field(default_factory=dict)   # source -> column -> reason

    def reason_of(self, code: int) -> str:
        return self.reasons[-2 - code] if code <= -2 else ("untracked" if code == -1 else "tracked")

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
    def __init__(self, gm: torch.fx.GraphModule, linears: Sequence[LinearSite]):
        self.gm = gm
        self.sites = list(linears)
        self.res = LayoutResult(sources=self.sites)
        self.L: dict[torch.fx.Node, Any] = {}          # node -> Layout | list[Layout|None] | None
        self.core_of = {s.core: i for i, s in enumerate(self.sites)}
        self.out_of = {s.output: i for i, s in enumerate(self.sites) if s.bias_node is not None}
        self._reason_ids: dict[str, int] = {}
        self.view_base: dict[torch.fx.Node, tuple[torch.fx.Node, Any]] = {}  # view node -> (base, index)

    # ------------------------------------------------------------------ helpers
    def reason_code(self, text: str) -> int:
        k = self._reason_ids.get(text)
        if k is None:
            k = len(self.res.reasons)
            self.res.reasons.append(text)
            self._reason_ids[text] = k
        return -2 - k

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
        code = self.reason_code(reason)
        idx = np.where(lay.idx >= 0, code, lay.idx)
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
        d = self.sites[site_index].d_out
        idx = (np.int64(site_index) << SHIFT) + np.arange(d, dtype=np.int64)
        return Layout(idx.reshape((1,) * (len(shp) - 1) + (d,)))

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
        return self.res

    def opaque(self, node: torch.fx.Node, reason: str | None = None) -> None:
        """Unmodelled use: tracked inputs escape; output is tainted if any input was marked."""
        ins = [self.L.get(a) for a in node.all_input_nodes]
        flat = [l for x in ins for l in (x if isinstance(x, list) else [x]) if isinstance(l, Layout)]
        marked = [l for l in flat if l.marked]
        if not marked:
            self.L[node] = None
            return
        r = reason or self.why_touch(node)
        for l in marked:
            self.escape(l, r)
        shp = shape_of(node)
        if shp is not None:
            self.L[node] = Layout(np.full((1,) * len(shp), self.reason_code(r), dtype=np.int64))
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
            self.opaque(node)
            return
        handler(node)

    # ------------------------------------------------------------------ linear consumption
    def consume_by_linear(self, site: LinearSite) -> None:
        l = self.lay(site.input)
        if l is None or not l.marked:
            return
        if not l.tracked:
            return
        shp = shape_of(site.input)
        idx = l.idx
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
        src = node.args[0]
        l = self.src_layout(node)
        if l is None:
            return
        nd_out = len(shape_of(node))
        idx = _broadcast_to_rank(l.idx, nd_out)
        self.L[node] = Layout(idx, l.attn)

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
        self.L[node] = Layout(_apply_index(l.idx, index, shp), l.attn)

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
        sizes = self._split_sizes(node, total, nd, d)
        idx = _broadcast_to_rank(l.idx, nd)
        outs = []
        start = 0
        for s in sizes:
            if idx.shape[d] == 1:
                outs.append(Layout(idx, l.attn))
            else:
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
                    self.escape(l, "concatenated along a non-channel dimension (e.g. a KV cache)")
            self.opaque(node, "concatenated along a non-channel dimension (e.g. a KV cache)")
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
        if varr is not None:
            region_shape = _index_result_shape(index, hints)
            if region_shape is None:
                raise _Unsupported("slice assignment with an unsupported index")
            # dims of the base that the value layout varies along
            vfull = _broadcast_to_rank(varr, len(region_shape))
            for k, s in enumerate(vfull.shape):
                if s != 1:
                    need[k] = hints[k]
            for k, s in enumerate(barr.shape):
                if s != 1:
                    need[k] = hints[k]
            # the sliced dims of the region must be materialized too
            for k, sl in enumerate(_expand_index(index, nd)):
                if isinstance(sl, slice) and sl != slice(None):
                    need[k] = hints[k]
        if any(n is None for n in need):
            raise _Unsupported("slice assignment over a symbolic dimension")
        arr = np.array(np.broadcast_to(barr, need))
        region_index = tuple(sl if (isinstance(sl, slice) and need[k] != 1) or isinstance(sl, int) else
                             slice(None) for k, sl in enumerate(_expand_index(index, nd)))
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
        code = self.reason_code(reason)
        res = np.full(out_shape, UNTRACKED, dtype=np.int64)
        for l, a in zip(ins, arrs):
            self.escape(l, reason)
            a = np.broadcast_to(a, out_shape)
            res = np.where(a >= 0, code, np.where((a <= -2) & (res == UNTRACKED), a, res))
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
        a_chan = ia is not None and ia.shape[-1] != 1 and (ia != UNTRACKED).any()
        b_chan_k = ib is not None and ib.shape[-2] != 1 and (ib != UNTRACKED).any()
        b_chan_n = ib is not None and ib.shape[-1] != 1
        if a_chan and b_chan_k:
            self._qk(node, ia, np.swapaxes(ib, -1, -2), nd)
            self.L[node] = None
            return
        a_tracked = ia is not None and (ia >= 0).any()
        b_tracked = ib is not None and (ib >= 0).any()
        if not a_tracked and not b_tracked:
            # Only touched channels meet here; they are never rewritten (they escaped where
            # they were touched), so the result does not depend on any rewrite. Keep the
            # event so that the report can say why this pair was not rewritten.
            if ia is not None and ib is not None and (ia != UNTRACKED).any() and (ib != UNTRACKED).any():
                try:
                    self._qk(node, ia, np.swapaxes(ib, -1, -2), nd)
                except _Unsupported:
                    pass
            self.L[node] = None
            return
        if not a_tracked and ib is not None and ib.shape[-2] == 1 and b_chan_n:
            # probs @ v: positions contracted, channels of v carried through
            self._av(node, ib)
            out = _broadcast_to_rank(ib, nd)
            self.L[node] = Layout(out, True)
            return
        self.opaque(node, "contracted with values that are not attention weights")

    def _pairs(self, q: np.ndarray, k: np.ndarray, nd: int) -> tuple[np.ndarray, np.ndarray]:
        """Broadcast batch dims and flatten to (pairs, E)."""
        q = _broadcast_to_rank(q, nd)
        k = _broadcast_to_rank(k, nd)
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
        if (qb != UNTRACKED).any() and (kb != UNTRACKED).any():
            self.res.qk.append(QKEvent(node, qb.copy(), kb.copy()))
        else:
            for arr in (qb, kb):
                self.escape(Layout(arr), "contracted with an untracked tensor (e.g. a cached key)")

    def _av(self, node, v):
        if v.shape[-2] != 1:
            raise _Unsupported("value layout varies along positions")
        rows = v.reshape(v.shape[:-2] + (v.shape[-1],)).reshape(-1, v.shape[-1])
        if (rows >= 0).any():
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


def _view_groups(ih: list[int], oh: list[int]):
    """Pair runs of input dims with runs of output dims of equal product."""
    groups = []
    i = o = 0
    ni, no = len(ih), len(oh)
    while i < ni or o < no:
        i0, o0 = i, o
        pi = pi_ = 1
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


def _apply_index(idx: np.ndarray, index, shape) -> np.ndarray:
    """Apply a basic index (ints, slices, None, Ellipsis) to a layout array."""
    nd = len(shape)
    idx = _broadcast_to_rank(idx, nd)
    if not isinstance(index, tuple):
        index = (index,)
    n_real = sum(1 for x in index if x is not None and x is not Ellipsis)
    items = []
    for x in index:
        if x is Ellipsis:
            items.extend([slice(None)] * (nd - n_real))
        else:
            items.append(x)
    out = []
    dim = 0
    for x in items:
        if x is None:
            out.append(None)
            continue
        if isinstance(x, torch.fx.Node) or (isinstance(x, slice) and any(
                isinstance(v, torch.fx.Node) for v in (x.start, x.stop, x.step))):
            if idx.shape[dim] != 1:
                raise _Unsupported("symbolic index on a channel dimension")
            out.append(slice(None))
            dim += 1
            continue
        if isinstance(x, int):
            out.append(x if idx.shape[dim] != 1 else 0)
            dim += 1
            continue
        if isinstance(x, slice):
            out.append(x if idx.shape[dim] != 1 else slice(None))
            dim += 1
            continue
        raise _Unsupported(f"advanced indexing ({type(x).__name__})")
    return idx[tuple(out)]


def analyze(gm: torch.fx.GraphModule, linears: Sequence[LinearSite]) -> LayoutResult:
    return _Analysis(gm, linears).run()
