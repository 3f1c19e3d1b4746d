"""Forward data-flow analysis of channel layouts.

Every linear site's output columns are *tracked*: each value gets a layout
(:class:`ChannelLayout`; its codes, tracked, untracked and touched, are described in
:mod:`.algebra`) that says which column of which linear each of its channels holds.

Layouts propagate through ops that only move channels (views, ``unflatten``, permutes,
``.T``/``.mT``, ``movedim``, splits, ``unbind``, slices, ``narrow``, ``select``, indexing by
constant lists or tensors, ``index_select``, cat, expand/``broadcast_to``/repeat for GQA,
slice-assignment, ``detach``/``alias``, casts, scalar or per-row scaling). At contractions
over channels (``q @ k^T``, an einsum, ``baddbmm``, SDPA) the analysis records which
columns of which linears meet per head (:class:`QKEvent`); through ``probs @ v`` / SDPA
the value layout continues (flagged as having passed attention) until a linear consumes
it (:class:`OEvent`: which input rows of the output projection hold which value
columns). Touched channels reaching a contraction are recorded too, so that every head
gets a verdict, and every attention that :mod:`bdpass.graph.contractions` finds without an
event is listed in ``unmatched`` with the reason. Any other use of tracked columns — a
graph output (KV cache), an unmodelled op, a concatenation along positions — is an
*escape*, recorded per column with its reason: rewriting an escaped column would change
what the graph computes.

The package, one job per module:

* :mod:`.algebra`: the layout codes (:data:`SHIFT`, :data:`UNTRACKED`, :func:`decode`),
  :class:`ChannelLayout`, and the numpy helpers that move layout arrays along with their
  values (broadcasting, views, indexing, a site's reshapes);
* :mod:`.driver`: the analysis itself (:func:`analyze`, :class:`LayoutResult`): the node
  visitor, escapes and touched reasons, and the handlers of movement, slice-assignment and
  elementwise ops;
* :mod:`.attention`: the contractions and the events they record (:class:`QKEvent`,
  :class:`AVEvent`, :class:`OEvent`, :class:`Unmatched`);
* :mod:`.collectives`: communication between ranks (functional collectives, ``c10d``,
  DTensor placement changes): what each collective node is (:func:`collective`), its local
  stand-in for checks (:func:`collective_stand_in`), and what it does to layouts.
"""
from __future__ import annotations

from .algebra import COLMASK, SHIFT, UNTRACKED, ChannelLayout, decode
from .attention import AVEvent, OEvent, QKEvent, Unmatched
from .collectives import DTENSOR_ADVICE, Collective, collective, collective_stand_in
from .driver import LayoutResult, analyze

__all__ = [
    "AVEvent", "COLMASK", "ChannelLayout", "Collective", "DTENSOR_ADVICE", "LayoutResult", "OEvent", "QKEvent",
    "SHIFT", "UNTRACKED", "Unmatched", "analyze", "collective", "collective_stand_in", "decode",
]
