"""Options of the ``bd`` backend (``torch.compile(m, backend="bd", options={...})``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

LOWERINGS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class BDOptions:
    """All knobs of the backend. Every field can be passed in ``options``.

    pifa, bd_qk, bd_vo  enable each rewrite family.
    error_budget        largest error-growth factor a rewrite may have: the first-order
                        factor by which the rewrite can multiply the rounding error of the
                        computation it replaces (PIFA: 1 + ||C'||_2, BD: cond(B_h)). A
                        site over budget is skipped with the reason.
    cost_model          skip a rewrite that the roofline estimate says would be slower than
                        the original on the graph's device at its token count (bdpass.cost).
                        False applies every legal rewrite (smallest weights, maybe slower).
    min_saving          smallest fraction of a site's weights a rewrite must save; below it
                        the site is skipped (e.g. LoRA's rank-8 adapters save ~0.1%).
    lowering            "inductor" (default), "aot_eager" or "eager" (debugging).
    verify              also run the original graph on every call and raise
                        ``bdpass.VerificationError`` when outputs differ beyond verify_tol.
    verify_tol          relative-L2 tolerance for ``verify``; None: per-dtype default.
    release_weights     after compiling, free the storage of every parameter the rewritten graph
                        no longer reads (all of whose factors depend only on released
                        parameters), so that resident memory drops by the rewrites' savings.
                        Those parameters keep their shape but hold no data: the module can no
                        longer run eagerly or be compiled again, and writing to them raises;
                        their factors are frozen (no stale-weight check). Inference deployment
                        only; ``bdpass.prepare`` is the saveable alternative.
    validate            before lowering, run the original and the rewritten graph in float64 on
                        the example inputs and refuse the rewrites under which they differ
                        (with the reason in the report; ``strict`` raises instead).
    strict              re-raise internal errors instead of falling back to plain lowering.
    inductor            extra Inductor config patches passed to ``compile_fx``.
    """

    pifa: bool = True
    bd_qk: bool = True
    bd_vo: bool = True
    error_budget: float = 100.0
    min_saving: float = 0.02
    cost_model: bool = True
    lowering: str = "inductor"
    verify: bool = False
    verify_tol: float | None = None
    release_weights: bool = False
    validate: bool = True
    strict: bool = False
    inductor: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def valid_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def parse(cls, options: "Mapping[str, Any] | BDOptions | None") -> "BDOptions":
        if options is None:
            return cls()
        if isinstance(options, BDOptions):
            return options
        if not isinstance(options, Mapping):
            raise TypeError(f"bdpass: options must be a dict, got {type(options).__name__}")
        valid = cls.valid_names()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"bdpass: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        opts = cls(**dict(options))
        opts._validate()
        return opts

    def _validate(self) -> None:
        for name in ("pifa", "bd_qk", "bd_vo", "verify", "strict", "cost_model", "release_weights", "validate"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"bdpass: option {name!r} must be a bool, got {getattr(self, name)!r}")
        if self.lowering not in LOWERINGS:
            raise ValueError(f"bdpass: option 'lowering' must be one of {LOWERINGS}, got {self.lowering!r}")
        if not isinstance(self.error_budget, (int, float)) or not self.error_budget >= 1.0:
            raise ValueError(f"bdpass: option 'error_budget' must be a number >= 1, got {self.error_budget!r}")
        if not isinstance(self.min_saving, (int, float)) or not 0.0 <= self.min_saving < 1.0:
            raise ValueError(f"bdpass: option 'min_saving' must be in [0, 1), got {self.min_saving!r}")
        if self.verify_tol is not None and not (isinstance(self.verify_tol, (int, float)) and self.verify_tol > 0):
            raise ValueError(f"bdpass: option 'verify_tol' must be a positive number, got {self.verify_tol!r}")
        if not isinstance(self.inductor, Mapping):
            raise TypeError("bdpass: option 'inductor' must be a dict of Inductor config patches")
