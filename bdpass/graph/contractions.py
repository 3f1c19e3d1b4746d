"""The contractions a report must account for, found from the graph alone.

It finds them without the channel-layout analysis (:mod:`.layout`) and without the
linear-site matcher (:mod:`.linears`), from op names and data flow alone, and it is the
yardstick against which "every attention and every linear-of-linear got a verdict" is
checked (``tests/verdict_yardstick.py``, used by ``tests/test_verdicts.py`` and the
architecture sweep). It is not independent of the
verdicts in one respect: :mod:`.layout` takes :func:`find_attention`'s list to give each
attention a QK and an AV verdict (or an "unmatched" one), so an attention that this module
does not recognise is missed by both, silently. What narrows that gap is the spelling
coverage test (``tests/test_spelling_coverage.py``: every op that reaches a tracked channel
is modelled); the sweep's ``verdicts_extra`` catches only the other direction (a verdict on
a contraction this module does not count).

* An *attention* is a score contraction and its value contraction: an SDPA call (both in
  one node), or a ``matmul``/``bmm``/``einsum`` whose result reaches a softmax through
  score arithmetic (scaling, masks, casts, dropout, soft-capping, views, a concatenation
  with extra logits such as attention sinks) and whose probabilities, through casts,
  dropout, views and slices (the sinks' columns dropped), are an operand of a second
  contraction.
* A *linear-of-linear* is a contraction with a weight (a parameter or buffer under views
  only) whose activation operand is, through data-movement ops only, the output (bias
  included) of another contraction with a weight.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F

from .ops import view_attribute

_CONTRACTIONS = {torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, torch.Tensor.matmul,
                 torch.Tensor.bmm, torch.Tensor.mm, torch.baddbmm, torch.Tensor.baddbmm}
_CONTRACTION_METHODS = {"matmul", "bmm", "mm", "__matmul__", "baddbmm"}
_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_LINEARS = {F.linear, torch._C._nn.linear, torch.addmm, torch.Tensor.addmm}

# op names (function __name__ or method name) that carry scores to the softmax
_SCORE_OPS = {"add", "iadd", "add_", "sub", "isub", "sub_", "mul", "imul", "mul_", "truediv", "itruediv", "div",
              "div_", "neg", "masked_fill", "masked_fill_", "where", "to", "type", "float", "half", "bfloat16", "double",
              "type_as", "contiguous", "clone", "detach", "dropout", "view", "reshape", "tanh", "clamp",
              "clamp_min", "clamp_max", "expand", "expand_as", "cat", "concat", "concatenate"}
# op names that carry probabilities from the softmax to the value contraction
_PROB_OPS = {"to", "type", "float", "half", "bfloat16", "double", "type_as", "contiguous", "clone", "detach", "dropout",
             "view", "reshape", "mul", "imul", "mul_", "masked_fill", "masked_fill_", "where", "expand",
             "expand_as", "transpose", "permute", "unsqueeze", "squeeze", "flatten", "unflatten", "getitem",
             "narrow"}
# data-movement ops between two weight contractions
_MOVE_OPS = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
             "swapaxes", "swapdims", "movedim", "moveaxis", "contiguous", "clone", "detach", "alias", "expand",
             "expand_as", "broadcast_to", "narrow", "getitem", "select", "split", "chunk", "unbind", "to",
             "float", "half", "bfloat16", "double", "type", "type_as", "dropout", "view_as", "reshape_as", "repeat",
             "repeat_interleave", "index_select", "T", "mT"}
_WEIGHT_VIEW_OPS = {"t", "T", "mT", "transpose", "permute", "movedim", "moveaxis", "swapaxes", "swapdims",
                    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous", "clone",
                    "detach", "alias", "to", "float", "half", "bfloat16", "double", "type_as"}


@dataclass(frozen=True)
class Attention:
    score: torch.fx.Node     # where q meets k
    value: torch.fx.Node     # where the probabilities meet v (the same node for SDPA)


def op_name(node: torch.fx.Node) -> str:
    attr = view_attribute(node)         # x.T / x.mT: getattr or aten.numpy_T / aten.mT by release
    if attr is not None:
        return {"H": "T", "mH": "mT"}.get(attr, attr)
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return ""


def _is_contraction(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        try:
            return node.target in _CONTRACTIONS
        except TypeError:
            return False
    return node.op == "call_method" and node.target in _CONTRACTION_METHODS


def _is_sdpa(node: torch.fx.Node) -> bool:
    try:
        return node.op == "call_function" and node.target in _SDPA
    except TypeError:
        return False


def _is_softmax(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and op_name(node) in ("softmax", "_softmax")


def _forward(start: torch.fx.Node, through: set[str], stop, limit: int = 24) -> list[torch.fx.Node]:
    """Nodes satisfying ``stop`` reached from ``start``'s users through ops in ``through``."""
    found, seen, frontier = [], {start}, [start]
    for _ in range(limit):
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in seen:
                    continue
                seen.add(u)
                if stop(u):
                    found.append((n, u))
                elif u.op in ("call_function", "call_method") and op_name(u) in through:
                    nxt.append(u)
        frontier = nxt
        if not frontier:
            break
    return found


def find_attention(gm: torch.fx.GraphModule) -> list[Attention]:
    """Every attention of the graph, in graph order of the score contraction."""
    out: list[Attention] = []
    for node in gm.graph.nodes:
        if _is_sdpa(node):
            out.append(Attention(node, node))
            continue
        if not _is_contraction(node):
            continue
        values = []
        for _, sm in _forward(node, _SCORE_OPS, _is_softmax):
            for prev, c in _forward(sm, _PROB_OPS, _is_contraction):
                if c is not node:
                    values.append(c)
        if values:
            out.append(Attention(node, values[0]))
    return out


# ---------------------------------------------------------------------------- linear-of-linear
def _weight_operand(x, weights: set) -> bool:
    n = x
    for _ in range(16):
        if not isinstance(n, torch.fx.Node):
            return False
        if n in weights:
            return True
        if n.op not in ("call_function", "call_method") or op_name(n) not in _WEIGHT_VIEW_OPS or not n.args:
            return False
        n = n.args[0]
    return False


def weight_contractions(gm: torch.fx.GraphModule, weights: set) -> dict[torch.fx.Node, torch.fx.Node]:
    """{contraction with a weight: its activation operand}."""
    out = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        is_lin = False
        try:
            is_lin = node.op == "call_function" and node.target in _LINEARS
        except TypeError:
            pass
        if is_lin:
            name = op_name(node)
            if name == "addmm":
                x, w = (node.args[1] if len(node.args) > 1 else None), (node.args[2] if len(node.args) > 2 else None)
            else:
                x, w = node.args[0], (node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
            if _weight_operand(w, weights) and isinstance(x, torch.fx.Node) and not _weight_operand(x, weights):
                out[node] = x
            continue
        if not _is_contraction(node):
            continue
        ops = list(node.args[1:]) if op_name(node) == "einsum" else list(node.args[:2])
        if op_name(node) == "einsum" and len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        if len(ops) != 2:
            continue
        w_side = [_weight_operand(o, weights) for o in ops]
        if w_side.count(True) != 1 or not isinstance(ops[w_side.index(False)], torch.fx.Node):
            continue
        if op_name(node) == "einsum":
            if _batched_einsum(node.args[0], w_side.index(True)):
                continue                 # a dim shared by input, weight and output: per-head weights
        elif not w_side[1] or _rank(ops[1]) != 2:
            continue                     # W @ x, or a batched (3-D) weight: not a linear layer
        out[node] = ops[w_side.index(False)]
    return out


def _rank(node) -> int | None:
    v = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, torch.fx.Node) else None
    return v.dim() if isinstance(v, torch.Tensor) else None


def _batched_einsum(eq, w_index: int) -> bool:
    if not isinstance(eq, str) or "->" not in eq:
        return False
    lhs, out = eq.replace(" ", "").split("->")
    ins = lhs.split(",")
    if len(ins) != 2:
        return True
    w, x = set(ins[w_index]) - {"."}, set(ins[1 - w_index]) - {"."}
    return bool(w & x & set(out))


def _bias_add_of(node: torch.fx.Node, weights: set) -> torch.fx.Node | None:
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    if op_name(u) in ("add", "iadd", "add_") and len(u.args) == 2:
        other = u.args[1] if u.args[0] is node else u.args[0]
        if isinstance(other, torch.fx.Node) and other in weights:
            return u
    return None


def find_linear_chains(gm: torch.fx.GraphModule, weights: set) -> list[tuple[torch.fx.Node, torch.fx.Node]]:
    """(first, second) contraction nodes of every linear-of-linear, in graph order."""
    contr = weight_contractions(gm, weights)
    ends: dict[torch.fx.Node, torch.fx.Node] = {}
    for c in contr:
        ends[c] = c
        b = _bias_add_of(c, weights)
        if b is not None:
            ends[b] = c
    out = []
    for second, x in contr.items():
        n = x
        for _ in range(32):
            if not isinstance(n, torch.fx.Node):
                break
            if n in ends:
                out.append((ends[n], second))
                break
            if n.op not in ("call_function", "call_method") or op_name(n) not in _MOVE_OPS or not n.args:
                break
            n = n.args[0]
    return out


def weight_nodes(gm: torch.fx.GraphModule, example_inputs) -> set:
    """Placeholders holding parameters or buffers."""
    from .params import find_params

    return set(find_params(gm, example_inputs))
