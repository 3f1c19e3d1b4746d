"""Options of the ``bd`` backend (``torch.compile(m, backend="bd", options={...})``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

LOWERINGS = ("inductor", "aot_eager", "eager")

# Default error budget per dtype: the largest expected growth of rounding error a rewrite may
# have (see BDOptions). Measured on a trained MLA model (python benchmarks/bd_accuracy.py):
# in bf16/fp16, rewrites with expected growth <= 8 changed held-out per-token NLL by at most
# 1.1x the model's own rounding drift (its bf16/fp16 vs fp32 difference); in fp32, growth up
# to 100 kept the final logits within 2.6x of the original's fp32 error, changes of 1e-6
# nats per token (0.014% of the model's own bf16 drift).
DEFAULT_BUDGET = {torch.float64: 100.0, torch.float32: 100.0, torch.bfloat16: 8.0, torch.float16: 8.0}


@dataclass(frozen=True)
class BDOptions:
    """All knobs of the backend. Every field can be passed in ``options``.

    pifa, bd_qk, bd_vo  enable each rewrite family.
    error_budget        largest expected growth of rounding error a rewrite may have: by how
                        much the rewrite multiplies the typical rounding error of the
                        computation it replaces (PIFA: sqrt(1 + ||C'||_F^2 / d_out); BD, per
                        head: ||W B^-1||_F ||B||_F / (||W||_F sqrt(d_h)); measured growth
                        tracks both within a factor of ~1.5). None (default): 100 for
                        float32/float64 and 8 for bfloat16/float16 (``DEFAULT_BUDGET``). A site
                        over budget is skipped with the reason; validation also refuses
                        rewrites whose measured output error grows by more than the budget.
                        The worst-case first-order bound (PIFA 1 + ||C'||_2, BD cond(B)) is
                        reported as ``error_bound``.
    cost_model          decide by measurement: time the original computation and each
                        candidate lowering (BD: per-head, grouped and shared bases; PIFA: the
                        factorized chain) on the graph's device at its token count, with
                        synthetic factors of the site's shapes (bdpass.timing; cached per
                        machine), and keep the fastest form only if it beats the original by
                        the margin of bdpass.cost; the roofline of bdpass.cost decides only
                        where nothing can be timed (fake or meta tensors). False applies every
                        legal rewrite in its most accurate form (per-head bases).
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
    error_budget: float | None = None
    min_saving: float = 0.02
    cost_model: bool = True
    lowering: str = "inductor"
    verify: bool = False
    verify_tol: float | None = None
    release_weights: bool = False
    validate: bool = True
    strict: bool = False
    inductor: Mapping[str, Any] = field(default_factory=dict)

    def budget_for(self, dtype: torch.dtype | None) -> float:
        """The error budget for computations in ``dtype``."""
        if self.error_budget is not None:
            return float(self.error_budget)
        return DEFAULT_BUDGET.get(dtype, DEFAULT_BUDGET[torch.bfloat16])

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
        if self.error_budget is not None and (not isinstance(self.error_budget, (int, float))
                                              or not self.error_budget >= 1.0):
            raise ValueError(f"bdpass: option 'error_budget' must be None or a number >= 1, "
                             f"got {self.error_budget!r}")
        if not isinstance(self.min_saving, (int, float)) or not 0.0 <= self.min_saving < 1.0:
            raise ValueError(f"bdpass: option 'min_saving' must be in [0, 1), got {self.min_saving!r}")
        if self.verify_tol is not None and not (isinstance(self.verify_tol, (int, float)) and self.verify_tol > 0):
            raise ValueError(f"bdpass: option 'verify_tol' must be a positive number, got {self.verify_tol!r}")
        if not isinstance(self.inductor, Mapping):
            raise TypeError("bdpass: option 'inductor' must be a dict of Inductor config patches")
