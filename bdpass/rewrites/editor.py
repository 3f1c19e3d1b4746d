"""Editing a copy of a Dynamo graph: new weight inputs, new nodes with provenance.

Rewrites are planned on the original graph (whose nodes carry Dynamo's shape metadata)
and applied to a copy; ``editor.new(node)`` gives the value an original node has in the
edited graph: its copy, or what an earlier rewrite replaced it with (``editor.replace``).
A rewrite must read its inputs through ``new`` so that a site whose input was produced by
an already rewritten site reads the rewritten value, never the replaced one.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx

from .. import _compat
from ..graph.ops import canonical
from ..runtime import DerivedGroup

# ops through which a linear reads its weight (views, casts): they die with the linear
_PURE_WEIGHT_VIEWS = {"t", "T", "mT", "transpose", "permute", "movedim", "reshape", "flatten", "unflatten",
                      "squeeze", "unsqueeze", "detach", "alias", "contiguous", "clone", "to", "cast", "type_as"}


class GraphEditor:
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        self.orig = gm
        self.gm, self._map = _compat.copy_graph_module(gm)
        self.graph = self.gm.graph
        self.example_inputs = list(example_inputs)
        self.fake_mode = _compat.detect_fake_mode(example_inputs)
        self.groups: list[DerivedGroup] = []
        self._n_inputs = len(example_inputs)
        self._new_inputs: list[torch.Tensor] = []
        self._exact_inputs: list[torch.Tensor] = []   # the new inputs' exact values (float64/int64)
        self._last_placeholder = [n for n in self.graph.nodes if n.op == "placeholder"][-1] \
            if any(n.op == "placeholder" for n in self.graph.nodes) else None
        self.current_rewrite: int | None = None
        self._maybe_dead: list[torch.fx.Node] = []
        self.removed_by: dict[str, int] = {}     # original node name -> rewrite index
        self._replaced: dict[torch.fx.Node, torch.fx.Node] = {}   # original node -> replacement
        self.decisions: list = []      # what each rewrite decided (bdpass.rules.Decision)

    @property
    def node_map(self) -> dict:
        """Original node -> its copy in the edited graph."""
        return self._map

    def new(self, node: Any) -> Any:
        """The value of an original node in the edited graph: the node that replaced it, or
        its copy (other values unchanged)."""
        if isinstance(node, torch.fx.Node):
            return self._replaced.get(node) or self._map[node]
        return node

    def replace(self, orig: torch.fx.Node, value: torch.fx.Node) -> None:
        """Every reader of ``orig``'s value, present and future, reads ``value`` instead."""
        self.new(orig).replace_all_uses_with(value)
        self._replaced[orig] = value

    def add_derived(self, name: str, sources: Sequence[int],
                    compute: Callable[[Sequence[torch.Tensor]], list[torch.Tensor | None]],
                    exact: list[torch.Tensor | None] | None = None, *,
                    dtype: torch.dtype, device: torch.device) -> list[torch.fx.Node | None]:
        """Register tensors derived from graph inputs ``sources`` as new graph inputs.

        ``compute(args)`` recomputes their exact values (float64 / int64) from the graph's
        runtime arguments; ``exact`` are those values at the example inputs (computed if not
        given). The graph reads them rounded once to ``dtype`` on ``device``. Entries that
        are None (e.g. an absent bias) get no input and come back as None."""
        if exact is None:
            with torch.no_grad():
                exact = compute(self.example_inputs)
        present = [i for i, t in enumerate(exact) if t is not None]
        group = DerivedGroup(name=name, sources=tuple(sorted(set(sources))), compute=None, tensors=[],
                             dtype=dtype, device=device)
        nodes: list[torch.fx.Node | None] = []
        for k, t in enumerate(exact):
            if t is None:
                nodes.append(None)
                continue
            t = t.detach()
            kept = group.finalize([t])[0]
            anchor = self._last_placeholder
            if anchor is None:
                ctx = self.graph.inserting_before(next(iter(self.graph.nodes)))
            else:
                ctx = self.graph.inserting_after(anchor)
            with ctx:
                ph = self.graph.placeholder(f"bd_{name}_{k}")
            _compat.mark_new_placeholder(ph, kept, self.fake_mode)
            self._last_placeholder = ph
            nodes.append(ph)
            group.tensors.append(kept)
            self._exact_inputs.append(t)

        def compute_present(args, _c=compute, _p=present):
            full = _c(args)
            return [full[i] for i in _p]

        group.compute = compute_present
        self.groups.append(group)
        self._new_inputs.extend(group.tensors)
        return nodes

    def call(self, target: Any, args: tuple, kwargs: dict | None = None, origin: Any = None,
             method: bool = False) -> torch.fx.Node:
        """Create a node (at the current insertion point) tagged with the active rewrite."""
        if method:
            n = self.graph.call_method(target, args, kwargs or {})
        else:
            n = self.graph.call_function(target, args, kwargs or {})
        n.meta["bdpass_rewrite"] = self.current_rewrite
        if origin is not None:
            n.meta["bdpass_origin"] = origin.name if isinstance(origin, torch.fx.Node) else str(origin)
        return n

    def discard(self, orig_nodes: Sequence[torch.fx.Node], rewrite: int) -> None:
        """Original nodes a rewrite replaced: erased at the end if nothing uses them."""
        self._maybe_dead.extend(self._map[n] for n in orig_nodes)
        for n in orig_nodes:
            self.removed_by[n.name] = rewrite

    def _erase_dead(self) -> None:
        pending = [n for n in dict.fromkeys(self._maybe_dead) if n.op in ("call_function", "call_method")]
        changed = True
        while changed:
            changed = False
            for n in list(pending):
                if getattr(n, "_erased", False):
                    pending.remove(n)
                    continue
                if not n.users:
                    inputs = [a for a in n.all_input_nodes if canonical(a) in _PURE_WEIGHT_VIEWS]
                    self.graph.erase_node(n)
                    pending.remove(n)
                    # weight transposes feeding a removed linear die with it
                    pending.extend(a for a in inputs if a not in pending and not a.users)
                    changed = True

    def exact_inputs(self) -> list[torch.Tensor]:
        """The example inputs with every derived input at its exact value (float64 factors
        instead of the rounded ones the graph reads, on the graph's device): what
        validation runs."""
        return self.example_inputs + [t.to(k.device) for t, k in zip(self._exact_inputs, self._new_inputs)]

    def finish(self) -> tuple[torch.fx.GraphModule, list]:
        self._erase_dead()
        self.graph.lint()
        self.gm.recompile()
        return self.gm, self.example_inputs + self._new_inputs
