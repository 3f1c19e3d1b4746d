"""Running the model once under ``torch.compile`` and handing every (graph, weights) pair
to the analysis.

``run_captured(model, args, kwargs, on_instance)`` compiles ``model`` with a backend that
keeps each Dynamo graph and returns a runner for it; the model is then called once on the
example inputs (``no_grad``; ``torch._dynamo.reset()`` before and after, so every graph is
traced afresh and nothing compiled here outlives the call). Any number of graphs is fine:
graph breaks, data-dependent loops (a mixture of experts looping over the experts that
were hit), encoder and decoder.

An *instance* is one graph called with one set of weights. Dynamo reuses a compiled graph
for every module of the same code and shapes (the decoder layers of a model), passing each
layer's weights as inputs, so a graph is analysed once per distinct set of weight tensors:
``on_instance(gm, args, index)`` is called the first time a graph runs with given weights,
and returns the graph's outputs computed with the weights as they are *before* any edit it
makes (so the rest of the run sees the original model's values).

Layer splitting (``split_layers=True``): a forward pre-hook that breaks the graph before
every block of an ``nn.ModuleList`` of two or more modules of one type (decoder layers,
encoder layers), outermost lists only. Each block is then its own graph (one instance per
layer), so the analysis, its float64 validation and the factors it computes are held for
one layer at a time, and edits are applied layer by layer. Rewrites never span two blocks
of a layer stack (attention pairs and low-rank chains live inside one block).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn

from ..graph.params import find_params

__all__ = ["run_captured", "layer_blocks", "TensorRegistry", "CaptureSession"]


class TensorRegistry:
    """A set of tensors by identity that does not keep them alive."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t: Any) -> bool:
        r = self._refs.get(id(t))
        return r is not None and r() is t


def layer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Blocks of the outermost layer stacks: children of an ``nn.ModuleList`` that has two or
    more children, all of one type and holding parameters."""
    out: list[tuple[str, nn.Module]] = []
    taken: list[str] = []
    for name, m in model.named_modules():
        if any(name == t or name.startswith(t + ".") for t in taken):
            continue
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1 \
                and any(True for _ in m[0].parameters()):
            taken.append(name)
            out.extend((f"{name}.{i}" if name else str(i), c) for i, c in enumerate(m))
    return out


def _break_graph(module: nn.Module, args: Any) -> None:
    torch._dynamo.graph_break()


class CaptureSession:
    """The capturing backend of one or more runs. Within one session, Dynamo's compiled code
    serves every later run whose guards pass (the next block of a checkpoint prepared block by
    block: the same code and shapes), so a kind of block is traced once; each graph call
    with weights not seen before is a new instance, handed to the run's ``on_instance``."""

    def __init__(self) -> None:
        self.graphs = 0
        self.instances = 0
        self.on_instance: Callable | None = None
        self.before_call: Callable | None = None
        self.backend = self._make_backend()       # one object: Dynamo's cache checks the backend

    def _make_backend(self) -> Callable:
        session = self

        def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
            session.graphs += 1
            weight_pos = sorted(p.index for p in find_params(gm, example_inputs).values())
            seen: list[list[weakref.ref]] = []

            def same(refs: list[weakref.ref], a: Sequence[Any]) -> bool:
                return all(r() is a[i] for r, i in zip(refs, weight_pos))

            def run(*a: Any) -> Any:
                a = list(a)
                if session.before_call is not None:
                    session.before_call(a)
                if any(same(refs, a) for refs in seen):
                    return gm.forward(*a)
                seen[:] = [refs for refs in seen if all(r() is not None for r in refs)]
                seen.append([weakref.ref(a[i]) for i in weight_pos])
                index = session.instances
                session.instances += 1
                return session.on_instance(gm, a, index)

            return run

        return backend

    @contextlib.contextmanager
    def limits(self):
        """Dynamo's recompile limits raised for the runs (every layer may be a new instance)."""
        with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit),
                                        accumulated_recompile_limit=max(
                                            4096, torch._dynamo.config.accumulated_recompile_limit)):
            yield


def run_captured(model: nn.Module, args: Sequence[Any], kwargs: dict,
                 on_instance: Callable[[torch.fx.GraphModule, list, int], Any],
                 before_call: Callable[[list], None] | None = None,
                 split_layers: bool = True, session: CaptureSession | None = None) -> tuple[Any, int]:
    """Run ``model(*args, **kwargs)`` once, compiled, calling ``on_instance`` for each new
    (graph, weights) instance (see the module docstring) and ``before_call(args)`` before
    every call of a compiled graph. Returns (the model's output, number of graphs compiled).

    ``session``: a :class:`CaptureSession` shared with earlier runs (the caller resets
    Dynamo before the first and after the last); without one, Dynamo is reset before and
    after this run."""
    own = session is None
    session = session or CaptureSession()
    session.on_instance, session.before_call = on_instance, before_call
    graphs0 = session.graphs
    hooks = []
    if split_layers:
        hooks = [m.register_forward_pre_hook(_break_graph) for _, m in layer_blocks(model)]
    if own:
        torch._dynamo.reset()
    try:
        with session.limits(), torch.no_grad():
            compiled = torch.compile(model, backend=session.backend)
            out = compiled(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        session.on_instance = session.before_call = None
        if own:
            torch._dynamo.reset()
    return out, session.graphs - graphs0
