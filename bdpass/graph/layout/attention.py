"""Attention events: where the channels of linears meet at a contraction.

At contractions over channels (``q @ k^T``, an einsum, ``baddbmm``, SDPA) the analysis
records which columns of which linears meet per head (:class:`QKEvent`); through
``probs @ v`` / SDPA the value layout continues (flagged as having passed attention,
:class:`AVEvent` per value head) until a linear consumes it (:class:`OEvent`: which input
rows of the output projection hold which value columns). Touched channels reaching a
contraction are recorded too, so that every head gets a verdict, and every attention that
:mod:`bdpass.graph.contractions` finds without an event is listed in ``unmatched``
(:class:`Unmatched`) with the reason.

:class:`_AttentionOps` holds these handlers; it is mixed into the driver's
:class:`~.driver._Analysis`, whose state (``L``, ``res``) and helpers (``lay``,
``escape``, ``opaque``) they use.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx

from ..._compat import size_hint
from ..linears import LinearSite, einsum_labels, einsum_operands
from ..ops import arg, canonical, shape_of
from .algebra import (UNTRACKED, ChannelLayout, _broadcast_to_rank, _collapse, _group, _hints, _np_ops,
                      _Unsupported)


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
    """An attention contraction (found by :mod:`bdpass.graph.contractions`) without a QK/AV event:
    why the analysis could not pair its channels."""
    kind: str                # "bd_qk" (score contraction) | "bd_vo" (value contraction)
    node: torch.fx.Node
    reason: str
    sources: frozenset       # linears whose channels reach the contraction


class _AttentionOps:
    """Handlers of contractions and of the linears that consume attention outputs."""

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
            self.L[node] = ChannelLayout(out, True)

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
            self.L[node] = ChannelLayout(np.transpose(arrs[0], [labels[0].index(c) for c in out]), lays[0].attn)
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
        self.L[node] = ChannelLayout(np.transpose(res, [cur.index(c) for c in out]), True)

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
                self.escape(ChannelLayout(arr), "contracted with an untracked tensor (e.g. a cached key)")
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
        self.L[node] = ChannelLayout(iv, True)


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
