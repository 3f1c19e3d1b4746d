"""Prepared modules: the rewrites applied once, ahead of time, as an ordinary ``nn.Module``.

``bdpass.prepare(model, *example_args, **example_kwargs)`` captures the model's forward with
Dynamo as one static-shape graph, plans and applies the rewrites exactly as the ``bd``
backend does, and returns a :class:`PreparedModule` that runs the rewritten graph eagerly.
Its parameters and buffers are the derived (factorized) tensors plus the original weights
the rewritten graph still reads; original weights that the rewrites replaced are not kept.

The prepared module is a plain module, so the usual tools apply to it without bdpass:

* ``state_dict`` / safetensors: :func:`save_prepared` writes the tensors together with the
  rewritten graph, the rewrite report and per-tensor shapes and dtypes;
  :func:`load_prepared` rebuilds the module for an architecture-identical model from that
  file without factorizing anything (all tensors, factors included, come from the file);
* ``torch.compile(prepared, backend="inductor")``;
* ``torch.export.export(prepared, args)`` (and so ``torch.export.save``/``load`` and
  AOTInductor packaging).

What a prepared module is, precisely:

* Static. It computes with the tensors it holds. Its derived tensors are *not* recomputed
  when a weight changes (unlike the ``bd`` backend, which watches its source weights):
  changing the prepared module's tensors is the caller's business. The original weights it
  kept share storage with the model's (in-place edits of those show through); the ones the
  rewrites replaced are not referenced at all.
* Specialized to the example call: the tensor inputs' shapes and dtypes, which arguments
  were given, and the values of plain non-tensor arguments (``use_cache=False``, ...).
  A call that differs raises ``ValueError``; prepare again for other shapes. Arguments may
  be passed positionally or by keyword, either way.
* Inference only: captured and run as under ``torch.no_grad()``; its parameters do not
  require grad. Capture the model in the mode it will run in (usually ``model.eval()``).
* Outputs: the model's output structure is rebuilt when every leaf of it is either a
  tensor the graph computes or a plain constant (tensors, tuples, dicts and Hugging Face
  ``ModelOutput`` all qualify). Otherwise, or with ``prepared.flat_output = True``, the
  prepared module returns the flat tuple of tensors the captured graph returns.
* Devices are baked into the graph where the model's code names them (``torch.arange(...,
  device=x.device)``): prepare on the device the module will run on.
* Tied weights stay tied (one tensor under the name Dynamo saw first). Non-persistent
  buffers the graph reads become ordinary (persistent) buffers: the file must hold every
  tensor the graph needs.

File layout (:func:`save_prepared`): one safetensors file whose tensors are
``prepared.state_dict()`` (original weights under their names in the model, derived ones
under ``derived.*``) and whose metadata holds ``format``, ``bdpass_version``,
``torch_version``, ``report`` (``Report.to_json()``), ``tensors`` (per-tensor shape, dtype,
role) and ``graph`` (the rewritten graph as JSON data: operations are named, never pickled,
and on loading only the operations of the model's own graph and the few tensor operations
bdpass emits are accepted).
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import operator
import re
import time
import types
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree as pytree

from . import _compat
from .backend import node_records, rewrite_graph
from .options import BDOptions
from .report import GraphReport, Report
from .runtime import compare_outputs

log = logging.getLogger("bdpass")

__all__ = ["prepare", "save_prepared", "load_prepared", "PreparedModule"]

FORMAT = "bdpass.prepared/1"
DERIVED_PREFIX = "derived"
_CONST_PREFIX = "constants"
_WEIGHTS_PREFIX = "weights"     # for a model weight whose first name component is taken


@functools.lru_cache(maxsize=None)
def _reserved_names() -> frozenset:
    return frozenset(dir(PreparedModule)) | {"graph_module", "report", "flat_output", "prepare_seconds",
                                             DERIVED_PREFIX, _WEIGHTS_PREFIX}


# ============================================================================ capture
def _entry(self, args, kwargs):
    return self(*args, **kwargs)


class _Capture:
    """One Dynamo capture of ``model(*args, **kwargs)``: the graph, its example inputs and
    the model's output with the graph's outputs identified in it."""

    gm: torch.fx.GraphModule
    inputs: list
    output: Any
    graph_outputs: tuple
    result: Any = None


def _output_values(gm: torch.fx.GraphModule) -> list | None:
    """Empty tensors shaped like the graph's outputs (None if any is not a plain tensor)."""
    out_node = gm.graph.output_node()
    flat = out_node.args[0]
    if not isinstance(flat, (tuple, list)):
        return None
    vals = []
    for a in flat:
        v = _compat.example_value(a) if isinstance(a, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor) or any(_compat.size_hint(s) is None for s in v.shape):
            return None
        vals.append(v)
    return vals


def _capture(model: nn.Module, args: tuple, kwargs: dict,
             on_graph: Callable[[torch.fx.GraphModule, list], Any], what: str) -> _Capture:
    """Trace ``model(*args, **kwargs)`` into one graph (fullgraph, static shapes) and call
    ``on_graph(gm, example_inputs)`` on it. The model is not run: the graph's outputs are
    stood in by empty tensors, which is all the output structure needs."""
    # A fresh code object per capture: Dynamo keeps its cache on the code object, so this
    # neither reuses nor disturbs anything compiled before (no torch._dynamo.reset()).
    code = _entry.__code__.replace()
    fn = types.FunctionType(code, _entry.__globals__, "_bdpass_capture")
    # Everything the backend sees goes through ``box``, emptied at the end: Dynamo may keep
    # the backend (and so its closure) alive, and it must not keep the model's weights.
    box: dict[str, Any] = {"cap": _Capture(), "errors": []}

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        cap = box["cap"]
        if hasattr(cap, "gm"):
            err = RuntimeError(f"bdpass.{what}: Dynamo produced more than one graph")
            box["errors"].append(err)
            raise err
        cap.gm, cap.inputs = gm, list(example_inputs)
        try:
            cap.result = on_graph(gm, cap.inputs)
        except BaseException as e:  # re-raised unwrapped below
            box["errors"].append(e)
            raise
        box["stand_in"] = _output_values(gm)

        def run(*a: Any) -> Any:
            stand_in = box["stand_in"]
            if stand_in is None:
                outs = box["cap"].gm.forward(*a)
            else:
                outs = tuple(torch.empty_strided(tuple(v.shape), tuple(v.stride()), dtype=v.dtype,
                                                 device=v.device) for v in stand_in)
            box["cap"].graph_outputs = tuple(outs)
            return outs

        return run

    compiled = torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)
    try:
        with torch.no_grad():
            box["cap"].output = compiled(model, args, kwargs)
    except Exception as e:
        errors = list(box["errors"])
        if errors:
            raise errors[0] from None
        if not _compat.is_dynamo_tracing_error(e):
            raise       # the model's own error
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
        why = "; ".join(lines[:1] + [ln for ln in lines[1:] if ln.startswith("Caused by")][:1])
        raise RuntimeError(
            f"bdpass.{what} needs the model's forward to compile into a single graph with static "
            f"shapes (torch.compile(fullgraph=True)), and Dynamo could not ({type(e).__name__}: "
            f"{why}). Remove the graph break, or use torch.compile(model, backend='bd') instead, "
            f"which handles several graphs") from e
    finally:
        cap = box["cap"]
        box.clear()
        _compat.reset_code(code)
    if not hasattr(cap, "gm"):
        raise RuntimeError(f"bdpass.{what}: Dynamo captured no graph (the forward computes nothing "
                           f"with tensors)")
    return cap


# ============================================================================ JSON encoding
class _Unsupported(ValueError):
    pass


def _qualified(target: Any) -> str:
    return _compat.qualified_target_name(target)


def _target_key(node: torch.fx.Node) -> str:
    return node.target if isinstance(node.target, str) else _qualified(node.target)


def _enc(a: Any) -> Any:
    if isinstance(a, torch.fx.Node):
        return {"n": a.name}
    if a is None or isinstance(a, (bool, str)):
        return a
    if isinstance(a, int):
        return a
    if isinstance(a, float):
        return a if math.isfinite(a) else {"float": repr(a)}
    if isinstance(a, tuple):
        return {"tuple": [_enc(x) for x in a]}
    if isinstance(a, list):
        return [_enc(x) for x in a]
    if isinstance(a, dict):
        if not all(isinstance(k, str) for k in a):
            raise _Unsupported(f"dict with non-string keys {list(a)!r}")
        return {"dict": [[k, _enc(v)] for k, v in a.items()]}
    if isinstance(a, slice):
        return {"slice": [_enc(a.start), _enc(a.stop), _enc(a.step)]}
    if a is Ellipsis:
        return {"ellipsis": None}
    if isinstance(a, torch.dtype):
        return {"dtype": str(a).replace("torch.", "")}
    if isinstance(a, torch.device):
        return {"device": str(a)}
    if isinstance(a, torch.memory_format):
        return {"memory_format": str(a).replace("torch.", "")}
    if isinstance(a, torch.layout):
        return {"layout": str(a).replace("torch.", "")}
    if isinstance(a, complex):
        return {"complex": [_enc(a.real), _enc(a.imag)]}
    raise _Unsupported(f"argument of type {type(a).__name__} ({a!r:.80})")


def _torch_attr(name: str, kind: type) -> Any:
    v = getattr(torch, name, None)
    if not isinstance(v, kind):
        raise ValueError(f"bdpass: invalid {kind.__name__} {name!r} in a prepared graph")
    return v


def _dec(a: Any, env: dict) -> Any:
    if isinstance(a, list):
        return [_dec(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    if len(a) != 1:
        raise ValueError(f"bdpass: malformed argument {a!r} in a prepared graph")
    (tag, v), = a.items()
    if tag == "n":
        return env[v]
    if tag == "float":
        return float(v)
    if tag == "tuple":
        return tuple(_dec(x, env) for x in v)
    if tag == "dict":
        return {k: _dec(x, env) for k, x in v}
    if tag == "slice":
        return slice(*(_dec(x, env) for x in v))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "dtype":
        return _torch_attr(v, torch.dtype)
    if tag == "device":
        return torch.device(v)
    if tag == "memory_format":
        return _torch_attr(v, torch.memory_format)
    if tag == "layout":
        return _torch_attr(v, torch.layout)
    if tag == "complex":
        return complex(_dec(v[0], env), _dec(v[1], env))
    raise ValueError(f"bdpass: unknown argument tag {tag!r} in a prepared graph")


def _val_sig(v: Any) -> Any:
    """Shape/dtype signature of a node's example value."""
    if isinstance(v, torch.Tensor):
        return {"shape": [_dim(s) for s in v.shape], "dtype": _dtype_name(v.dtype)}
    if isinstance(v, (tuple, list)):
        return [_val_sig(x) for x in v]
    if isinstance(v, (bool, int, float)) or v is None:
        return v if not isinstance(v, float) or math.isfinite(v) else repr(v)
    if isinstance(v, torch.SymInt):
        return _dim(v)
    return type(v).__name__


def _dim(s: Any) -> Any:
    h = _compat.size_hint(s)
    return h if h is not None else str(s)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _fmt_sig(sig: Any) -> str:
    if isinstance(sig, dict) and "shape" in sig:
        return f"{tuple(sig['shape'])} {sig['dtype']}"
    return json.dumps(sig)


def _describe_node(n: torch.fx.Node, with_val: bool) -> dict:
    if n.op in ("get_attr", "call_module"):
        raise _Unsupported(f"graph node {n.name} is a {n.op} ({n.target})")
    d = {"name": n.name, "op": n.op,
         "target": None if n.op in ("placeholder", "output") else _target_key(n),
         "args": _enc(n.args) if n.op != "placeholder" else None,
         "kwargs": _enc(dict(n.kwargs)) if n.kwargs else None}
    if with_val and n.op != "output":
        d["val"] = _val_sig(_compat.example_value(n))
    return d


# ============================================================================ safe op resolution
# Operations a rewrite may add to a graph (beyond those of the model's own graph).
_SAFE_FUNCTIONS: dict[str, Callable] = {}
for _f in (torch._C._nn.linear, torch.nn.functional.linear, torch.index_select, torch.unflatten,
           torch.einsum, torch.flatten, torch.add, torch.sub, torch.mul, torch.cat, torch.matmul,
           torch.mm, torch.bmm, torch.addmm, torch.narrow, torch.reshape, torch.transpose,
           torch.permute, torch.squeeze, torch.unsqueeze, torch.split, torch.gather, torch.stack,
           operator.getitem, operator.add, operator.sub, operator.mul, operator.matmul, operator.neg):
    _SAFE_FUNCTIONS[_qualified(_f)] = _f


def _bdpass_op(key: str) -> Callable | None:
    """The project's own custom ops (what the rewrites emit), by qualified name."""
    import inductor_lowerings  # noqa: F401  (registers the ops)

    for name in ("bd_linear", "pivot_linear", "bd_project"):
        op = getattr(torch.ops.bdpass, name).default
        if _qualified(op) == key:
            return op
    return None
_SAFE_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "t", "unsqueeze", "squeeze",
                 "flatten", "unflatten", "to", "expand", "narrow", "split", "add", "mul", "sub",
                 "matmul", "index_select", "float", "half", "bfloat16", "double", "type_as", "clone"}


class _Resolver:
    """Maps the names in a stored graph back to callables, taking them only from the
    model's own (freshly captured) graph or from the short list above."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.by_name: dict[str, Any] = {}
        self.by_key: dict[str, Any] = {}
        self.methods: set[str] = set()
        for n in gm.graph.nodes:
            if n.op == "call_function":
                self.by_name[n.name] = n.target
                self.by_key.setdefault(_target_key(n), n.target)
            elif n.op == "call_method":
                self.by_name[n.name] = n.target
                self.methods.add(n.target)

    def resolve(self, d: dict) -> Any:
        key, orig = d["target"], d.get("orig")
        if d["op"] == "call_method":
            if not isinstance(key, str) or not (key in self.methods or key in _SAFE_METHODS):
                raise ValueError(f"bdpass: prepared graph calls method {key!r}, which the model's "
                                 f"graph does not use")
            return key
        if orig is not None and orig in self.by_name:
            t = self.by_name[orig]
            if _qualified(t) != key:
                raise ValueError(f"bdpass: prepared graph node {d['name']} calls {key}, the model's "
                                 f"graph node {orig} calls {_qualified(t)}")
            return t
        if key in self.by_key:
            return self.by_key[key]
        if key in _SAFE_FUNCTIONS:
            return _SAFE_FUNCTIONS[key]
        op = _bdpass_op(key)
        if op is not None:
            return op
        raise ValueError(f"bdpass: prepared graph calls {key!r}, which neither the model's graph "
                         f"nor bdpass's rewrites use")


def _build_graph_module(nodes: list[dict], resolver: _Resolver) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    env: dict[str, torch.fx.Node] = {}
    for d in nodes:
        op = d["op"]
        if op == "placeholder":
            env[d["name"]] = g.placeholder(d["name"])
        elif op in ("call_function", "call_method"):
            target = resolver.resolve(d)
            args = _dec(d["args"], env)
            kwargs = _dec(d["kwargs"], env) if d.get("kwargs") else {}
            env[d["name"]] = g.create_node(op, target, tuple(args), kwargs, name=d["name"])
        elif op == "output":
            g.output(_dec(d["args"], env)[0])
        else:
            raise ValueError(f"bdpass: unsupported node kind {op!r} in a prepared graph")
    g.lint()
    return torch.fx.GraphModule(nn.Module(), g, class_name="PreparedGraph")


# ============================================================================ sources
_ROOT = re.compile(r"^L\[(?:'([^']*)'|\"([^\"]*)\")\]")
_STEP = re.compile(r"\[(?:'([^']*)'|\"([^\"]*)\"|(-?\d+))\]|\.([A-Za-z_]\w*)")


def _input_path(src: str) -> list | None:
    """``L['args'][0]`` -> [["item", "args"], ["item", 0]]; None if not a plain access path
    into the call's ``args``/``kwargs``."""
    m = _ROOT.match(src)
    if not m or (m.group(1) or m.group(2)) not in ("args", "kwargs"):
        return None
    path = [["item", m.group(1) or m.group(2)]]
    rest, pos = src[m.end():], 0
    while pos < len(rest):
        s = _STEP.match(rest, pos)
        if not s:
            return None
        a, b, c, attr = s.groups()
        if attr is not None:
            path.append(["attr", attr])
        elif c is not None:
            path.append(["item", int(c)])
        else:
            path.append(["item", a if a is not None else b])
        pos = s.end()
    return path


def _follow(root: Any, path: list) -> Any:
    v = root
    for kind, k in path:
        if kind == "attr":
            if not isinstance(k, str) or k.startswith("__"):
                raise ValueError(f"bdpass: invalid argument path {path!r}")
            v = getattr(v, k)
        else:
            v = v[k]
    return v


def _path_text(path: list) -> str:
    out = ""
    for i, (kind, k) in enumerate(path):
        if i == 0:
            out = k
        elif kind == "attr":
            out += f".{k}"
        else:
            out += f"[{k!r}]"
    return out


def _sanitize(text: str) -> str:
    return re.sub(r"\W+", "_", text).strip("_") or "t"


# ============================================================================ call form
def _signature_of(model: nn.Module) -> dict:
    """Names that can be passed positionally, in order; whether **kwargs is accepted."""
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return {"positional": None, "names": None}
    pos, names, var_kw = [], [], False
    for p in sig.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            pos.append(p.name)
            names.append(p.name)
        elif p.kind == p.KEYWORD_ONLY:
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            return {"positional": None, "names": None}
        elif p.kind == p.VAR_KEYWORD:
            var_kw = True
    return {"positional": pos, "names": None if var_kw else names}


def _normalize_call(args: tuple, kwargs: dict, n_args: int, kw_names: Sequence[str],
                    positional: list | None, known: Any) -> tuple[tuple, dict]:
    """Rearrange a call into the form of the example call (``n_args`` positional arguments,
    then the keywords ``kw_names``), using the forward's parameter names."""
    if len(args) == n_args and set(kwargs) == set(kw_names):
        return args, kwargs
    if positional is None:
        raise TypeError(f"bdpass: this prepared module takes {n_args} positional argument(s) "
                        f"and keyword argument(s) {sorted(kw_names)}, as in the example call")
    if len(args) > len(positional):
        raise TypeError(f"bdpass: too many positional arguments ({len(args)})")
    values = dict(zip(positional, args))
    for k, v in kwargs.items():
        if k in values:
            raise TypeError(f"bdpass: got multiple values for argument {k!r}")
        if known is not None and k not in known:
            raise TypeError(f"bdpass: unexpected keyword argument {k!r}")
        values[k] = v
    new_args = []
    for name in positional[:n_args]:
        if name not in values:
            raise TypeError(f"bdpass: missing argument {name!r} (given in the example call)")
        new_args.append(values.pop(name))
    new_kwargs = {}
    for k in kw_names:
        if k not in values:
            raise TypeError(f"bdpass: missing argument {k!r} (given in the example call)")
        new_kwargs[k] = values.pop(k)
    for k, v in values.items():
        if v is not None:
            raise ValueError(f"bdpass: argument {k!r} was not given in the example call, so the "
                             f"prepared graph cannot take it; prepare with it")
    return tuple(new_args), new_kwargs


def _plain_constant(v: Any) -> bool:
    return v is None or isinstance(v, (bool, int, float, str))


# ============================================================================ the module
class PreparedModule(nn.Module):
    """The rewritten graph of a model, as an ``nn.Module`` holding only the tensors it reads.

    Made by :func:`prepare` or :func:`load_prepared`. Attributes: ``report`` (the rewrite
    report, ``bdpass.Report``), ``graph_module`` (the rewritten FX graph it runs),
    ``derived_names`` (state-dict names of the derived tensors), ``flat_output`` (settable:
    return the graph's flat tuple of tensors instead of the model's output structure) and,
    after :func:`prepare`, ``prepare_seconds``.

    Tensors are registered under the model's own names (``layers.0.mlp.up.bias``; a name
    whose first component a module attribute already uses gets a ``weights.`` prefix) and
    derived ones under ``derived.*``: floating point ones as parameters that do not require
    grad, integer ones (pivot and permutation indices) as buffers."""

    def __init__(self, spec: dict, tensors: dict[str, torch.Tensor], resolver: _Resolver,
                 report: Report, out_plan: tuple | None):
        super().__init__()
        self._spec = spec
        self.report = report
        self.flat_output = out_plan is None
        self._out_plan = _Frozen(out_plan) if out_plan is not None else None
        self.graph_module = _build_graph_module(spec["graph"], resolver)
        call = spec["call"]
        self._n_args: int = call["n_args"]
        self._kw_names: tuple = tuple(call["kwarg_names"])
        self._kw_set = frozenset(self._kw_names)
        self._positional = call["positional"]
        self._known = None if call["names"] is None else frozenset(call["names"])
        self._constants = [(p, v) for p, v in call["constants"]]
        self._tensor_keys: list[str] = []
        # slots: ("input", path, shape, dtype, text) | ("tensor", key)
        self._slots: list[tuple] = []
        self._containers: dict[str, tuple[nn.Module, str]] = {}
        for s in spec["slots"]:
            if s["kind"] == "input":
                self._slots.append(("input", s["path"], tuple(s["shape"]), s["dtype"], _path_text(s["path"])))
            else:
                self._slots.append(("tensor", s["key"]))
        for s in spec["slots"]:
            if s["kind"] == "tensor":
                t = tensors[s["key"]]
                self._register(s["key"], t, as_parameter=s["parameter"])

    # ---------------------------------------------------------------- tensors
    def _register(self, key: str, t: torch.Tensor, as_parameter: bool) -> None:
        parts = key.split(".")
        mod: nn.Module = self
        for p in parts[:-1]:
            child = mod._modules.get(p) if p else None
            if child is not None and not isinstance(child, _TensorGroup):
                raise ValueError(f"bdpass: cannot register tensor {key!r} in a prepared module")
            if child is None:
                if not p or hasattr(mod, p):
                    raise ValueError(f"bdpass: cannot register tensor {key!r} in a prepared module")
                child = _TensorGroup()
                mod.add_module(p, child)
            mod = child
        leaf = parts[-1]
        if not leaf or hasattr(mod, leaf):
            raise ValueError(f"bdpass: cannot register tensor {key!r} in a prepared module")
        if as_parameter:
            mod.register_parameter(leaf, nn.Parameter(t, requires_grad=False))
        else:
            mod.register_buffer(leaf, t)
        self._containers[key] = (mod, leaf)
        self._tensor_keys.append(key)

    def _tensor(self, key: str) -> torch.Tensor:
        mod, leaf = self._containers[key]
        return getattr(mod, leaf)

    # ---------------------------------------------------------------- calling
    def _normalize(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if len(args) == self._n_args and kwargs.keys() == self._kw_set:
            return args, kwargs
        return _normalize_call(args, kwargs, self._n_args, self._kw_names, self._positional, self._known)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self._normalize(args, kwargs)
        root = {"args": args, "kwargs": kwargs}
        for path, want in self._constants:
            got = _follow(root, path)
            if got != want or type(got) is not type(want):
                raise ValueError(f"bdpass: argument {_path_text(path)} is {got!r}; the module was prepared "
                                 f"with {want!r} and its graph is specialized to that value")
        vals = []
        for slot in self._slots:
            if slot[0] == "tensor":
                vals.append(self._tensor(slot[1]))
                continue
            _, path, shape, dtype, text = slot
            v = _follow(root, path)
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"bdpass: argument {text} must be a tensor, got {type(v).__name__}")
            if tuple(v.shape) != shape or _dtype_name(v.dtype) != dtype:
                raise ValueError(f"bdpass: argument {text} has shape {tuple(v.shape)} and dtype "
                                 f"{_dtype_name(v.dtype)}; the module was prepared for {shape} {dtype} "
                                 f"(prepared graphs have static shapes: prepare again for other shapes)")
            vals.append(v)
        outs = self.graph_module(*vals)
        if self.flat_output or self._out_plan is None:
            return tuple(outs)
        spec, leaves = self._out_plan.value
        return pytree.tree_unflatten([outs[v] if kind == "out" else v for kind, v in leaves], spec)

    # ---------------------------------------------------------------- info
    @property
    def derived_names(self) -> list[str]:
        return [k for k in self._tensor_keys if k.startswith(DERIVED_PREFIX + ".")]

    def extra_repr(self) -> str:
        n = sum(1 for _ in self.graph_module.graph.nodes)
        b = sum(t.numel() * t.element_size() for t in self.state_dict().values())
        return (f"graph nodes={n}, tensors={len(self._tensor_keys)} "
                f"({len(self.derived_names)} derived), {b:,} bytes; "
                f"rewrites={len(self.report.rewrites)}")


class _Frozen:
    """An immutable value a module holds that deep copies (``torch.export`` makes one) share."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __deepcopy__(self, memo: dict) -> "_Frozen":
        return self


class _TensorGroup(nn.Module):
    """A namespace for some of a prepared module's tensors (mirrors the model's modules)."""

    def extra_repr(self) -> str:
        items = [f"{k}: {tuple(t.shape)}" for k, t in list(self._parameters.items()) + list(self._buffers.items())
                 if t is not None]
        return ", ".join(items[:6]) + (f", ... ({len(items)} tensors)" if len(items) > 6 else "")


def _out_plan(cap: _Capture) -> tuple | None:
    """(treespec, leaves) rebuilding the model's output from the graph's outputs, or None."""
    try:
        leaves, spec = pytree.tree_flatten(cap.output)
    except Exception:
        return None
    by_id = {id(t): k for k, t in enumerate(getattr(cap, "graph_outputs", ()))}
    plan = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if id(leaf) not in by_id:
                return None
            plan.append(("out", by_id[id(leaf)]))
        elif _plain_constant(leaf):
            plan.append(("const", leaf))
        else:
            return None
    return spec, plan


# ============================================================================ prepare
def _call_spec(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    sig = _signature_of(model)
    constants = []
    for i, a in enumerate(args):
        if _plain_constant(a):
            constants.append([[["item", "args"], ["item", i]], a])
    for k, a in kwargs.items():
        if _plain_constant(a):
            constants.append([[["item", "kwargs"], ["item", k]], a])
    return {"n_args": len(args), "kwarg_names": list(kwargs), "positional": sig["positional"],
            "names": sig["names"], "constants": constants}


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` on storage of its own size (so it can be saved, and frees what it was cut from)."""
    t = t.detach()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size() \
            or t.storage_offset() != 0:
        t = t.clone(memory_format=torch.contiguous_format)
    return t


def _describe(gm: torch.fx.GraphModule, inputs: list, new_gm: torch.fx.GraphModule, new_inputs: list,
              node_map: dict, args: tuple, kwargs: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON spec of a prepared module and the tensors it holds, from the captured graph
    ``gm`` and its rewritten copy ``new_gm`` (``node_map``: original node -> copy)."""
    root = {"args": args, "kwargs": kwargs}
    original = [_describe_node(n, True) for n in gm.graph.nodes]
    orig_ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for d, n in zip(original, orig_ph):
        d.update(_placeholder_role(n))
    orig_of = {new.name: old.name for old, new in node_map.items()}
    ph_role = {node_map[n].name: _placeholder_role(n) for n in orig_ph}
    new_ph = [n for n in new_gm.graph.nodes if n.op == "placeholder"]
    value_of = dict(zip((n.name for n in new_ph), new_inputs))
    graph, slots, tensors = [], [], {}
    for n in new_gm.graph.nodes:
        if n.op == "placeholder" and not n.users:
            continue          # inputs and weights the rewritten graph no longer reads
        d = _describe_node(n, False)
        d["orig"] = orig_of.get(n.name)
        graph.append(d)
        if n.op != "placeholder":
            continue
        t = value_of[n.name]
        if not isinstance(t, torch.Tensor):
            raise _Unsupported(f"graph input {n.name} is a {type(t).__name__}, not a tensor")
        sig = {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)}
        role = ph_role.get(n.name, {"role": "derived"})
        if role["role"] == "input":
            if _follow(root, role["path"]) is not t:
                raise _Unsupported(f"graph input {role['source']} could not be located in the call's arguments")
            slots.append({"kind": "input", "placeholder": n.name, "path": role["path"], **sig})
            continue
        if role["role"] == "derived":
            name = n.name[3:] if n.name.startswith("bd_") else n.name
            key = f"{DERIVED_PREFIX}.{name}"
            parameter = t.is_floating_point() or t.is_complex()
        else:
            key = role["key"]
            if key.split(".")[0] in _reserved_names():
                key = f"{_WEIGHTS_PREFIX}.{key}"
            parameter = isinstance(t, nn.Parameter)
        if key in tensors:
            raise _Unsupported(f"two graph inputs map to the same name {key!r}")
        tensors[key] = _compact(t) if role["role"] == "derived" else t.detach()
        slots.append({"kind": "tensor", "placeholder": n.name, "key": key, "role": role["role"],
                      "parameter": parameter, **sig})
    return {"format": FORMAT, "original": original, "graph": graph, "slots": slots,
            "call": None}, tensors


def _placeholder_role(n: torch.fx.Node) -> dict:
    src = _compat.source_name(_compat.placeholder_source(n))
    if src is None:
        raise _Unsupported(f"graph input {n.name} has no source")
    path = _input_path(src)
    if path is not None:
        return {"role": "input", "source": src, "path": path}
    if src.startswith("L['self']"):
        key = _compat.qualified_name(src)
        if key and all(p for p in key.split(".")):
            return {"role": "original", "source": src, "key": key}
    if src.startswith("L["):
        raise _Unsupported(f"graph input {src} is neither an argument of the call nor a tensor of the model")
    return {"role": "original", "source": src, "key": f"{_CONST_PREFIX}.{_sanitize(src)}"}


def prepare(model: nn.Module, /, *example_args: Any, options: Any = None,
            **example_kwargs: Any) -> PreparedModule:
    """Rewrite ``model`` once for these example inputs and return a :class:`PreparedModule`
    holding the factorized tensors (and the original weights the rewrites did not replace).

    ``options`` are the ``bd`` backend's (``bdpass.BDOptions``); ``lowering`` and ``inductor``
    do not apply, ``verify=True`` compares the prepared module with the captured graph on
    the example inputs once (raising ``bdpass.VerificationError``). The model must compile
    into a single static-shape graph (``fullgraph=True``); it is traced, not run, and not
    changed. See the module documentation for what the prepared module is specialized to."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"bdpass.prepare: expected an nn.Module, got {type(model).__name__}")
    opts = BDOptions.parse(options)
    model = getattr(model, "_orig_mod", model)
    if model.training:
        warnings.warn("bdpass.prepare: the model is in training mode; the prepared graph keeps "
                      "training-mode behaviour (dropout, ...). Call model.eval() first for inference.",
                      stacklevel=2)
    t0 = time.perf_counter()
    report = GraphReport(index=0, lowering="prepare")

    def on_graph(gm: torch.fx.GraphModule, inputs: list) -> Any:
        report.nodes_before = node_records(gm)
        node_map = None
        try:
            planned, editor, new_gm, new_inputs = rewrite_graph(gm, inputs, opts, 0)
            for name in ("rewrites", "skipped", "params_before", "params_after", "validation",
                         "validate_seconds"):
                setattr(report, name, getattr(planned, name))
            if editor is not None:
                node_map = editor.node_map
                report.nodes_before = node_records(gm, editor.removed_by)
                report.nodes_after = node_records(new_gm)
        except Exception as e:
            if opts.strict:
                raise
            report.rewrites.clear()
            report.params_after = report.params_before
            report.nodes_after = []
            report.fallback = f"internal error during rewriting ({type(e).__name__}: {e})"
            log.warning("bdpass.prepare: %s; keeping the original graph", report.fallback)
            node_map = None
        if node_map is None:
            new_gm, new_inputs, node_map = gm, inputs, {n: n for n in gm.graph.nodes}
        try:
            spec, tensors = _describe(gm, inputs, new_gm, new_inputs, node_map, example_args, example_kwargs)
        except _Unsupported as e:
            raise RuntimeError(f"bdpass.prepare: cannot represent the captured graph: {e}") from None
        report.derived_bytes = sum(tensors[s["key"]].numel() * tensors[s["key"]].element_size()
                                   for s in spec["slots"] if s["kind"] == "tensor" and s["role"] == "derived")
        reference = None
        if opts.verify:
            with torch.no_grad():
                reference = gm.forward(*inputs)
        return spec, tensors, _Resolver(gm), reference, inputs

    cap = _capture(model, example_args, example_kwargs, on_graph, "prepare")
    spec, tensors, resolver, reference, inputs = cap.result
    spec["call"] = _call_spec(model, example_args, example_kwargs)
    full = Report(graphs=[report])
    prepared = PreparedModule(spec, tensors, resolver, full, _out_plan(cap))
    del cap, inputs, tensors, resolver
    if reference is not None:
        with torch.no_grad():
            flat = prepared.graph_module(*_slot_values(prepared, example_args, example_kwargs))
        compare_outputs(flat, reference, opts.verify_tol, "bdpass.prepare verify")
    prepared.prepare_seconds = time.perf_counter() - t0
    log.info(report.summary())
    return prepared


def _slot_values(prepared: PreparedModule, args: tuple, kwargs: dict) -> list:
    root = {"args": args, "kwargs": kwargs}
    return [prepared._tensor(s[1]) if s[0] == "tensor" else _follow(root, s[1]) for s in prepared._slots]


# ============================================================================ files
def _version() -> str:
    from . import __version__

    return __version__


def save_prepared(prepared: PreparedModule, path: Any) -> None:
    """Write ``prepared`` to the safetensors file ``path``: its ``state_dict`` plus, in the
    metadata, the rewritten graph, the rewrite report, the bdpass version and per-tensor
    shapes and dtypes. Read it back with :func:`load_prepared`."""
    from safetensors.torch import save_file

    if not isinstance(prepared, PreparedModule):
        raise TypeError(f"bdpass.save_prepared: expected a PreparedModule, got {type(prepared).__name__}")
    state = prepared.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen: set = set()
    info = {}
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.untyped_storage().nbytes() != t.numel() * t.element_size() or key in seen:
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        tensors[k] = t
    for s in prepared._spec["slots"]:
        if s["kind"] == "tensor":
            info[s["key"]] = {"shape": s["shape"], "dtype": s["dtype"], "role": s["role"],
                              "parameter": s["parameter"]}
    missing = sorted(set(info) - set(tensors))
    if missing:
        raise ValueError(f"bdpass.save_prepared: the module lacks tensor(s) {missing[:5]}")
    metadata = {
        "format": FORMAT,
        "bdpass_version": _version(),
        "torch_version": torch.__version__,
        "report": prepared.report.to_json(),
        "tensors": json.dumps(info),
        "graph": json.dumps({k: prepared._spec[k] for k in ("original", "graph", "slots", "call")},
                            allow_nan=False),
    }
    save_file(tensors, str(path), metadata=metadata)


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
              "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _mismatch(what: str, file_sig: Any, model_sig: Any) -> ValueError:
    return ValueError(f"bdpass.load_prepared: {what}: the file has {_fmt_sig(file_sig)} but the model's "
                      f"graph expects {_fmt_sig(model_sig)}; the file was prepared for a different "
                      f"architecture or different example input shapes")


def _ph_label(d: dict) -> str:
    if d.get("role") == "input":
        return f"input {_path_text(d['path'])}"
    return f"tensor {d.get('key', d['name'])!r}"


def _validate(stored: list[dict], fresh: list[dict], file_shapes: dict[str, dict]) -> None:
    """Raise ValueError at the first difference between the graph the file was prepared
    from and the model's graph (placeholders, i.e. inputs and weights, first)."""
    s_ph = [d for d in stored if d["op"] == "placeholder"]
    f_ph = [d for d in fresh if d["op"] == "placeholder"]
    for i, (s, f) in enumerate(zip(s_ph, f_ph)):
        if s.get("role") != f.get("role") or s.get("key") != f.get("key") or s.get("path") != f.get("path"):
            raise ValueError(f"bdpass.load_prepared: graph input {i} is {_ph_label(f)} in the model but "
                             f"{_ph_label(s)} in the file; the model's architecture or the example call differs")
        want = f["val"]
        have = file_shapes.get(s.get("key"), s["val"])
        if have != want:
            raise _mismatch(_ph_label(s), have, want)
    if len(s_ph) != len(f_ph):
        extra = (f_ph if len(f_ph) > len(s_ph) else s_ph)[min(len(s_ph), len(f_ph))]
        raise ValueError(f"bdpass.load_prepared: the model's graph has {len(f_ph)} inputs, the file's "
                         f"{len(s_ph)} (first unmatched: {_ph_label(extra)})")
    s_rest = [d for d in stored if d["op"] != "placeholder"]
    f_rest = [d for d in fresh if d["op"] != "placeholder"]
    for s, f in zip(s_rest, f_rest):
        if s.get("val") != f.get("val") and s.get("op") == f.get("op") and s.get("target") == f.get("target"):
            raise _mismatch(f"tensor {f['name']!r} ({f['target']})", s.get("val"), f.get("val"))
        for field in ("name", "op", "target", "args", "kwargs"):
            if s.get(field) != f.get(field):
                raise ValueError(
                    f"bdpass.load_prepared: the model's graph differs from the prepared one at node "
                    f"{f['name']!r} ({f['op']} {f['target']}; {field} differs: file "
                    f"{json.dumps(s.get(field))[:200]}, model {json.dumps(f.get(field))[:200]}); "
                    f"the file was prepared for a different architecture")
    if len(s_rest) != len(f_rest):
        raise ValueError(f"bdpass.load_prepared: the model's graph has {len(f_rest)} operations, the "
                         f"file's {len(s_rest)}; the file was prepared for a different architecture")


def load_prepared(model: nn.Module, path: Any, /, *example_args: Any, **example_kwargs: Any) -> PreparedModule:
    """Rebuild the :class:`PreparedModule` saved by :func:`save_prepared` for ``model``, an
    architecture-identical model (same code and config; its weights are not used, every
    tensor comes from the file), called like the example call of :func:`prepare`.

    Nothing is factorized. The model's forward is traced (not run) and its graph must match
    the one the file was prepared from; otherwise ``ValueError`` names the first input,
    weight or operation whose shape, dtype or kind differs."""
    from safetensors import safe_open

    if not isinstance(model, nn.Module):
        raise TypeError(f"bdpass.load_prepared: expected an nn.Module, got {type(model).__name__}")
    model = getattr(model, "_orig_mod", model)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"bdpass.load_prepared: {path} is not a bdpass prepared-module file "
                             f"(format {meta.get('format')!r}, expected {FORMAT!r})")
        stored = json.loads(meta["graph"])
        info = json.loads(meta["tensors"])
        headers = {}
        for k in f.keys():
            sl = f.get_slice(k)
            dt = sl.get_dtype()
            headers[k] = {"shape": list(sl.get_shape()), "dtype": _ST_DTYPES.get(dt, dt)}
    # the file's own consistency: every tensor the graph reads, as described
    for s in stored["slots"]:
        if s["kind"] != "tensor":
            continue
        if s["key"] not in headers:
            raise ValueError(f"bdpass.load_prepared: tensor {s['key']!r} is missing from {path}")
        want = {"shape": s["shape"], "dtype": s["dtype"]}
        if headers[s["key"]] != want:
            raise _mismatch(f"tensor {s['key']!r}", headers[s["key"]], want)

    call = stored["call"]
    sig = _signature_of(model)
    try:
        example_args, example_kwargs = _normalize_call(example_args, example_kwargs, call["n_args"],
                                                       call["kwarg_names"], sig["positional"], None)
    except (TypeError, ValueError) as e:
        raise ValueError(f"bdpass.load_prepared: the example call does not match the one the file was "
                         f"prepared with ({call['n_args']} positional argument(s), keywords "
                         f"{call['kwarg_names']}): {e}") from None
    call["positional"], call["names"] = sig["positional"], sig["names"]

    def on_graph(gm: torch.fx.GraphModule, inputs: list) -> Any:
        fresh = [_describe_node(n, True) for n in gm.graph.nodes]
        for d, n in zip(fresh, (n for n in gm.graph.nodes if n.op == "placeholder")):
            d.update(_placeholder_role(n))
        _validate(stored["original"], fresh, headers)
        devices = [t.device for t in inputs if isinstance(t, torch.Tensor)]
        return _Resolver(gm), devices[0] if devices else torch.device("cpu"), gm, inputs

    try:
        cap = _capture(model, example_args, example_kwargs, on_graph, "load_prepared")
    except _Unsupported as e:
        raise ValueError(f"bdpass.load_prepared: the model's graph cannot be matched: {e}") from None
    resolver, default_device, gm, inputs = cap.result
    device_of = {}
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for d, n, t in zip(stored["original"], ph, inputs):
        if isinstance(t, torch.Tensor) and d.get("key"):
            device_of[d["key"]] = t.device
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for s in stored["slots"]:
            if s["kind"] == "tensor":
                tensors[s["key"]] = f.get_tensor(s["key"]).to(device_of.get(s["key"], default_device))
    spec = dict(stored, format=FORMAT)
    report = Report.from_json(meta["report"]) if meta.get("report") else Report()
    prepared = PreparedModule(spec, tensors, resolver, report, _out_plan(cap))
    return prepared
