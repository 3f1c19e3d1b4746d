"""Graph diff of the ``bd`` backend: the graphs before and after, aligned by provenance,
with per-node numerics against float64, the per-rule table and the costs.

    d = bdpass.diff(model, *args, options={...}, **kwargs)
    print(d)                 # 100-column text
    d.to_json(); d.save_html("diff.html")

Console script: ``bdpass diff path/to/file.py:factory`` or ``bdpass diff hf:gpt2``.

This package is itself callable: ``bdpass.diff(model, *args, **kwargs)`` is
``bdpass.diff.diff(model, *args, **kwargs)``, and its submodules stay importable
(``bdpass.diff.core``); see :mod:`bdpass.diff.core` for what is measured and how.
"""
import inspect as _inspect
import sys as _sys
import types as _types

from .core import Diff, GraphDiff, Region, Row, RuleRow, Stats, build_diff, diff, stats

__all__ = ["diff", "build_diff", "Diff", "GraphDiff", "Region", "Row", "RuleRow", "Stats", "stats"]


class _CallableModule(_types.ModuleType):
    def __call__(self, model, *args, options=None, **kwargs):
        return diff(model, *args, options=options, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
__signature__ = _inspect.signature(diff)
