"""Linear layers as the analyses see them, whatever their spelling.

A *linear site* computes ``y = x @ W (+ b)`` over the last dimension of ``x``, with ``W``
a ``(d_in, d_out)`` view of a weight placeholder (``nn.Linear``'s ``(d_out, d_in)``
weight transposed, or a ``Conv1D``-style ``(d_in, d_out)`` weight) and ``b`` an optional
1-D weight of size ``d_out``. Recognised spellings: ``F.linear``/``nn.Linear``,
``matmul``/``@``/``mm`` with a weight under any views (``.T``, ``.mT``, ``.t()``,
``transpose``/``permute``/``movedim``, ``view``/``reshape``, ``detach``, a cast to its own
dtype), ``addmm(b, x, W)``, a bias added afterwards (``x @ W + b``), and two-operand
``einsum`` with one weight operand whose other labels all stay in the output
(``"btd,ed->bte"``, ``"btd,dhe->bhte"``, ``"bhte,hed->btd"``).

An einsum contracting several dims of ``x``, or writing the output columns over several
dims or not last, is the same linear between two reshapes, described by tensor-method
calls ``(name, args)``: ``prologue`` takes ``input`` to the ``(..., d_in)`` matrix the
linear multiplies, ``epilogue`` takes its ``(..., d_out)`` result (bias included) to the
value of ``output``. ``W`` is then ``weight_ops`` applied to the weight tensor. A rewrite
that replaces a site computes ``x = prologue(input)``, its own ``(..., d_out)`` product,
and ``epilogue`` of that (:func:`apply_ops` on tensors; the same calls as graph nodes).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from .._compat import size_hint
from .ops import arg, canonical, dtype_of, shape_of
from .params import ParamInfo

Ops = tuple  # tuple[tuple[str, tuple], ...]: tensor-method calls (name, args)


def apply_ops(t: Any, ops: Ops) -> Any:
    """Apply tensor-method calls ``(name, args)`` (permute, reshape, flatten, unflatten)."""
    for name, a in ops:
        t = getattr(t, name)(*a)
    return t


def common_module_path(paths: Sequence[str]) -> str:
    """The longest dotted prefix shared by the module paths (``""`` if none, or none given)."""
    parts = [p.split(".") for p in paths if p]
    out: list[str] = []
    for toks in zip(*parts):
        if len(set(toks)) != 1:
            break
        out.append(toks[0])
    return ".".join(out)


@dataclass
class LinearSite:
    core: torch.fx.Node
    output: torch.fx.Node            # core, or the node that adds the bias
    input: torch.fx.Node
    weight: ParamInfo
    weight_is_out_in: bool           # True: the tensor is (d_out, d_in) and W = tensor.T
    bias: ParamInfo | None
    d_in: int
    d_out: int
    bias_node: torch.fx.Node | None = None   # the separate add node, if any
    extra_nodes: list = field(default_factory=list)
    weight_ops: Ops = ()             # when set, W = apply_ops(tensor, weight_ops) (overrides weight_is_out_in)
    prologue: Ops = ()               # input -> (..., d_in)
    epilogue: Ops = ()               # (..., d_out) -> output

    @property
    def module_path(self) -> str:
        return self.weight.module_path

    @property
    def reshaped(self) -> bool:
        """True if the site multiplies a reshaped input or reshapes its result (an einsum
        over several dims): a rewrite must apply ``prologue``/``epilogue``."""
        return bool(self.prologue or self.epilogue)

    def weight_matrix(self, args: Sequence[torch.Tensor]) -> torch.Tensor:
        """``W`` as ``(d_in, d_out)`` from the runtime arguments of the graph."""
        t = args[self.weight.index]
        if self.weight_ops:
            return apply_ops(t, self.weight_ops)
        return t.t() if self.weight_is_out_in else t

    def bias_vector(self, args: Sequence[torch.Tensor]) -> torch.Tensor | None:
        return None if self.bias is None else args[self.bias.index]

    @property
    def tokens(self) -> int:
        """Rows the site processes for the example inputs (elements of the input over d_in)."""
        shp = shape_of(self.input) or ()
        n = 1
        for d in shp:
            h = size_hint(d)
            n *= h if h is not None else 1
        return max(n // max(self.d_in, 1), 1) if shp else 1

    @property
    def param_count(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias is not None else 0)


# ---------------------------------------------------------------------------- weight views
_PERMUTING = {"t", "T", "mT", "transpose", "permute", "movedim"}
_RESHAPING = {"reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as"}
_NOOP = {"detach", "alias", "contiguous", "clone"}
_CASTS = {"to", "cast", "type_as"}


def view_permutation(node: torch.fx.Node, rank: int) -> tuple[int, ...] | None:
    """The dims permutation a permuting view node applies to its rank-``rank`` input."""
    name = canonical(node)
    dims = list(range(rank))
    if name == "t":
        return tuple(dims[::-1]) if rank == 2 else tuple(dims)
    if name == "T":
        return tuple(dims[::-1])
    if name == "mT":
        if rank < 2:
            return None
        dims[-1], dims[-2] = dims[-2], dims[-1]
        return tuple(dims)
    if name == "transpose":
        d0, d1 = arg(node, 1, "dim0"), arg(node, 2, "dim1")
        if not (isinstance(d0, int) and isinstance(d1, int)):
            return None
        d0, d1 = d0 % rank, d1 % rank
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return tuple(dims)
    if name == "permute":
        p = list(node.args[1:]) if len(node.args) > 2 else arg(node, 1, "dims")
        if p is None:
            return None
        if len(p) == 1 and isinstance(p[0], (list, tuple)):
            p = list(p[0])
        if len(p) != rank or not all(isinstance(d, int) for d in p):
            return None
        return tuple(d % rank for d in p)
    if name == "movedim":
        src, dst = arg(node, 1, "source"), arg(node, 2, "destination")
        src = [src] if isinstance(src, int) else list(src or [])
        dst = [dst] if isinstance(dst, int) else list(dst or [])
        if len(src) != len(dst) or not all(isinstance(d, int) for d in src + dst):
            return None
        src, dst = [d % rank for d in src], [d % rank for d in dst]
        order = [d for d in range(rank) if d not in src]
        for d, s_ in sorted(zip(dst, src)):
            order.insert(d, s_)
        return tuple(order)
    return None


def _simplify(ops: Ops, shape: tuple[int, ...]) -> Ops:
    """Compose adjacent permutes and reshapes, drop identities."""
    out: list = []
    cur = tuple(shape)
    for name, a in ops:
        if name == "permute":
            perm = tuple(a[0])
            new = tuple(cur[d] for d in perm)
            if out and out[-1][0] == "permute":
                prev = out.pop()[1][0]
                perm = tuple(prev[d] for d in perm)
            if perm != tuple(range(len(perm))):
                out.append(("permute", (perm,)))
            cur = new
        elif name == "reshape":
            new = tuple(a[0])
            if out and out[-1][0] == "reshape":
                out.pop()
            out.append(("reshape", (new,)))
            cur = new
        else:
            out.append((name, a))
    # a trailing reshape to the shape before it is a no-op
    res, cur = [], tuple(shape)
    for name, a in out:
        if name == "reshape" and tuple(a[0]) == cur:
            continue
        res.append((name, a))
        cur = tuple(a[0]) if name == "reshape" else tuple(cur[d] for d in a[0])
    return tuple(res)


def _weight_expr(node, params: dict) -> tuple[ParamInfo, Ops, tuple[int, ...]] | None:
    """``(param, ops, shape)`` if ``node`` is a weight placeholder under views only:
    ``node``'s value is ``apply_ops(param, ops)``, of static ``shape``."""
    if not isinstance(node, torch.fx.Node):
        return None
    chain: list[torch.fx.Node] = []
    n = node
    while n not in params:
        if n.op not in ("call_function", "call_method") or not n.args or not isinstance(n.args[0], torch.fx.Node):
            return None
        name = canonical(n)
        if name in _CASTS:
            extra = [a for a in list(n.args[1:]) + list(n.kwargs.values()) if isinstance(a, torch.fx.Node)]
            if (name != "type_as" and extra) or dtype_of(n) is None or dtype_of(n) != dtype_of(n.args[0]):
                return None
        elif name not in _PERMUTING | _RESHAPING | _NOOP:
            return None
        chain.append(n)
        n = n.args[0]
        if len(chain) > 32:
            return None
    p = params[n]
    shape = tuple(int(s) for s in p.tensor.shape)
    ops: list = []
    cur = shape
    for m in reversed(chain):
        name = canonical(m)
        if name in _PERMUTING:
            perm = view_permutation(m, len(cur))
            if perm is None:
                return None
            ops.append(("permute", (perm,)))
            cur = tuple(cur[d] for d in perm)
        elif name in _RESHAPING:
            out = shape_of(m)
            hints = [size_hint(d) for d in out] if out is not None else [None]
            if out is None or None in hints or math.prod(hints) != math.prod(cur):
                return None
            ops.append(("reshape", (tuple(hints),)))
            cur = tuple(hints)
    return p, _simplify(tuple(ops), shape), cur


def _as_matrix(p: ParamInfo, ops: Ops, transposed_use: bool) -> tuple[bool, Ops, int, int] | None:
    """``(weight_is_out_in, weight_ops, d_in, d_out)`` for a 2-D operand ``apply_ops(p, ops)``
    used as ``W`` (or as ``W.T`` when ``transposed_use``, as ``F.linear`` does)."""
    shape = tuple(int(s) for s in p.tensor.shape)
    full = tuple(ops) + ((("permute", ((1, 0),)),) if transposed_use else ())
    full = _simplify(full, shape)
    if full == () and len(shape) == 2:
        return False, (), shape[0], shape[1]
    if full == (("permute", ((1, 0),)),) and len(shape) == 2:
        return True, (), shape[1], shape[0]
    final = _final_shape(shape, full)
    if len(final) != 2:
        return None
    return False, full, final[0], final[1]


def _final_shape(shape, ops: Ops) -> tuple[int, ...]:
    cur = tuple(shape)
    for name, a in ops:
        cur = tuple(a[0]) if name == "reshape" else tuple(cur[d] for d in a[0])
    return cur


def _bias_param(node, params: dict, d_out: int) -> ParamInfo | None:
    if isinstance(node, torch.fx.Node) and node in params:
        p = params[node]
        if p.tensor.dim() == 1 and p.tensor.shape[0] == d_out:
            return p
    return None


def _is_one(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and v == 1)


def match_linear(node: torch.fx.Node, params: dict) -> LinearSite | None:
    """The linear site whose core op is ``node``, or None."""
    name = canonical(node)
    bias = None
    if name == "einsum":
        return _match_einsum(node, params)
    if name == "linear":
        x, w, b = arg(node, 0, "input"), arg(node, 1, "weight"), arg(node, 2, "bias")
        transposed_use = True           # F.linear computes x @ w.T
    elif name == "matmul":
        x, w, b = arg(node, 0, "input"), arg(node, 1, "other"), None
        transposed_use = False
    elif name == "addmm":
        b, x, w = arg(node, 0, "input"), arg(node, 1, "mat1"), arg(node, 2, "mat2")
        if not (_is_one(node.kwargs.get("beta")) and _is_one(node.kwargs.get("alpha"))):
            return None
        if b is None:
            return None
        transposed_use = False
    else:
        return None
    we = _weight_expr(w, params)
    if we is None:
        return None
    p, ops, shape = we
    if len(shape) != 2:
        return None
    m = _as_matrix(p, ops, transposed_use)
    if m is None:
        return None
    out_in, wops, d_in, d_out = m
    if b is not None:
        bias = _bias_param(b, params, d_out)
        if bias is None:
            return None
    xs = shape_of(x)
    if xs is None or not xs or size_hint(xs[-1]) != d_in:
        return None
    site = LinearSite(core=node, output=node, input=x, weight=p, weight_is_out_in=out_in,
                      bias=bias, d_in=int(d_in), d_out=int(d_out), weight_ops=wops)
    if bias is None:
        _absorb_bias_add(site, params)
    return site


def einsum_operands(node: torch.fx.Node) -> tuple[str, list] | None:
    """(equation without spaces, operand list) of an einsum node."""
    eq = arg(node, 0, "equation")
    ops = list(node.args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or not ops:
        return None
    return eq.replace(" ", ""), ops


def einsum_labels(eq: str, ranks: Sequence[int]) -> tuple[list[str], str] | None:
    """Explicit labels of an einsum equation: (one label string per operand, output labels),
    with ``...`` expanded to fresh letters (operands of the given ranks). None if malformed."""
    lhs, arrow, out = eq.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(ranks):
        return None
    used = set(eq)
    fresh = [c for c in string.ascii_letters if c not in used]
    n_ell = 0
    for lab, r in zip(ins, ranks):
        if "..." in lab:
            n_ell = max(n_ell, r - (len(lab) - 3))
    ell = "".join(fresh[:n_ell])
    res = []
    for lab, r in zip(ins, ranks):
        if "..." in lab:
            k = r - (len(lab) - 3)
            lab = lab.replace("...", ell[n_ell - k:] if k else "")
        if len(lab) != r or not all(c.isalpha() for c in lab):
            return None
        res.append(lab)
    if arrow:
        out = out.replace("...", ell)
    else:
        counts = {c: sum(l.count(c) for l in res) for c in set("".join(res))}
        out = ell + "".join(sorted(c for c, k in counts.items() if k == 1 and c not in ell))
    if not all(c.isalpha() for c in out):
        return None
    return res, out


def _match_einsum(node: torch.fx.Node, params: dict) -> LinearSite | None:
    parsed = einsum_operands(node)
    if parsed is None:
        return None
    eq, operands = parsed
    if len(operands) != 2:
        return None
    wes = [_weight_expr(o, params) for o in operands]
    if (wes[0] is None) == (wes[1] is None):
        return None
    wi = 0 if wes[0] is not None else 1
    x = operands[1 - wi]
    xs = shape_of(x)
    p, wops, wshape = wes[wi]
    if xs is None:
        return None
    ranks = [len(xs), len(wshape)] if wi == 1 else [len(wshape), len(xs)]
    lab = einsum_labels(eq, ranks)
    if lab is None:
        return None
    labels, out = lab
    wl, xl = labels[wi], labels[1 - wi]
    if any(len(set(l)) != len(l) for l in (wl, xl, out)):
        return None
    C = [c for c in xl if c in wl]
    if not C or any(c in out for c in C):
        return None                     # nothing contracted, or a dim shared with the weight (per-head weights)
    X = [c for c in xl if c not in C]
    O = [c for c in out if c in wl]
    if set(out) != set(X) | set(O) or len(out) != len(X) + len(O) or not O or set(wl) != set(C) | set(O):
        return None
    wsize = {c: int(wshape[wl.index(c)]) for c in wl}
    if any(size_hint(xs[xl.index(c)]) != wsize[c] for c in C):
        return None
    d_in, d_out = math.prod(wsize[c] for c in C), math.prod(wsize[c] for c in O)
    full = tuple(wops) + (("permute", (tuple(wl.index(c) for c in C + O),)),) + (("reshape", ((d_in, d_out),)),)
    shape = tuple(int(s) for s in p.tensor.shape)
    full = _simplify(full, shape)
    if full == () and len(shape) == 2:
        out_in, weight_ops = False, ()
    elif full == (("permute", ((1, 0),)),) and len(shape) == 2:
        out_in, weight_ops = True, ()
    else:
        out_in, weight_ops = False, full
    prologue: list = []
    xperm = tuple(xl.index(c) for c in X + C)
    if xperm != tuple(range(len(xl))):
        prologue.append(("permute", (xperm,)))
    if len(C) > 1:
        prologue.append(("flatten", (len(X), len(X) + len(C) - 1)))
    epilogue: list = []
    if len(O) > 1:
        epilogue.append(("unflatten", (len(X), tuple(wsize[c] for c in O))))
    cur = X + O
    if cur != list(out):
        epilogue.append(("permute", (tuple(cur.index(c) for c in out),)))
    site = LinearSite(core=node, output=node, input=x, weight=p, weight_is_out_in=out_in, bias=None,
                      d_in=int(d_in), d_out=int(d_out), weight_ops=weight_ops, prologue=tuple(prologue),
                      epilogue=tuple(epilogue))
    if not site.epilogue:
        _absorb_bias_add(site, params)
    return site


def _absorb_bias_add(site: LinearSite, params: dict) -> None:
    """Fold ``y + b`` (b a 1-D weight of size d_out) following the core into the site."""
    users = list(site.core.users)
    if len(users) != 1:
        return
    u = users[0]
    if canonical(u) != "add" or u.kwargs.get("alpha") is not None or len(u.args) != 2:
        return
    other = u.args[1] if u.args[0] is site.core else u.args[0]
    b = _bias_param(other, params, site.d_out)
    if b is None or shape_of(u) != shape_of(site.core):
        return
    site.bias, site.bias_node, site.output = b, u, u


def find_linears(gm: torch.fx.GraphModule, params: dict) -> list[LinearSite]:
    sites = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            s = match_linear(node, params)
            if s is not None:
                sites.append(s)
    return sites
