"""Formatting shared by the renderers: node names as module paths, one node as a line of
code (plain text or HTML), errors, decibels and byte counts."""
from __future__ import annotations

import html as _html
import math
import re

from ..report import NodeRecord

_MANGLED = re.compile(r"\bl_self_[A-Za-z0-9_]+")


def short_name(name: str) -> str:
    """Dynamo's mangled parameter names as module paths:
    ``l_self_modules_h_modules_0_modules_attn_parameters_weight_`` -> ``h.0.attn.weight``."""
    def one(m: re.Match) -> str:
        s = m.group(0)[len("l_self_"):]
        s = re.sub(r"(^|_)(modules|parameters|buffers)_", ".", s)
        return s.strip("._") or m.group(0)
    return _MANGLED.sub(one, name)


def escape(s: object) -> str:
    """``s`` as HTML text (quotes escaped too: safe in attribute values)."""
    return _html.escape(str(s), quote=True)


def node_text(rec: NodeRecord | None, html: bool = False) -> str:
    """One node as a line of code, names shortened (:func:`short_name`): ``name = target(args)``,
    ``name: input [shape]``, ``name = attribute``, ``return args``.

    ``html``: escaped, the name in ``<span class="name">`` (titled with the full name), the
    operation in ``<span class="op">``, and the shape with the dtype in ``<span class="shape">``,
    also after a call."""
    if rec is None:
        return ""
    if html:
        esc = escape
        name = f'<span class="name" title="{esc(rec.name)}">{esc(short_name(rec.name))}</span>'
        shape = f' <span class="shape">{esc(list(rec.shape))} {esc(rec.dtype or "")}</span>' \
            if rec.shape is not None else ""
        call_shape = shape

        def op(s: str) -> str:
            return f'<span class="op">{s}</span>'
    else:
        esc = str
        name = short_name(rec.name)
        shape = f" {list(rec.shape)}" if rec.shape is not None else ""
        call_shape = ""

        def op(s: str) -> str:
            return s
    if rec.op == "placeholder":
        return f"{name}: {op('input')}{shape}"
    if rec.op == "output":
        return f"{op('return')} {esc(short_name(rec.args))}"
    if rec.op == "get_attr":
        return f"{name} = {op(esc(short_name(rec.target)))}"
    method = "." if rec.op == "call_method" else ""
    return f"{name} = {op(method + esc(rec.target))}({esc(short_name(rec.args))}){call_shape}"


def fmt_err(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def fmt_db(x: float | None) -> str:
    if x is None:
        return "-"
    if x != x:
        return "nan"
    if math.isinf(x):
        return "exact" if x > 0 else "-inf"
    return f"{x:.1f}"


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return str(n)
