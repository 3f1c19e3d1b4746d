"""The modules a prepared model holds in place of the projections the rewrites replaced.

Each is an ordinary ``nn.Module`` whose tensors are its factors (parameters for values,
int64 buffers for pivot tables) and an empty marker (below), that calls one of the
project's custom ops (:mod:`inductor_lowerings`), works at any input shape (the op acts on
the last dimension), and describes itself by a small JSON-able :meth:`spec` from which :func:`from_spec` builds an
empty one of the same shapes (what loading a checkpoint needs: no factorization).

* :class:`BDLinear`: a projection after basis decomposition (BD) of some of its heads:
  ``torch.ops.bdpass.bd_linear`` over column blocks, each reading one pivot table.
* :class:`PivotLinear`: a low-rank chain ``u(v(x))`` after pivoting factorization (PIFA):
  ``torch.ops.bdpass.pivot_linear`` (columns written back in their places), or, when the
  next chain absorbs the column order (``restore_order=False``), the two GEMMs with the
  output in ``[pivots, rest]`` order.
* :class:`Absorbed`: the identity left where the chain's first linear was (its product is
  part of the :class:`PivotLinear` that took the second linear's place).

Each also holds a *marker*: a persistent buffer named ``weight`` (:data:`MARKER`) with no
elements (shape ``(0,)``, the module's dtype), under the name of the weight it replaced. A
checkpoint of a prepared model therefore holds ``<module>.weight`` with 0 elements where the
original held an ``(out, in)`` weight: a loader that builds the original architecture
(transformers without ``import bdpass``) meets a size mismatch on that key and refuses,
instead of leaving the replaced weights randomly initialized. It is never read, counts no
bytes, and a state without it (checkpoints saved before it existed) still loads.
"""
from __future__ import annotations

import abc
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._compat import is_exporting

__all__ = ["PreparedModule", "BDLinear", "PivotLinear", "Absorbed", "from_spec", "PREPARED_TYPES", "MARKER"]

MARKER = "weight"   # the zero-element buffer each prepared module holds (see the module docstring)


def _ops() -> None:
    import inductor_lowerings  # noqa: F401  (registers torch.ops.bdpass.*)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"bdpass: unknown dtype {name!r} in a prepared-model plan")
    return dt


def _param(shape: Sequence[int], device: Any, dtype: torch.dtype, requires_grad: bool) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device=device, dtype=dtype), requires_grad=requires_grad)


class PreparedModule(nn.Module, abc.ABC):
    """The base of every prepared module: a JSON-able :meth:`spec`, the classmethod
    :meth:`from_spec` that builds an empty module of those shapes, and the zero-element
    :data:`MARKER` buffer (a ``state_dict`` without it loads: it carries no value). A
    subclass is known to :func:`from_spec` by its class name."""
    _types: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        PreparedModule._types[cls.__name__] = cls

    @abc.abstractmethod
    def spec(self) -> dict:
        """The module's kind and shapes, JSON-able (what a plan stores)."""

    @classmethod
    @abc.abstractmethod
    def from_spec(cls, spec: dict, *, device: Any = None, dtype: torch.dtype | None = None,
                  requires_grad: bool = True) -> "PreparedModule":
        """An empty module of the shapes ``spec`` describes (nothing factorized)."""

    @staticmethod
    def replaced_features(spec: dict) -> tuple[int, int]:
        """(in, out) features of the module this one took the place of."""
        return int(spec["in_features"]), int(spec["out_features"])

    def _add_marker(self, device: Any, dtype: torch.dtype | None) -> None:
        self.register_buffer(MARKER, torch.empty(0, device=device, dtype=dtype or torch.get_default_dtype()))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + MARKER
        if key not in state_dict and key in missing_keys:
            missing_keys.remove(key)


class BDLinear(PreparedModule):
    """``y = bd_linear(x, sel, rest, weight, bias, block_table, block_col, out_features)``.

    ``tables[t]`` is the number of identity rows of pivot table ``t`` (0 for the dense
    table); ``blocks[i] = (table, first column, width, has_bias)``. Tensors: buffers
    ``sel_t`` (``tables[t]``,) and ``rest_t`` (``in_features - tables[t]``,) int64,
    parameters ``weight_i`` (``in_features - tables[table_i]``, ``width_i``) and ``bias_i``
    (``width_i``,); the empty marker buffer ``weight`` (:data:`MARKER`). See
    :mod:`inductor_lowerings.bd_linear` for what the op computes."""

    def __init__(self, in_features: int, out_features: int, tables: Sequence[int],
                 blocks: Sequence[Sequence], *, device: Any = None, dtype: torch.dtype | None = None,
                 requires_grad: bool = True, replaces: str = "Linear"):
        super().__init__()
        _ops()
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.tables = [int(g) for g in tables]
        self.blocks = [(int(t), int(c), int(n), bool(hb)) for t, c, n, hb in blocks]
        self.replaces = replaces
        if sum(n for _, _, n, _ in self.blocks) != self.out_features:
            raise ValueError("bdpass.BDLinear: the blocks do not cover the output columns")
        for t, g in enumerate(self.tables):
            self.register_buffer(f"sel_{t}", torch.empty(g, dtype=torch.int64, device=device))
            self.register_buffer(f"rest_{t}", torch.empty(self.in_features - g, dtype=torch.int64, device=device))
        for i, (t, _, n, hb) in enumerate(self.blocks):
            self.register_parameter(f"weight_{i}", _param((self.in_features - self.tables[t], n), device, dtype,
                                                          requires_grad))
            self.register_parameter(f"bias_{i}", _param((n,), device, dtype, requires_grad) if hb else None)
        self._add_marker(device, dtype)

    def _lists(self):
        T, n = len(self.tables), len(self.blocks)
        return ([getattr(self, f"sel_{t}") for t in range(T)], [getattr(self, f"rest_{t}") for t in range(T)],
                [getattr(self, f"weight_{i}") for i in range(n)], [getattr(self, f"bias_{i}") for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sel, rest, weight, bias = self._lists()
        if is_exporting():      # plain aten ops: the exported program needs no bdpass
            from inductor_lowerings.bd_linear import bd_linear_reference

            return bd_linear_reference(x, sel, rest, weight, bias, [b[0] for b in self.blocks],
                                       [b[1] for b in self.blocks], self.out_features)
        return torch.ops.bdpass.bd_linear(x, sel, rest, weight, bias, [b[0] for b in self.blocks],
                                          [b[1] for b in self.blocks], self.out_features)

    def spec(self) -> dict:
        w = self.weight_0
        return {"type": "BDLinear", "replaces": self.replaces, "in_features": self.in_features,
                "out_features": self.out_features, "tables": list(self.tables),
                "blocks": [list(b) for b in self.blocks], "dtype": _dtype_name(w.dtype)}

    @classmethod
    def from_spec(cls, spec: dict, *, device: Any = None, dtype: torch.dtype | None = None,
                  requires_grad: bool = True) -> "BDLinear":
        return cls(spec["in_features"], spec["out_features"], spec["tables"], spec["blocks"], device=device,
                   dtype=dtype or _dtype(spec["dtype"]), requires_grad=requires_grad,
                   replaces=spec.get("replaces", "Linear"))

    def extra_repr(self) -> str:
        bd = sum(1 for t, *_ in self.blocks if self.tables[t])
        return (f"in_features={self.in_features}, out_features={self.out_features}, tables={len(self.tables)}, "
                f"blocks={len(self.blocks)} ({bd} BD)")


class PivotLinear(PreparedModule):
    """A low-rank chain ``y = (x A + a) B + b`` after PIFA (``r = rank`` pivot columns):
    ``y[..., pivots] = x @ w_pivot + b_pivot``, ``y[..., rest] = y[..., pivots] @ coeff + b_rest``.

    Tensors: parameters ``w_pivot`` (in, r), ``coeff`` (r, out - r), ``b_pivot`` (r,) and
    ``b_rest`` (out - r,) when the chain has a bias; with ``restore_order`` the int64
    buffers ``pivots`` and ``rest`` (``torch.ops.bdpass.pivot_linear`` writes every column
    to its place). Without it the output stays ``cat([y_P, y_R])``: only valid where the
    next chain's first weight absorbed that order (a linked pair, see ``prepare``). The
    empty marker buffer ``weight`` (:data:`MARKER`)."""

    def __init__(self, in_features: int, rank: int, out_features: int, bias: bool, restore_order: bool = True,
                 *, device: Any = None, dtype: torch.dtype | None = None, requires_grad: bool = True,
                 replaces: str = "Linear"):
        super().__init__()
        _ops()
        dtype = dtype or torch.get_default_dtype()
        self.in_features, self.rank, self.out_features = int(in_features), int(rank), int(out_features)
        self.restore_order = bool(restore_order)
        self.replaces = replaces
        r, n = self.rank, self.out_features - self.rank
        self.w_pivot = _param((self.in_features, r), device, dtype, requires_grad)
        self.coeff = _param((r, n), device, dtype, requires_grad)
        self.b_pivot = _param((r,), device, dtype, requires_grad) if bias else None
        self.b_rest = _param((n,), device, dtype, requires_grad) if bias else None
        if self.restore_order:
            self.register_buffer("pivots", torch.empty(r, dtype=torch.int64, device=device))
            self.register_buffer("rest", torch.empty(n, dtype=torch.int64, device=device))
        self._add_marker(device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.restore_order and is_exporting():   # plain aten ops (see BDLinear)
            from inductor_lowerings.aten_impl import pivot_linear_aten

            return pivot_linear_aten(x, self.w_pivot, self.b_pivot, self.coeff, self.b_rest, self.pivots, self.rest)
        if self.restore_order:
            return torch.ops.bdpass.pivot_linear(x, self.w_pivot, self.b_pivot, self.coeff, self.b_rest,
                                                 self.pivots, self.rest)
        yp = F.linear(x, self.w_pivot.t(), self.b_pivot)
        yr = F.linear(yp, self.coeff.t(), self.b_rest)
        return torch.cat([yp, yr], dim=-1)

    def spec(self) -> dict:
        return {"type": "PivotLinear", "replaces": self.replaces, "in_features": self.in_features,
                "rank": self.rank, "out_features": self.out_features, "bias": self.b_pivot is not None,
                "restore_order": self.restore_order, "dtype": _dtype_name(self.w_pivot.dtype)}

    @classmethod
    def from_spec(cls, spec: dict, *, device: Any = None, dtype: torch.dtype | None = None,
                  requires_grad: bool = True) -> "PivotLinear":
        return cls(spec["in_features"], spec["rank"], spec["out_features"], spec["bias"], spec["restore_order"],
                   device=device, dtype=dtype or _dtype(spec["dtype"]), requires_grad=requires_grad,
                   replaces=spec.get("replaces", "Linear"))

    @staticmethod
    def replaced_features(spec: dict) -> tuple[int, int]:
        """It takes the place of its chain's second linear (rank -> out)."""
        return int(spec["rank"]), int(spec["out_features"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}, "
                f"bias={self.b_pivot is not None}, restore_order={self.restore_order}")


class Absorbed(PreparedModule, nn.Identity):
    """Where the first linear of a PIFA chain was: its product is computed by the
    :class:`PivotLinear` at ``into`` (the chain's second linear), so this passes its input on.
    Its only tensor is the empty marker buffer ``weight`` (:data:`MARKER`; ``dtype``, default
    the default dtype)."""

    def __init__(self, in_features: int, out_features: int, into: str, replaces: str = "Linear", *,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.into, self.replaces = int(in_features), int(out_features), into, \
            replaces
        self._add_marker(device, dtype)

    def spec(self) -> dict:
        return {"type": "Absorbed", "replaces": self.replaces, "in_features": self.in_features,
                "out_features": self.out_features, "into": self.into}

    @classmethod
    def from_spec(cls, spec: dict, *, device: Any = None, dtype: torch.dtype | None = None,
                  requires_grad: bool = True) -> "Absorbed":
        return cls(spec["in_features"], spec["out_features"], spec["into"], spec.get("replaces", "Linear"),
                   device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"into={self.into!r}"


PREPARED_TYPES = (PreparedModule,)


def from_spec(spec: dict, *, device: Any = None, dtype: torch.dtype | None = None,
              requires_grad: bool = True) -> nn.Module:
    """An empty module of the kind and shapes ``spec`` describes (``dtype``: the plan's
    unless given; an :class:`Absorbed`'s marker: ``dtype``, else the default dtype)."""
    cls = PreparedModule._types.get(spec.get("type"))
    if cls is None:
        raise ValueError(f"bdpass: unknown prepared module type {spec.get('type')!r} in a plan")
    return cls.from_spec(spec, device=device, dtype=dtype, requires_grad=requires_grad)
