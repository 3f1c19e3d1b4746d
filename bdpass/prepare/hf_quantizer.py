"""Prepared checkpoints load with transformers' own ``from_pretrained``: bdpass as an
out-of-tree transformers quantization method (``"quant_method": "bdpass"``).

A prepared transformers model carries its plan (:mod:`.checkpoint`) in
``config.quantization_config`` as a ``BDPassConfig``; ``save_pretrained`` writes it into
``config.json``::

    "quantization_config": {"quant_method": "bdpass", "plan": {"format": "bdpass.plan/1", ...}}

Once bdpass is registered, ``AutoModelForCausalLM.from_pretrained(dir)`` finds the method in
the config and hands the model to ``BDPassHfQuantizer``, which gives it the plan's prepared
modules (:func:`.checkpoint.apply_plan`) while it is still an empty skeleton on the meta
device, before any weight is read. transformers then loads the checkpoint's factor tensors
straight into them, like any other parameter: nothing is factorized, nothing is initialized
twice, no missing or unexpected keys. A prepared tensor that the checkpoint lacks is an
error, never an uninitialized value.

Where a replaced weight was, the checkpoint holds the prepared module's zero-element marker
(``<module>.weight``, :data:`.modules.MARKER`): matched by the prepared modules here, it is a
size mismatch for a transformers that does not know bdpass, which then refuses to load
(``RuntimeError``: "You set `ignore_mismatched_sizes` to `False`, thus raising an error")
instead of returning the original architecture with random weights.

``import bdpass`` calls :func:`install`: it registers bdpass at once where transformers'
quantizers are already imported, and otherwise right after transformers imports them (its
``from_pretrained`` does), so that importing bdpass does not import transformers (about a
second) and works without it. :func:`register` registers at once (idempotent).

Only the public hooks are used (``register_quantization_config``, ``register_quantizer``,
``QuantizationConfigMixin``, ``HfQuantizer._process_model_before_weight_loading`` /
``_process_model_after_weight_loading``, ``is_serializable``, ``is_trainable``).
"""
from __future__ import annotations

import copy
import importlib.abc
import importlib.util
import logging
import re
import sys
from typing import Any

__all__ = ["QUANT_METHOD", "install", "register", "available", "BDPassConfig", "BDPassHfQuantizer"]

QUANT_METHOD = "bdpass"
_AFTER = "transformers.quantizers.auto"     # the module that holds transformers' registries
_log = logging.getLogger("bdpass")
_classes: Any = None                        # (BDPassConfig, BDPassHfQuantizer), False: unavailable


def _define(HfQuantizer: Any, QuantizationConfigMixin: Any) -> tuple[Any, Any]:
    class BDPassConfig(QuantizationConfigMixin):
        """``config.quantization_config`` of a prepared model: ``{"quant_method": "bdpass",
        "plan": <plan>}`` (the plan of :func:`bdpass.plan_of`)."""

        def __init__(self, plan: Any = None, **kwargs: Any):
            from .checkpoint import _check_plan

            kwargs.pop("quant_method", None)
            if kwargs:
                _log.debug("bdpass: quantization_config entries ignored: %s", sorted(kwargs))
            self.quant_method = QUANT_METHOD
            self.plan = copy.deepcopy(_check_plan(plan, "quantization_config"))

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "plan": copy.deepcopy(self.plan)}

        def __eq__(self, other: Any) -> bool:
            return isinstance(other, BDPassConfig) and other.plan == self.plan

        __hash__ = None  # type: ignore[assignment]

    class BDPassHfQuantizer(HfQuantizer):
        """Builds the plan's prepared modules on the model skeleton before the weights load.

        ``pre_quantized`` (the plan came with the checkpoint's config) or not (the plan was
        passed as ``quantization_config=BDPassConfig(plan)``, as :func:`bdpass.from_pretrained`
        does for folders that keep the plan only under ``config.bdpass``): either way the
        checkpoint must hold every prepared tensor; nothing is prepared while loading."""

        requires_calibration = False

        def __init__(self, quantization_config: Any, **kwargs: Any):
            super().__init__(quantization_config, **kwargs)
            self._prepared: list[str] = []

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            return None

        def _process_model_before_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            from .checkpoint import apply_plan, rebase_plan
            from .modules import MARKER

            plan = rebase_plan(model, self.quantization_config.plan)
            apply_plan(model, plan)
            # the empty marker buffers (modules.MARKER) carry no value: a checkpoint saved
            # before they existed lacks them, and is complete all the same
            ignore = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
            ignore.update(rf"(^|\.){re.escape(p)}\.{MARKER}$" for p in plan["modules"])
            model._keys_to_ignore_on_load_missing = ignore
            # the plan as this model names its modules (a base model loaded from the
            # checkpoint of a model with a head drops the prefix): what it will save
            self.quantization_config.plan = plan
            self._prepared = list(plan["modules"])
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            _check_loaded(model, self._prepared)
            # The prepared modules hold ordinary floating-point factors (and int64 pivot
            # tables): the model casts (.half(), .to(dtype)) like the model that was prepared.
            model.is_quantized = False
            return model

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return True

        @property
        def is_compileable(self) -> bool:
            return True

    for cls in (BDPassConfig, BDPassHfQuantizer):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return BDPassConfig, BDPassHfQuantizer


def _get_classes() -> tuple[Any, Any] | None:
    global _classes
    if _classes is None:
        try:
            from transformers.quantizers.auto import register_quantization_config, register_quantizer  # noqa: F401
            from transformers.quantizers.base import HfQuantizer
            from transformers.utils.quantization_config import QuantizationConfigMixin
        except Exception:   # no transformers, or one without out-of-tree quantization methods
            _classes = False
        else:
            _classes = _define(HfQuantizer, QuantizationConfigMixin)
    return _classes or None


def __getattr__(name: str) -> Any:
    if name in ("BDPassConfig", "BDPassHfQuantizer"):
        classes = _get_classes()
        if classes is None:
            raise AttributeError(f"{__name__}.{name} needs transformers with out-of-tree quantization methods")
        return classes[name == "BDPassHfQuantizer"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def available() -> bool:
    """Whether the installed transformers can take bdpass as a quantization method (imports
    transformers' quantizers)."""
    return _get_classes() is not None


def register() -> bool:
    """Register bdpass with transformers now (idempotent). Returns whether it is registered:
    ``False`` where transformers is missing or too old for out-of-tree methods, or another
    package registered a method of that name."""
    classes = _get_classes()
    if classes is None:
        return False
    from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                              register_quantization_config, register_quantizer)

    for mapping, cls, reg in ((AUTO_QUANTIZATION_CONFIG_MAPPING, classes[0], register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, classes[1], register_quantizer)):
        have = mapping.get(QUANT_METHOD)
        if have is cls:
            continue
        if have is not None and (have.__module__, have.__qualname__) != (cls.__module__, cls.__qualname__):
            _log.warning("bdpass: transformers already has a quantization method %r (%s.%s); not replacing it",
                         QUANT_METHOD, have.__module__, have.__qualname__)
            return False
        if have is not None:        # this module was loaded again (importlib.reload): the newest wins
            del mapping[QUANT_METHOD]
        reg(QUANT_METHOD)(cls)
    return True


def install() -> None:
    """Register bdpass now if transformers' quantizers are imported, else right after
    transformers imports them; nothing where transformers is not installed."""
    if _AFTER in sys.modules:
        register()
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ImportError, ValueError):
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``transformers.quantizers.auto`` it takes the spec the other
    finders give and runs :func:`register` once that module has executed."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != _AFTER:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _RegisterAfterImport):
        self._loader, self._finder = loader, finder

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            register()
        except Exception as e:    # never break transformers' import
            _log.warning("bdpass: could not register the 'bdpass' quantization method with transformers: %s", e)

    def __getattr__(self, name: str) -> Any:       # get_source, get_filename, ... of the real loader
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)


def _check_loaded(model: Any, prepared: list[str]) -> None:
    """Every tensor of the prepared modules came from the checkpoint. transformers marks
    each tensor it loads (``_is_hf_initialized``); a prepared tensor it did not load would
    be left uninitialized (nothing knows how to initialize factors), so it is an error (the
    empty marker buffers hold nothing to initialize: they may be absent). Where this
    transformers marks no tensor at all, there is nothing to check against."""
    if not any(getattr(t, "_is_hf_initialized", False) for t in model.state_dict(keep_vars=True).values()):
        return
    lacking = []
    for path in prepared:
        for name, t in model.get_submodule(path).state_dict(keep_vars=True).items():
            if t.numel() == 0:      # the marker (modules.MARKER): no value to initialize
                continue
            if t.device.type != "meta" and not getattr(t, "_is_hf_initialized", False):   # meta: offloaded
                lacking.append(f"{path}.{name}")
    if lacking:
        raise ValueError(f"bdpass: the checkpoint lacks the prepared tensors {lacking[:5]}"
                         f"{' ...' if len(lacking) > 5 else ''}; they would be left uninitialized")
