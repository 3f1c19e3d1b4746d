"""What runs on every call of a rewritten graph.

Derived weights (factors computed from the model's parameters) are extra inputs of the
compiled graph, not constants baked into it: the compiled code is weight-agnostic, so
Inductor's and AOTAutograd's caches can never serve one model's factors to another.

Dynamo does not guard on parameter values, so each call first checks whether any source
parameter changed since its factors were computed — ``(id, _version, data_ptr)`` of each
source tensor, which catches in-place updates (``copy_``, optimizer steps,
``load_state_dict``), ``.data`` assignment and new ``Parameter`` objects. Changed factors
are recomputed and written into the same storage (so CUDA graphs stay valid). If the new
weights can no longer be factorized within budget, the graph permanently switches to the
original computation and logs why: it never runs with stale or out-of-budget factors.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

log = logging.getLogger("bdpass")


class VerificationError(RuntimeError):
    """Raised by ``verify=True`` when rewritten and original outputs differ."""


@dataclass
class DerivedGroup:
    """Tensors derived from some graph inputs (weights).

    ``compute(args)`` returns their exact values from the graph's arguments: floating
    tensors in float64, index tensors in int64, on any device. ``finalize`` casts them once
    to what the compiled graph reads: floating tensors in ``dtype``, everything on
    ``device``, contiguous. ``tensors`` holds the finalized values (the graph's extra
    inputs); refreshing writes new values into them in place."""
    name: str
    sources: tuple[int, ...]                                   # indices into the graph's args
    compute: Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]  # full args -> exact tensors
    tensors: list[torch.Tensor]
    dtype: torch.dtype | None = None
    device: torch.device | None = None

    def finalize(self, exact: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [finalize_tensor(t, self.dtype, self.device) for t in exact]


def finalize_tensor(t: torch.Tensor, dtype: torch.dtype | None, device: torch.device | None) -> torch.Tensor:
    """``t`` as a compiled graph reads it: floating values rounded once to ``dtype``."""
    want = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
    return t.detach().to(device=device if device is not None else t.device, dtype=want).contiguous()


def _signature(t: Any) -> tuple:
    try:
        version = t._version
    except Exception:  # inference tensors have no version counter
        version = -1
    return (id(t), version, t.data_ptr())


DEFAULT_VERIFY_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    return []


class RewrittenGraph:
    """The callable handed back to Dynamo for a graph with at least one rewrite."""

    def __init__(self, compiled: Callable, groups: list[DerivedGroup], original: Callable,
                 graph_index: int, verify: bool = False, verify_tol: float | None = None):
        self.compiled = compiled
        self.groups = groups
        self.original = original
        self.graph_index = graph_index
        self.verify = verify
        self.verify_tol = verify_tol
        self.derived: list[torch.Tensor] = [t for g in groups for t in g.tensors]
        watch = sorted({i for g in groups for i in g.sources})
        self._watch = watch
        self._group_of: dict[int, list[int]] = {}
        for gi, g in enumerate(groups):
            for i in g.sources:
                self._group_of.setdefault(i, []).append(gi)
        self._sig: dict[int, tuple] = {}
        self._use_original: str | None = None
        self.released: set[int] = set()

    def release(self, args: Sequence[torch.Tensor], unused: set[int]) -> int:
        """Free the storage of source weights the compiled graph does not read, for every
        derived group whose sources are all such weights; those groups are frozen. Returns
        the bytes freed."""
        freed = 0
        for g in self.groups:
            if not g.sources or not set(g.sources) <= unused:
                continue
            for i in g.sources:
                t = args[i]
                st = t.untyped_storage()
                if st.nbytes() and st.nbytes() == t.numel() * t.element_size():
                    freed += st.nbytes()
                    st.resize_(0)
                self.released.add(i)
        self._watch = [i for i in self._watch if i not in self.released]
        return freed

    def snapshot(self, args: Sequence[torch.Tensor]) -> None:
        """Record the source weights the current factors were computed from."""
        self._sig = {i: _signature(args[i]) for i in self._watch}

    # ------------------------------------------------------------------ staleness
    def _refresh(self, args: Sequence[torch.Tensor]) -> None:
        stale: set[int] = set()
        sig = self._sig
        for i in self._watch:
            s = _signature(args[i])
            if sig.get(i) != s:
                stale.update(self._group_of[i])
                sig[i] = s
        if not stale:
            return
        with torch.no_grad():
            for gi in sorted(stale):
                g = self.groups[gi]
                try:
                    new = g.finalize(g.compute(args))
                except Exception as e:  # weights no longer factorizable within budget
                    self._use_original = f"{g.name}: {e}"
                    log.warning("bdpass: graph %d: weights changed and %s can no longer be rewritten (%s); "
                                "running the original computation from now on", self.graph_index, g.name, e)
                    return
                for old, t in zip(g.tensors, new):
                    if old.shape != t.shape or old.dtype != t.dtype:
                        self._use_original = f"{g.name}: derived shape changed"
                        log.warning("bdpass: graph %d: %s changed shape; running the original computation",
                                    self.graph_index, g.name)
                        return
                    old.copy_(t)
        log.info("bdpass: graph %d: source weights changed; recomputed %d derived group(s)",
                 self.graph_index, len(stale))

    def __call__(self, *args: Any) -> Any:
        if self._use_original is None:
            self._refresh(args)
        if self._use_original is not None:
            return self.original(*args)
        out = self.compiled(*args, *self.derived)
        if self.verify:
            self._check(args, out)
        return out

    # ------------------------------------------------------------------ verify
    def _check(self, args: Sequence[Any], out: Any) -> None:
        with torch.no_grad():
            ref = self.original(*args)
        compare_outputs(_flat_tensors(out), _flat_tensors(ref), self.verify_tol,
                        f"bdpass verify: graph {self.graph_index}")


def compare_outputs(got: Sequence[torch.Tensor], ref: Sequence[torch.Tensor], tol: float | None,
                    what: str) -> None:
    """Raise VerificationError unless each output matches the reference: same shape, equal
    integer values, non-finite entries in the same places, and a relative L2 difference of
    the finite entries within ``tol`` (per-dtype default)."""
    if len(got) != len(ref):
        raise VerificationError(f"{what}: {len(got)} outputs, the original {len(ref)}")
    for k, (a, b) in enumerate(zip(got, ref)):
        if a.shape != b.shape:
            raise VerificationError(f"{what}: output {k} shape {tuple(a.shape)} != {tuple(b.shape)}")
        if not b.is_floating_point():
            if not torch.equal(a, b):
                raise VerificationError(f"{what}: output {k} differs")
            continue
        a64, b64 = a.double().flatten(), b.double().flatten()
        fin = torch.isfinite(b64)
        if not torch.equal(fin, torch.isfinite(a64)) or not torch.equal(a64[~fin].nan_to_num(), b64[~fin].nan_to_num()):
            raise VerificationError(f"{what}: output {k} has non-finite values where the original does not")
        t = tol or DEFAULT_VERIFY_TOL.get(b.dtype, 1e-2)
        num = torch.linalg.vector_norm(a64[fin] - b64[fin])
        den = torch.linalg.vector_norm(b64[fin])
        rel = float(num / den) if float(den) > 0 else float(num)
        if rel > t:
            raise VerificationError(f"{what}: output {k}: relative L2 difference {rel:.3g} exceeds {t:.3g}")
