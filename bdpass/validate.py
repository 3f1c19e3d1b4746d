"""Validation of a rewritten graph while compiling: a safety net under the analysis.

Before a rewritten graph is handed to Inductor, the original graph and the rewritten one
are both run in float64 (:class:`bdpass.graph.exact.Float64Interpreter`) on the example
inputs the graph is being compiled for, the rewritten one with its derived weights at
their exact (float64) values. In exact arithmetic every rewrite is an identity, so the
two runs must agree at every output and in every input the graph writes to (a cache), up
to float64 rounding grown by the rewrites' error bounds. A mismatch means the analysis or
the rewrite is wrong for this graph: the backend then refuses the rewrites responsible
(each is tried alone to find them) and says why in the report.

Neither these runs nor any other check communicates: under tensor parallelism each rank
validates its own graph, and ranks may decide differently (one rewrites, another does not),
so every run here goes through :class:`bdpass.graph.exact.LocalInterpreter`, whose
collectives are local stand-ins of the right shapes, the same in both graphs of a
comparison. A graph on DTensors is not run (its rewrites are refused).

What this does not check: the rounding of the factors to the model's dtype (that is what
the error bound and budget are for), and behaviour on inputs whose control flow differs
from the example's (a Dynamo graph has none: a different path is a different graph).
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch
import torch.fx

from . import _compat
from .graph.exact import Float64Interpreter, LocalInterpreter, float64_inputs
from .runtime import VerificationError, compare_outputs

# Relative-L2 tolerance per unit of error bound: float64 rounding (1.1e-16) grown by the
# rewrite's error bound and by the rest of the graph, with ample room; a structural error
# (a wrong column, basis or order) is many orders of magnitude above it.
TOL_PER_BOUND = 1e-10
TOL_FLOOR = 1e-9


class RewriteValidationError(VerificationError):
    """Raised with ``strict=True`` when a rewritten graph fails validation."""


def fake_inputs(example_inputs: Sequence[Any]) -> bool:
    return any(_compat.is_fake(t) for t in example_inputs)


def tolerance(bounds: Sequence[float]) -> float:
    return max(TOL_FLOOR, TOL_PER_BOUND * max([1.0, *bounds]))


def _leaves(out: Any) -> list:
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _leaves(o)]
    return [out]


# Relative-L2 tolerance when part of the graph had to run in float32 (an op without a
# float64 kernel): the two runs then differ by float32 rounding there.
TOL_NARROWED = 1e-4


def _run(gm: torch.fx.GraphModule, inputs: Sequence[Any], weights: set[int]) -> tuple[list, list, list]:
    """(outputs, non-weight inputs after the run, nodes run in float32) of a float64 run."""
    args = float64_inputs(inputs, weights)
    with torch.random.fork_rng(devices=_devices(inputs)):
        torch.manual_seed(0)
        interp = Float64Interpreter(gm)
        out = interp.run(*args)
    states = [a for i, a in enumerate(args) if isinstance(a, torch.Tensor) and i not in weights]
    return [t for t in _leaves(out) if isinstance(t, torch.Tensor)], states, interp.narrowed


def _devices(inputs: Sequence[Any]) -> list:
    return sorted({t.device.index or 0 for t in inputs
                   if isinstance(t, torch.Tensor) and t.device.type == "cuda"})


def compare(gm: torch.fx.GraphModule, inputs: Sequence[Any], new_gm: torch.fx.GraphModule,
            new_inputs_exact: Sequence[Any], weights: set[int], tol: float,
            reference: tuple | None = None) -> tuple[str | None, tuple]:
    """Run both graphs in float64; returns (None or the first mismatch, the original's
    results for reuse as ``reference``)."""
    with torch.no_grad():
        ref = reference if reference is not None else _run(gm, inputs, weights)
        n_orig = len(inputs)
        got = _run(new_gm, new_inputs_exact, weights | set(range(n_orig, len(new_inputs_exact))))
    if ref[2] or got[2]:
        tol = max(tol, TOL_NARROWED)
    try:
        compare_outputs(got[0], ref[0], tol, "output")
        compare_outputs(got[1][:len(ref[1])], ref[1], tol, "input written by the graph")
    except VerificationError as e:
        return str(e), ref
    return None, ref


def _rel_error(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor]) -> float:
    """Relative L2 error of all floating outputs together (finite entries)."""
    num = den = 0.0
    for a, b in zip(got, ref):
        if not (a.is_floating_point() and b.is_floating_point()) or a.shape != b.shape:
            continue
        a64, b64 = a.detach().double().flatten(), b.detach().double().flatten()
        fin = torch.isfinite(a64) & torch.isfinite(b64)
        num += float(torch.linalg.vector_norm(a64[fin] - b64[fin])) ** 2
        den += float(torch.linalg.vector_norm(b64[fin])) ** 2
    return (num ** 0.5) / (den ** 0.5) if den > 0 else 0.0


def _run_native(gm: torch.fx.GraphModule, inputs: Sequence[Any], weights: set[int]) -> list:
    """Outputs of ``gm`` run eagerly in the model's own dtypes (on copies of the inputs it
    may write to)."""
    from ._compat import size_hint

    args = [t.detach().clone() if isinstance(t, torch.Tensor) and i not in weights else
            size_hint(t) if isinstance(t, torch.SymInt) else t
            for i, t in enumerate(inputs)]
    with torch.no_grad(), torch.random.fork_rng(devices=_devices(inputs)):
        torch.manual_seed(0)
        out = LocalInterpreter(gm).run(*args)
    return [t for t in _leaves(out) if isinstance(t, torch.Tensor)]


def measured_errors(gm: torch.fx.GraphModule, inputs: Sequence[Any], new_gm: torch.fx.GraphModule,
                    new_inputs: Sequence[Any], weights: set[int], reference: tuple) -> tuple[float, float]:
    """Relative L2 error against the float64 run of the original graph (``reference``) of the
    original and of the rewritten graph, each run in the model's dtype (the rewritten one
    with its factors rounded as the compiled graph reads them)."""
    n_orig = len(inputs)
    e0 = _rel_error(_run_native(gm, inputs, weights), reference[0])
    e1 = _rel_error(_run_native(new_gm, new_inputs, weights | set(range(n_orig, len(new_inputs)))), reference[0])
    return e0, e1


def error_floor(inputs: Sequence[Any]) -> float:
    """Two units of roundoff of the narrowest floating dtype among the inputs: below it an
    original's error is luck, not a scale to compare against."""
    us = [torch.finfo(t.dtype).eps / 2 for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return 2 * max(us) if us else 2 * torch.finfo(torch.float32).eps / 2


# Below this many weight elements a graph is validated on one thread: its GEMMs are too
# small to gain from more, and waiting for the other threads dominates on a busy machine.
SMALL_GRAPH = 10_000_000


@contextlib.contextmanager
def threads_for(n_weights: int):
    if n_weights >= SMALL_GRAPH:
        yield
        return
    from .identities.shared_row_search import _single_thread

    with _single_thread():
        yield


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t0
