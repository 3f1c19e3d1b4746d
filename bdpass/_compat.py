"""The private torch internals that bdpass touches and that move between releases, in one
place: Dynamo's sources and restarts, Inductor's compile entry and mode options, fake
tensors, DTensor, structured tracing, the export flag, guards on module attributes; and
one private module of transformers (its checkpoint loading, for ``bdpass prepare``).

Supported range: torch 2.11 (the GPU image) up to the newest PyPI release; anything
version-dependent is resolved here so that the rest of the package uses plain functions.
A few internals that have kept their spelling across that range are used where they are
needed: ``torch._dynamo.reset``/``graph_break``/``config`` (tests, ``prepare/capture.py``),
``torch._ops.OpOverload`` (``graph/ops.py``), ``torch.library`` and the custom ops'
registration (``inductor_lowerings/``).
"""
from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Sequence

import torch
import torch.fx

TORCH_VERSION = tuple(int(p) for p in re.findall(r"\d+", torch.__version__)[:2])


# ----------------------------------------------------------------------------- sources
def source_name(source: Any) -> str | None:
    """Dynamo's textual name of a source (a property in newer torch, a method before)."""
    if source is None:
        return None
    name = getattr(source, "name", None)
    if callable(name):
        name = name()
    return name if isinstance(name, str) else None


def placeholder_source(node: torch.fx.Node) -> Any:
    """The Dynamo source of a placeholder node, or None."""
    ga = node.meta.get("grapharg")
    if ga is not None and getattr(ga, "source", None) is not None:
        return ga.source
    return getattr(node, "_dynamo_source", None)


_TOKEN = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(-?\d+))\]|\.(\w+)")
_CONTAINERS = {"_modules", "_parameters", "_buffers"}


def qualified_name(source_text: str | None) -> str | None:
    """``L['self']._modules['layers']._modules['0']._parameters['weight']`` ->
    ``layers.0.weight``. A root other than ``self`` is kept as the first component."""
    if not source_text:
        return None
    m = re.match(r"^[LG]\[(?:'([^']*)'|\"([^\"]*)\")\]", source_text)
    if m:
        root = m.group(1) or m.group(2)
        rest = source_text[m.end():]
    else:
        root, rest = None, source_text
    parts = []
    for a, b, c, d in _TOKEN.findall(rest):
        tok = a or b or c or d
        if tok in _CONTAINERS:
            continue
        parts.append(tok)
    if root and root != "self":
        parts.insert(0, root)
    return ".".join(parts) if parts else root


def module_path_of(node: Any) -> str | None:
    """Path of the innermost module whose forward produced ``node``, relative to the
    compiled module (``layers.0.self_attn``; ``""`` for the compiled module itself), or
    None when Dynamo recorded no module stack. The name the forward gives its module
    argument (``self``, ``s``, ``args[0]`` behind a decorator) is never part of it."""
    stack = getattr(node, "meta", {}).get("nn_module_stack") if node is not None else None
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = path if isinstance(path, str) else str(path)
    if path.startswith(("L[", "G[")):
        return module_relative_parts(path)[1]
    return ".".join(t for t in re.split(r"[.\[\]]+", path) if t)


# ----------------------------------------------------------------------------- metadata
def example_value(node: Any) -> Any:
    """The (fake) value Dynamo recorded for a node, or None."""
    if not isinstance(node, torch.fx.Node):
        return None
    v = node.meta.get("example_value")
    if v is None:
        v = node.meta.get("val")
    return v


def detect_fake_mode(example_inputs: Sequence[Any]) -> Any:
    from torch._guards import detect_fake_mode as _detect

    return _detect(example_inputs)


def size_hint(s: Any) -> int | None:
    """Concrete value (or hint) of an int / SymInt; None if unknown."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        try:
            node = s.node
            hint = node.hint if hasattr(node, "hint") else None
            if hint is not None:
                return int(hint)
            return int(node.shape_env.size_hint(node.expr))
        except Exception:
            return None
    return None


# ----------------------------------------------------------------------------- graphs
def copy_graph_module(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, dict]:
    """A new GraphModule over a copy of ``gm``'s graph that AOTAutograd still accepts as
    a Dynamo graph (meta, ``_param_name_to_source`` and placeholder sources carried).
    Dynamo keeps using the original graph after the backend returns, so it must never
    be mutated."""
    g = torch.fx.Graph()
    val_map: dict = {}
    out = g.graph_copy(gm.graph, val_map)
    g.output(out)
    for old, new in val_map.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    new_gm = torch.fx.GraphModule(gm, g)
    new_gm.meta.update(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new_gm._param_name_to_source = gm._param_name_to_source
    return new_gm, val_map


def mark_new_placeholder(node: torch.fx.Node, value: torch.Tensor, fake_mode: Any) -> None:
    """Metadata a placeholder added by bdpass needs: a fake example value, no Dynamo
    source, and the 'static input' mark (weights: cudagraphs need not copy them)."""
    node._dynamo_source = None
    node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
    node.meta["example_value"] = fake_mode.from_tensor(value, static_shapes=True) if fake_mode else value


# ----------------------------------------------------------------------------- lowering
def inductor_config_for_mode(mode: str | None) -> dict:
    if not mode or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def lower(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], lowering: str,
          mode: str | None = None, inductor_options: dict | None = None) -> Callable:
    """Compile ``gm`` with the chosen lowering; returns an unboxed callable (``f(*args)``)."""
    if lowering == "eager":
        return gm.forward
    if lowering == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("aot_eager")(gm, list(example_inputs))
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_config_for_mode(mode)
    patches.update(inductor_options or {})
    return compile_fx(gm, list(example_inputs), config_patches=patches or None)


# ----------------------------------------------------------------------------- logging
def trace_artifact(name: str, payload_fn: Callable[[], str], encoding: str = "string") -> None:
    """Emit a ``TORCH_TRACE`` artifact (read with tlparse); a no-op when tracing is off."""
    try:
        from torch._logging import trace_structured

        trace_structured("artifact", metadata_fn=lambda: {"name": name, "encoding": encoding},
                         payload_fn=payload_fn)
    except Exception:
        pass


# ----------------------------------------------------------------------------- capture helpers
def is_exporting() -> bool:
    """True while ``torch.export`` traces (strict or not), False under ``torch.compile`` and
    in eager mode; safe to call from code that Dynamo traces.

    Reads the flag that ``torch.compiler.is_exporting()`` returns. Dynamo in torch 2.11
    folds a call of ``torch.compiler.is_exporting()`` to True in *every* trace, so under
    ``torch.compile`` it answers True (newer Dynamo reads the flag, as this does); the
    flag itself is right everywhere."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    if isinstance(flag, bool):
        return flag
    return torch.compiler.is_exporting()


def is_dynamo_restart(e: BaseException) -> bool:
    """True for Dynamo's signals to restart its analysis (e.g. TensorifyScalarRestartAnalysis
    under ``dynamic=True``): not failures, they must propagate out of a backend."""
    exc = getattr(torch._dynamo, "exc", None)
    restart = getattr(exc, "RestartAnalysis", None) if exc is not None else None
    return restart is not None and isinstance(e, restart)


@contextlib.contextmanager
def functorch_levels_restored():
    """Run a block that may enter functorch transforms (a traced graph of a model that uses
    ``torch.vmap`` holds ``_vmap_increment_nesting``/``_vmap_decrement_nesting`` calls) and
    leave the transform stack as it was, even when the block raised between an increment and
    its decrement. A level left behind would make Dynamo's own guard on the functorch state
    fail on the frame it just compiled."""
    from torch._C import _functorch as F
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    before = len(retrieve_all_functorch_interpreters())
    try:
        yield
    finally:
        pop = {F.TransformType.Vmap: F._vmap_decrement_nesting, F.TransformType.Grad: F._grad_decrement_nesting,
               F.TransformType.Jvp: F._jvp_decrement_nesting, F.TransformType.Functionalize: F._func_decrement_nesting}
        stack = retrieve_all_functorch_interpreters()
        while len(stack) > before and stack[-1].key() in pop:
            pop[stack[-1].key()]()
            stack = retrieve_all_functorch_interpreters()


def is_fake(t: Any) -> bool:
    """True for a tensor without data: a ``FakeTensor`` (Dynamo's example values, export) or a
    tensor on the meta device."""
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor) or (isinstance(t, torch.Tensor) and t.device.type == "meta")


def is_dtensor(t: Any) -> bool:
    """True for a ``DTensor`` or a parameter wrapping one (False on a torch built without
    distributed)."""
    try:
        from torch.distributed.tensor import DTensor
    except Exception:
        return False
    # ``.data`` only of a parameter: on a tensor inside a vmap it raises
    return isinstance(t, DTensor) or (isinstance(t, torch.nn.Parameter) and isinstance(t.data, DTensor))


def reset_code(code: Any) -> None:
    """Drop Dynamo's cache entries for one code object (no-op where unsupported)."""
    fn = getattr(torch._dynamo, "reset_code", None)
    if fn is not None:
        try:
            fn(code)
        except Exception:
            pass


# ----------------------------------------------------------------------------- module-relative names
_ROOT = re.compile(r"^[LG]\[(?:'[^']*'|\"[^\"]*\")\](?:\[(?:'[^']*'|\"[^\"]*\"|-?\d+)\])*")


def module_relative_parts(source_text: str) -> tuple[str | None, str]:
    """Split a Dynamo source into its root (the local or global that holds the module,
    with any subscripts into it: ``L['self']``, ``L['s']``, ``L['args'][0]``) and the
    dotted path below it (``layers.0.q_proj.weight``, container names dropped)."""
    m = _ROOT.match(source_text)
    root, rest = (m.group(0), source_text[m.end():]) if m else (None, source_text)
    parts = []
    for a, b, c, d in _TOKEN.findall(rest):
        tok = a or b or c or d
        if tok not in _CONTAINERS:
            parts.append(tok)
    return root, ".".join(parts)


def module_relative_name(source_text: str | None) -> str | None:
    """Name of a weight relative to the compiled module:
    ``L['s']._modules['q']._parameters['weight']`` -> ``q.weight``,
    ``L['args'][0]._modules['model']...`` -> ``model....``. A source with nothing below
    its root (a tensor passed as an argument) keeps the root's name (``w``, ``args.1``)."""
    if not source_text:
        return None
    root, path = module_relative_parts(source_text)
    if path:
        return path
    return qualified_name(root) if root else None


# ----------------------------------------------------------------------------- transformers loading
def load_checkpoint_tensors(model: Any, tensors: dict, dtype: Any) -> None:
    """Load checkpoint tensors (``name -> tensor``, names as the checkpoint spells them) into
    ``model`` (a transformers model, on the meta device where not yet loaded) the way
    ``from_pretrained`` does: through transformers' weight conversions (per-expert checkpoint
    tensors fused into one parameter, renamings), available from transformers 5
    (``transformers.core_model_loading``, a private module). Where that is missing or does
    not take the call, names must match the model's ``state_dict`` names and each tensor is
    assigned as it is (a parameter left unloaded is then reported by the caller)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig
    except ImportError:
        convert_and_load_state_dict_in_model = None
    if convert_and_load_state_dict_in_model is not None:
        try:
            config = LoadStateDictConfig(weight_mapping=get_model_conversion_mapping(model), dtype=dtype)
            convert_and_load_state_dict_in_model(model, tensors, config)
            return
        except (TypeError, AttributeError) as e:      # its signature moved: load by name
            import logging

            logging.getLogger("bdpass").info("bdpass: transformers' checkpoint loader did not take the call "
                                             "(%s: %s); loading tensors by name", type(e).__name__, e)
    own = model.state_dict(keep_vars=True)
    for name, t in tensors.items():
        if name not in own:
            continue
        owner, _, attr = name.rpartition(".")
        m = model.get_submodule(owner) if owner else model
        if attr in m._parameters:
            m._parameters[attr] = torch.nn.Parameter(t.to(own[name].dtype), requires_grad=False)
        else:
            m._buffers[attr] = t.to(own[name].dtype)


def checkpoint_key_targets(model: Any, keys: Sequence[str]) -> dict[str, tuple[frozenset, str]]:
    """For each checkpoint key, the names (in ``model.state_dict()``) of the tensors that
    transformers' loader makes from it, and the key of its loading group: the keys of one
    group are converted together (per-expert tensors fused into one parameter), so a
    tensor of the model is made from exactly the keys of the groups that name it. The
    routing is the loader's own (``transformers.core_model_loading.rename_source_key`` with
    the model's conversion mapping, as :func:`load_checkpoint_tensors` loads). Where that
    private module is missing or does not take the call, keys are the model's names
    (the by-name loading of :func:`load_checkpoint_tensors`). A key that loads nowhere gets
    no names."""
    own = model.state_dict(keep_vars=True)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [e for e in mapping if isinstance(e, WeightRenaming)]
        converters = [e for e in mapping if isinstance(e, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        prefix = getattr(model, "base_model_prefix", None)
        out = {}
        for key in keys:
            renamed, pattern = rename_source_key(key, renamings, converters, prefix, own)
            if renamed not in own and key in own:         # as the loader: only the prefix may change
                renamed, pattern = rename_source_key(key, [], [], prefix, own)
            if renamed not in own:
                out[key] = (frozenset(), renamed)
            elif pattern is None:
                out[key] = (frozenset({renamed}), renamed)
            else:
                tps = by_pattern[pattern].target_patterns
                names = {renamed.replace(tps[0], t) for t in tps} if tps else {renamed}
                out[key] = (frozenset(n for n in names | {renamed} if n in own), renamed)
        return out
    except (ImportError, TypeError, AttributeError, KeyError, ValueError) as e:
        import logging

        logging.getLogger("bdpass").info("bdpass: transformers' key routing not available (%s: %s); checkpoint "
                                         "keys are taken as the model's names", type(e).__name__, e)
    return {k: (frozenset({k}) if k in own else frozenset(), k) for k in keys}
