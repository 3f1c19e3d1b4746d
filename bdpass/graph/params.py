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
        name = _compat.module_relative_name(src_text) or node.name
        out[node] = ParamInfo(index=i, node=node, name=name, tensor=t)
    return out


def weight_problem(params: list[ParamInfo]) -> str | None:
    """Why these weights cannot be factorized (None if they can)."""
    devices = set()
    for p in params:
        t = p.tensor
        if t.device.type == "meta":
            return f"{p.name} is on the meta device"
        if not t.is_floating_point() or t.element_size() < 2:
            return f"{p.name} has dtype {str(t.dtype).replace('torch.', '')} (needs float16/bfloat16/float32/float64)"
        if _compat.is_dtensor(t):
            from .layout.collectives import DTENSOR_ADVICE     # not at the top: the layout package imports this one

            return f"{p.name} is a DTensor (sharded by torch.distributed.tensor): bd rewrites plain local " \
                   f"weights only; {DTENSOR_ADVICE}"
        if _is_subclass(t):
            return f"{p.name} is a tensor subclass ({type(t).__name__})"
        if t.numel() == 0:
            return f"{p.name} has a zero-size dimension"
        devices.add(t.device)
    if len(devices) > 1:
        return "weights on different devices (" + ", ".join(sorted(map(str, devices))) + ")"
    return None


def _is_subclass(t: torch.Tensor) -> bool:
    data = t.data if isinstance(t, torch.nn.Parameter) else t
    return type(data) is not torch.Tensor


def weight_numel(params: dict[torch.fx.Node, ParamInfo]) -> int:
    """Elements of the weights a graph reads (placeholders with users)."""
    return sum(p.tensor.numel() for n, p in params.items() if len(n.users) > 0)
