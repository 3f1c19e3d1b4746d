"""The block layout of a source's ``bdpass::bd_linear`` call: its pivot tables (the rows
``S_t`` each table selects and the rest rows), and its blocks (which output columns each
block writes, from which table, with which heads' weights), dense blocks for the
projection's columns that no BD head owns.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..graph.linears import LinearSite
from .bd_sources import SetFactors, Source


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

