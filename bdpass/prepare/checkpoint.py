"""Saving and loading prepared models with the usual tools, never factorizing on load.

A prepared model's tensors are in its ``state_dict`` like any module's (factors under the
replacing modules' names, folded partner weights under their own names). The replaced
weights are not: under each one's name (``<module>.weight``) is the replacing module's
*marker*, a buffer with no elements (shape ``(0,)``, :data:`.modules.MARKER`), so that a
loader building the original architecture (transformers without ``import bdpass``, a plain
``load_state_dict``) fails on a size mismatch instead of leaving random weights. A state
without markers (saved before they existed) loads all the same. What a fresh
model of the same architecture lacks to accept that ``state_dict`` is the *plan*: which
modules were replaced by what, with which shapes. :func:`plan_of` reads it off a prepared
model (every prepared module describes itself); :func:`apply_plan` gives a fresh model the
same modules, allocated but empty (a *skeleton*); then ``load_state_dict`` fills them.

The plan is a small JSON document::

    {"format": "bdpass.plan/1", "bdpass_version": "0.1.0",
     "modules": {"model.layers.0.self_attn.kv_b_proj":
                    {"type": "BDLinear", "replaces": "Linear", "in_features": 512,
                     "out_features": 4096, "tables": [128, ..., 0],
                     "blocks": [[table, first column, width, has_bias], ...], "dtype": "float32"},
                 "model.layers.0.mlp.up.u_proj":
                    {"type": "PivotLinear", "replaces": "Linear", "in_features": 1024, "rank": 256,
                     "out_features": 1024, "bias": true, "restore_order": true, "dtype": "float32"},
                 "model.layers.0.mlp.up.v_proj":
                    {"type": "Absorbed", "replaces": "Linear", "in_features": 1024, "out_features": 256,
                     "into": "model.layers.0.mlp.up.u_proj"}},
     "folded": ["model.layers.0.self_attn.q_proj.weight", ...]}

``folded`` names the weights ``B`` was folded into (same shapes: nothing to allocate;
informational).

Where it is stored:

* safetensors (:func:`save_prepared` / :func:`load_prepared`): the model's ``state_dict``
  (tied tensors once, as ``safetensors.torch.save_model`` writes them) with the plan in the
  file's metadata under ``"bdpass.plan"``.
* transformers (``model.save_pretrained`` / ``from_pretrained``): ``prepare`` puts the plan
  in ``model.config.quantization_config`` (``{"quant_method": "bdpass", "plan": ...}``, a
  transformers quantization method that ``import bdpass`` registers, see
  :mod:`.hf_quantizer`) and, for earlier bdpass versions, in ``model.config.bdpass``;
  ``save_pretrained`` writes both into ``config.json`` next to the weights (one file or
  shards). transformers' own ``from_pretrained`` then builds the prepared modules before the
  weights load and reads their tensors like any other; :func:`from_pretrained` is that call,
  and also loads folders whose plan is only in ``config.bdpass``.

No pickle anywhere: JSON and safetensors only.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn as nn

from .modules import PREPARED_TYPES, PreparedModule, from_spec

__all__ = ["PLAN_FORMAT", "METADATA_KEY", "plan_of", "apply_plan", "read_plan", "save_prepared", "load_prepared",
           "from_pretrained", "set_config_plan", "rebase_plan"]

PLAN_FORMAT = "bdpass.plan/1"
METADATA_KEY = "bdpass.plan"


def _version() -> str:
    from .. import __version__

    return __version__


def plan_of(model: nn.Module) -> dict:
    """The plan of a prepared model (see the module docstring)."""
    modules = {path: m.spec() for path, m in model.named_modules() if isinstance(m, PREPARED_TYPES)}
    folded: list[str] = []
    rep = getattr(model, "bdpass_report", None)
    if rep is not None:
        folded = sorted({n for e in rep.edits for n in e["folded"]})
    else:
        old = getattr(getattr(model, "config", None), "bdpass", None)
        if isinstance(old, dict):
            folded = list(old.get("folded", []))
    return {"format": PLAN_FORMAT, "bdpass_version": _version(), "modules": modules, "folded": folded}


def set_config_plan(model: nn.Module, plan: dict) -> None:
    """Record the plan in a transformers model's config: ``config.quantization_config`` (a
    :class:`~bdpass.prepare.hf_quantizer.BDPassConfig`, what transformers' own
    ``from_pretrained`` reads once bdpass is imported) and ``config.bdpass`` (the same plan,
    what earlier bdpass versions read). A config quantized by another method keeps its
    ``quantization_config``."""
    cfg = getattr(model, "config", None)
    try:
        from transformers import PretrainedConfig
    except Exception:
        return
    if not isinstance(cfg, PretrainedConfig):
        return
    cfg.bdpass = plan
    from . import hf_quantizer

    if not hf_quantizer.available():
        return
    have = getattr(cfg, "quantization_config", None)
    method = have.get("quant_method") if isinstance(have, dict) else getattr(have, "quant_method", None)
    if have is not None and method != hf_quantizer.QUANT_METHOD:
        import logging

        logging.getLogger("bdpass").warning(
            "bdpass: the model's config is quantized with %r; the plan is only in config.bdpass, so only "
            "bdpass.from_pretrained loads a save_pretrained folder of it", method)
        return
    cfg.quantization_config = hf_quantizer.BDPassConfig(plan)


def _check_plan(plan: Any, where: str) -> dict:
    if isinstance(plan, str):
        plan = json.loads(plan)
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT or not isinstance(plan.get("modules"), dict):
        raise ValueError(f"bdpass: {where} holds no prepared-model plan of format {PLAN_FORMAT!r}")
    return plan


def _features(m: nn.Module) -> tuple[str | None, int | None, int | None]:
    from .edits import module_kind

    kind = module_kind(m)
    if kind == "Linear":
        return kind, m.in_features, m.out_features
    if kind == "Conv1D":
        return kind, int(m.weight.shape[0]), int(m.weight.shape[1])
    return None, None, None


def apply_plan(model: nn.Module, plan: Any) -> nn.Module:
    """Give ``model`` (a fresh model of the architecture the plan was made on) the plan's
    prepared modules, allocated on each replaced module's device and in its dtype but not
    filled: the skeleton that ``load_state_dict`` of a prepared model's state fills. Nothing
    is factorized. Raises ``ValueError`` naming the first module that does not match."""
    plan = _check_plan(plan, "the plan given")
    for path, spec in plan["modules"].items():
        try:
            m = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"bdpass: the plan replaces module {path!r}, which this model does not have; "
                             f"it was prepared for a different architecture") from None
        if isinstance(m, PREPARED_TYPES):
            want = {k: v for k, v in spec.items() if k != "dtype"}
            if {k: v for k, v in m.spec().items() if k != "dtype"} != want:
                raise ValueError(f"bdpass: {path} is already a prepared module of another shape")
            continue
        kind, d_in, d_out = _features(m)
        cls = PreparedModule._types.get(spec.get("type"))
        if cls is None:
            raise ValueError(f"bdpass: unknown prepared module type {spec.get('type')!r} in the plan at {path}")
        want = cls.replaced_features(spec)
        if kind != spec.get("replaces") or (d_in, d_out) != want:
            have = f"{kind or type(m).__name__}({d_in}, {d_out})" if kind else type(m).__name__
            raise ValueError(f"bdpass: the plan replaces {path} = {spec.get('replaces')}({want[0]}, {want[1]}), "
                             f"this model has {have}; it was prepared for a different architecture")
        w = m.weight
        new = from_spec(spec, device=w.device, dtype=w.dtype, requires_grad=w.requires_grad)
        parent_path, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, name, new)
    set_config_plan(model, plan)
    return model


def rebase_plan(model: nn.Module, plan: Any) -> dict:
    """The plan with its module paths as ``model`` names them. A transformers base model
    (``AutoModel``) loaded from the checkpoint of a model with a head names its modules
    without the ``base_model_prefix`` (``layers.0...`` for ``model.layers.0...``), and the
    other way round; any other plan comes back as it is (``apply_plan`` then says what does
    not match)."""
    plan = _check_plan(plan, "the plan given")
    paths = list(plan["modules"])
    prefix = getattr(model, "base_model_prefix", "") or ""

    def has(path: str) -> bool:
        try:
            model.get_submodule(path)
        except AttributeError:
            return False
        return True

    if not prefix or not paths or all(has(p) for p in paths):
        return plan
    dot = f"{prefix}."
    if all(p.startswith(dot) and has(p[len(dot):]) for p in paths):
        def move(name: str) -> str:
            return name[len(dot):] if name.startswith(dot) else name
    elif all(has(dot + p) for p in paths):
        def move(name: str) -> str:
            return dot + name
    else:
        return plan
    modules = {}
    for path, spec in plan["modules"].items():
        spec = dict(spec)
        if "into" in spec:
            spec["into"] = move(spec["into"])
        modules[move(path)] = spec
    return {**plan, "modules": modules, "folded": [move(n) for n in plan.get("folded", [])]}


# ============================================================================ safetensors
def save_prepared(model: nn.Module, path: Any, metadata: dict | None = None) -> None:
    """Write ``model.state_dict()`` to the safetensors file ``path`` (tied tensors once) with
    the plan in its metadata. Read it back with :func:`load_prepared`."""
    from safetensors.torch import save_model

    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta[METADATA_KEY] = json.dumps(plan_of(model))
    save_model(model, str(path), metadata=meta)


def _config_plan(config: dict, where: str) -> dict:
    """The plan in a transformers ``config.json``: ``quantization_config`` (``"quant_method":
    "bdpass"``), else ``bdpass`` (folders saved before bdpass was a transformers
    quantization method)."""
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "bdpass":
        return _check_plan(qc.get("plan"), f"{where} (quantization_config)")
    return _check_plan(config.get("bdpass"), where)


def read_plan(path: Any) -> dict:
    """The plan stored in a safetensors file written by :func:`save_prepared`, or in a
    transformers checkpoint directory's ``config.json``."""
    path = str(path)
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            return _config_plan(json.load(f), f"{path}/config.json")
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return _check_plan(meta.get(METADATA_KEY), path)


def load_prepared(model: nn.Module, path: Any, *, strict: bool = True) -> nn.Module:
    """Load a file written by :func:`save_prepared` into ``model``, a fresh model of the
    same architecture and config: the plan is applied (:func:`apply_plan`), then every tensor
    is loaded from the file (``strict``: the file and the model hold the same names).
    Returns ``model``. Nothing is factorized."""
    from safetensors.torch import load_model

    apply_plan(model, read_plan(path))
    missing, unexpected = load_model(model, str(path), strict=strict)
    if not strict and (missing or unexpected):
        import logging

        logging.getLogger("bdpass").info("bdpass.load_prepared: missing %s, unexpected %s", missing, unexpected)
    return model


# ============================================================================ transformers
def from_pretrained(model_class: Any, path: Any, /, **kwargs: Any) -> nn.Module:
    """Load a prepared transformers model saved with ``save_pretrained``: the same as
    ``model_class.from_pretrained(path, **kwargs)`` (``model_class``: the model's class or an
    ``AutoModel*`` class; ``kwargs`` as for transformers, e.g. ``dtype``), which builds the
    plan's prepared modules before the weights load (:mod:`.hf_quantizer`). A folder saved
    before the plan went to ``config.quantization_config`` keeps it only in
    ``config.bdpass``: it is passed as ``quantization_config=BDPassConfig(plan)`` and loads
    the same way. Nothing is factorized."""
    from . import hf_quantizer

    if not hf_quantizer.register():
        raise ImportError("bdpass.from_pretrained needs a transformers with out-of-tree quantization methods "
                          "(transformers.quantizers.register_quantizer)")
    local = os.path.join(str(path), "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            config = json.load(f)
        plan = _config_plan(config, local)
        qc = config.get("quantization_config")
        if not (isinstance(qc, dict) and qc.get("quant_method") == hf_quantizer.QUANT_METHOD):
            kwargs.setdefault("quantization_config", hf_quantizer.BDPassConfig(plan))
    return model_class.from_pretrained(path, **kwargs)
