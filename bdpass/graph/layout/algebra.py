"""The index algebra of channel layouts: the codes and what ops do to layout arrays.

A value's layout (:class:`ChannelLayout`) is a small int64 array ``idx`` with the value's rank:
size 1 on dimensions along which the channel assignment does not vary (batch, positions:
"free" dims, possibly symbolic), full size on channel dimensions (static). Entry codes::

    >= 0   tracked: (source << 32) | column of that linear's output
    -1     untracked (not from any linear: a cache, an embedding, a constant)
    <= -2  touched: derived from tracked channels by an op that does not commute with a
           change of basis (RoPE, a norm, a nonlinearity); -2 - k indexes ``reasons``
           (and ``reason_sources``: the linears the touched channels came from)

The numpy helpers here move layout arrays along with the values they describe:
broadcasting to a rank, collapsing dims along which nothing varies, grouping dims for a
contraction, pairing the dims of a view, indexing (basic and constant advanced indices),
and a linear site's prologue/epilogue reshapes. What they cannot follow raises
:class:`_Unsupported`, which the driver turns into an opaque use.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx

from ..._compat import example_value, is_fake as _compat_is_fake, size_hint
from ..ops import canonical

SHIFT = 32
COLMASK = (1 << SHIFT) - 1
UNTRACKED = -1


@dataclass
class ChannelLayout:
    idx: np.ndarray
    attn: bool = False          # passed through an attention-probabilities contraction

    @property
    def tracked(self) -> bool:
        return bool((self.idx >= 0).any())

    @property
    def marked(self) -> bool:
        return bool((self.idx != UNTRACKED).any())


def decode(code: int) -> tuple[int, int]:
    return int(code) >> SHIFT, int(code) & COLMASK


def _hints(shape) -> list[int | None]:
    return [size_hint(s) for s in shape]


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
