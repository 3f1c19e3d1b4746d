"""Callable packages: ``bdpass.diff(...)`` and ``bdpass.prepare(...)`` call one function of
the package, while ``bdpass.diff.<name>`` stay the package's names and submodules."""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable


def make_callable(module_name: str, fn: Callable[..., Any]) -> None:
    """Make the module ``module_name`` callable: calling it calls ``fn`` with the same
    arguments, and its ``__signature__`` is that of ``fn``. Call it from the module's own body
    (``make_callable(__name__, fn)``), once ``fn`` is defined or imported."""
    module = sys.modules[module_name]

    class _CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    module.__class__ = _CallableModule
    module.__signature__ = inspect.signature(fn)
