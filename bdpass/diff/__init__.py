"""Graph diff of the ``bd`` backend: the graphs before and after, aligned by provenance,
with per-node numerics against float64, the per-rule table and the costs.

    d = bdpass.diff(model, *args, options={...}, **kwargs)
    print(d)                 # 100-column text
    d.to_json(); d.save_html("diff.html")

Console script: ``bdpass diff path/to/file.py:factory`` or ``bdpass diff hf:gpt2``.
"""
from .core import Diff, GraphDiff, Region, Row, RuleRow, Stats, build_diff, diff, stats

__all__ = ["diff", "build_diff", "Diff", "GraphDiff", "Region", "Row", "RuleRow", "Stats", "stats"]
