"""Graph diff of the ``bd`` backend: the graphs before and after, aligned by provenance,
with per-node numerics against float64, the per-rule table and the costs.

    d = bdpass.diff(model, *args, options={...}, **kwargs)
    print(d)                 # 100-column text
    d.to_json(); d.save_html("diff.html")

Console script: ``bdpass diff path/to/file.py:factory`` or ``bdpass diff hf:gpt2``.

This package is itself callable: ``bdpass.diff(model, *args, **kwargs)`` is
``bdpass.diff.diff(model, *args, **kwargs)``, and its submodules stay importable:
:mod:`.core` (the driver; its docstring says what is measured and how), :mod:`.model` (the
data), :mod:`.align`, :mod:`.numerics`, :mod:`.formatting` and the renderers
:mod:`.render_text`, :mod:`.render_html`, :mod:`.render_json`.
"""
from .._callable import make_callable as _make_callable
from .core import Diff, GraphDiff, Region, Row, RuleRow, Stats, build_diff, diff, stats

__all__ = ["diff", "build_diff", "Diff", "GraphDiff", "Region", "Row", "RuleRow", "Stats", "stats"]

_make_callable(__name__, diff)
