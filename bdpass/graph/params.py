"""Which graph inputs are weights: each placeholder mapped to its real parameter (or
buffer) and its qualified name in the user's module (``layers.0.mlp.down_proj.weight``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx

from .. import _compat


@dataclass
class ParamInfo:
    index: int              # position among placeholders == index into example_inputs
    node: torch.fx.Node
    name: str               # qualified name, or the placeholder name if unknown
    tensor: torch.Tensor    # the real tensor at compile time

    @property
    def module_path(self) -> str:
        return self.name.rsplit(".", 1)[0] if "." in self.name else ""


def find_params(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> dict[torch.fx.Node, ParamInfo]:
    """Placeholders that hold module parameters or buffers (weights), keyed by node."""
    out: dict[torch.fx.Node, ParamInfo] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        if i >= len(example_inputs):
            break
        t = example_inputs[i]
        if not isinstance(t, torch.Tensor):
            continue
        src_text = _compat.source_name(_compat.placeholder_source(node))
        is_buffer = bool(src_text and "_buffers[" in src_text)
        if not (isinstance(t, torch.nn.Parameter) or is_buffer):
            continue
        name = _compat.qualified_name(src_text) or node.name
        out[node] = ParamInfo(index=i, node=node, name=name, tensor=t)
    return out


def weight_numel(params: dict[torch.fx.Node, ParamInfo], gm: torch.fx.GraphModule | None = None) -> int:
    """Elements of the weights a graph reads (placeholders with users)."""
    return sum(p.tensor.numel() for n, p in params.items() if len(n.users) > 0)
