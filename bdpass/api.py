"""User-facing helpers around the backend."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from .backend import _active_collectors, bd_backend
from .options import BDOptions
from .report import Report


@contextlib.contextmanager
def collect_reports(keep_graphs: bool = False) -> Iterator[Report]:
    """Collect the GraphReport of every graph the ``bd`` backend compiles inside the block.

    With ``keep_graphs=True`` each GraphReport also holds, in ``.graphs_kept`` (not
    serialized), ``(original GraphModule, rewritten GraphModule or None, example inputs,
    rewritten graph's example inputs or None)`` for tools that run both graphs."""
    report = Report()
    report.keep_graphs = keep_graphs
    stack = _active_collectors()
    stack.append(report)
    try:
        yield report
    finally:
        stack.remove(report)


def explain(model: Any, *args: Any, options: Any = None, **kwargs: Any) -> Report:
    """Compile ``model`` with the ``bd`` backend on these inputs (inference, no_grad) and
    return what was rewritten and what was skipped, per compiled graph.

    The model is run once; nothing about it is changed. Dynamo's caches are reset before and
    after (``torch._dynamo.reset()``) so that every graph is compiled afresh and reported;
    other compiled functions recompile on their next call."""
    opts = BDOptions.parse(options)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=lambda gm, ex: bd_backend(gm, ex, options=opts))
    with collect_reports() as report, torch.no_grad():
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    return report
