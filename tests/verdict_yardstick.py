"""The verdict yardstick of the tests and the sweep: which graph nodes must get a verdict
(found by :mod:`bdpass.graph.contractions`, independently of the rules), and which nodes the
verdicts of a report name."""
from __future__ import annotations

import torch.fx

from bdpass.graph import contractions


def verdict_nodes(graph_report, planned: dict | None = None) -> dict[str, set[str]]:
    """{kind: names of the graph nodes some verdict of ``graph_report`` is about}.

    A skip names its nodes (``SkipRecord.nodes``); a rewrite names them in
    ``details["nodes"]`` when its rewrite records them. ``planned`` maps ``(kind, site)``
    to node names (what the planners handed on), for verdicts that carry only their site."""
    out: dict[str, set[str]] = {}
    for rec in list(graph_report.skipped) + list(graph_report.rewrites):
        nodes = set(getattr(rec, "nodes", None) or [])
        details = getattr(rec, "details", None) or {}
        nodes |= set(details.get("nodes", []) or [])
        if planned:
            nodes |= set(planned.get((rec.kind, rec.site), ()))
        out.setdefault(rec.kind, set()).update(nodes)
    return out


def expected_verdicts(gm: torch.fx.GraphModule, example_inputs) -> dict[str, set[str]]:
    """{kind: names of the nodes that must have a verdict}: score contractions (bd_qk),
    value contractions (bd_vo), and both linears of every linear-of-linear (pifa)."""
    att = contractions.find_attention(gm)
    chains = contractions.find_linear_chains(gm, contractions.weight_nodes(gm, example_inputs))
    return {"bd_qk": {a.score.name for a in att}, "bd_vo": {a.value.name for a in att},
            "pifa": {n.name for pair in chains for n in pair}}
