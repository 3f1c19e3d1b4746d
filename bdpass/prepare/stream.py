"""Preparing a checkpoint folder layer by layer: ``bdpass prepare SRC DST``.

:func:`prepare_folder` reads a transformers checkpoint folder (``config.json`` and
safetensors, sharded or not) and writes the prepared folder, holding a few layers' weights
at a time rather than the model, and reading into memory only what the rewrites need:

1. The model is built from the config with its parameters on the meta device (no memory,
   no initialization) and its buffers as the constructors compute them (rotary
   ``inv_freq``, which the files do not hold). Everything outside the layer stack
   (embeddings, final norm, head) is loaded from the files.
2. The model runs once on example token ids (``use_cache=False``, no grad). Before a block
   of the layer stack runs, its weights are read from the files into it; after it ran, the
   block is prepared on the inputs it received (:func:`bdpass.prepare` of the block) and
   goes back to the meta device.

   * The first block of each *kind* (blocks of one class with the same parameter names,
     shapes and dtypes) reads all its weights, and is analysed and validated in float64.
   * A later block of a known kind reads only the tensors the kind's rewrites read or
     change (``kv_b_proj`` of an MLA attention, say, not its 64 experts); its other
     parameters are stand-ins that share the first block's values, so that it runs (same
     graphs: Dynamo's guards pass and nothing is traced again) and its rewrites are refit
     to its own weights (``share_analysis``). Its output goes on to the next block: the
     hidden states a block sees are then no longer the original model's on the example,
     which only the validation of a kind first met after such blocks uses (any input
     checks an exact identity). If the analysis or an edit would use a stand-in (a graph
     not seen before, a rewrite reading another tensor), the block reads all its weights
     and is prepared again (logged).
3. What a block's rewrites made is written from memory to the block's own safetensors
   file; every other tensor of the checkpoint (the block's untouched weights, the tensors
   outside the stack) is copied into the prepared folder byte for byte by the kernel, on a
   background thread, under its checkpoint name (:mod:`bdpass.prepare.files`). The other
   files of the folder (tokenizer, generation config) are copied, and ``config.json`` gets
   the plan as ``quantization_config`` (``quant_method: "bdpass"``), so that
   ``AutoModelForCausalLM.from_pretrained(DST)`` loads the prepared model after
   ``import bdpass``.

Which checkpoint tensors make which parameters is transformers' own routing
(:func:`bdpass._compat.checkpoint_key_targets`): the keys of a fused parameter are read,
or copied, together.

Rewrites are made inside the blocks of the layer stack only: a rewrite site outside it
(a low-rank head, say) is left as it is (logged), where preparing the model in memory
would rewrite it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import _compat
from .apply import NeedsRealWeights, _prepare, _split_options, _storage_key
from .capture import CaptureSession, layer_blocks
from .checkpoint import PLAN_FORMAT, _version
from .files import INDEX, Folder, Output
from .modules import PreparedModule

log = logging.getLogger("bdpass")

__all__ = ["prepare_folder", "FolderReport"]


@dataclass
class FolderReport:
    """What :func:`prepare_folder` did: per block its prepare report; the seconds the main
    thread spent reading, preparing and waiting on the writer; the bytes read into memory
    and copied by the kernel; the blocks that read all their weights again, and why; a
    timeline; the peak resident memory."""
    blocks: dict[str, Any] = field(default_factory=dict)       # block path -> PrepareReport
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    peak_rss_bytes: int | None = None
    outside: list[str] = field(default_factory=list)            # tensors copied unchanged
    read_bytes: int = 0            # checkpoint bytes read into memory
    copied_bytes: int = 0          # bytes of the files copied from the checkpoint by the kernel
    reread: dict[str, str] = field(default_factory=dict)        # block -> why it read all its weights again
    # when things happened, in seconds from the start: (what, start, end); the writer's jobs and each
    # block from its read to its prepared tensors queued
    timeline: list[tuple[str, float, float]] = field(default_factory=list)

    def __str__(self) -> str:
        pct = 100.0 * (1 - self.bytes_after / self.bytes_before) if self.bytes_before else 0.0
        lines = [f"bdpass prepare: {len(self.blocks)} blocks; tensor bytes {self.bytes_before:,} -> "
                 f"{self.bytes_after:,} (-{pct:.1f}%)"]
        for p, r in self.blocks.items():
            kinds: dict[str, int] = {}
            for e in r.edits:
                kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            shared = any((g.validation or "").startswith("shared with") for g in r.graphs)
            lines.append(f"  {p}: {', '.join(f'{k} x{v}' for k, v in sorted(kinds.items())) or 'nothing'}"
                         f"{' (refit)' if shared else ''}"
                         + (f"; read all its weights again: {self.reread[p]}" if p in self.reread else "")
                         + "".join(f"; {b.line()}" for b in r.not_preparable))
        lines.append(f"read {self.read_bytes / 2**30:.2f} GiB into memory; copied {self.copied_bytes / 2**30:.2f} "
                     f"GiB of files unchanged")
        lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        if self.peak_rss_bytes is not None:
            lines.append(f"peak resident memory: {self.peak_rss_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)


@contextlib.contextmanager
def _parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory, no initialization)
    and their buffers as their constructors compute them (rotary ``inv_freq``, which the
    checkpoint does not hold)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: Any) -> None:
        register(self, name, param)
        p = self._parameters.get(name)
        if p is not None and p.device.type != "meta":
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _load(model: nn.Module, tensors: dict[str, torch.Tensor], params: list[str], dtype: torch.dtype,
          what: str, tie: bool = False) -> None:
    """Load checkpoint tensors (names as the checkpoint spells them) into ``model`` as
    ``from_pretrained`` loads them (weight conversions included); then the parameters
    ``params`` (names in ``model``) must all be loaded. ``tie``: tie the model's weights
    first (a head tied to the embedding is not in the checkpoint)."""
    _compat.load_checkpoint_tensors(model, tensors, dtype)
    if tie and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [n for n in params if model.get_parameter(n).device.type == "meta"]
    if missing:
        raise ValueError(f"bdpass prepare: the checkpoint lacks {len(missing)} tensor(s) of {what}, e.g. "
                         f"{missing[0]} (its names do not follow the model class built from config.json)")


class _Prefetch:
    """Reads the next block's tensors from disk on a background thread while the current
    block's files are written (one block ahead at most). Only the reading: converting them
    into parameters on a second thread would compete with the factorizations for the cores."""

    def __init__(self, files: Folder) -> None:
        self.files = files
        self._thread: threading.Thread | None = None
        self._key: Any = None
        self._result: Any = None

    def start(self, key: str, names: list[str]) -> None:
        def run() -> None:
            try:
                self._result = self.files.read(names)
            except BaseException as e:      # re-raised by take
                self._result = e

        if self._thread is not None and self._key == (key, tuple(names)):
            return          # already under way
        self.wait()
        self._key, self._result = (key, tuple(names)), None
        self._thread = threading.Thread(target=run, name="bdpass-prepare-reader", daemon=True)
        self._thread.start()

    def take(self, key: str, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` of block ``key``: from the background read, or read now."""
        if self._thread is not None and self._key == (key, tuple(names)):
            self._thread.join()
            self._thread, result, self._result = None, self._result, None
            if isinstance(result, BaseException):
                raise result
            return result
        self.wait()
        return self.files.read(names)

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread, self._result = None, None


def _peak_rss() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _signature(block: nn.Module) -> tuple:
    """Blocks alike in class and in their parameters' and buffers' names, shapes and dtypes
    are expected to run the same graphs (Dynamo's guards decide; a block that does not is
    prepared again with all its weights)."""
    return (type(block), tuple((n, tuple(p.shape), p.dtype) for n, p in block.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in block.named_buffers()))


@dataclass
class _Kind:
    """A kind of block, met and fully prepared once: the parameters its rewrites read or
    change (``real``, names in the block; with every parameter made from the same
    checkpoint keys), and the first block's values of all the others (``keep``), which
    later blocks of the kind borrow instead of reading their own."""
    real: frozenset
    keep: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]


class _Routing:
    """Which checkpoint keys of a block make which of its tensors (transformers' routing)."""

    def __init__(self, model: nn.Module, files: Folder, blocks: list[str]) -> None:
        self.keys = {p: [n for n in files.names() if n.startswith(p + ".")] for p in blocks}
        self.targets = _compat.checkpoint_key_targets(model, files.names())

    def closure(self, path: str, names: set[str]) -> tuple[list[str], set[str]]:
        """The block's keys that make any of ``names`` (full names), with every key of their
        loading groups, and all the tensors those keys make."""
        made = set(names)
        keys: set[str] = set()
        while True:
            groups = {self.targets[k][1] for k in self.keys[path] if self.targets[k][0] & made}
            new = {k for k in self.keys[path] if self.targets[k][1] in groups or self.targets[k][0] & made}
            if new <= keys:
                return [k for k in self.keys[path] if k in keys], made
            keys |= new
            for k in new:
                made |= self.targets[k][0]

    def made_by(self, keys: list[str]) -> set[str]:
        return {n for k in keys for n in self.targets[k][0]}


def prepare_folder(src: str, dst: str, options: Any = None, *, tokens: int = 16, model_class: Any = None,
                   dtype: torch.dtype | None = None, seed: int = 0,
                   model_kwargs: dict | None = None) -> FolderReport:
    """Prepare the transformers checkpoint folder ``src`` layer by layer into ``dst`` (see
    the module docstring). ``options``: those of :func:`bdpass.prepare` (``cost_model``
    defaults to False). ``tokens``: length of the example (random token ids of the
    vocabulary, batch 1). ``model_class``: default ``AutoModelForCausalLM``. ``dtype``: the
    dtype the model computes in while preparing (default: the checkpoint's).
    ``model_kwargs``: passed to the model's construction from the config (e.g.
    ``attn_implementation``, ``experts_implementation``). Returns a :class:`FolderReport`;
    ``dst`` must not exist or be empty."""
    import transformers

    t_start = time.perf_counter()
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("bdpass prepare: SRC and DST are the same folder")
    if os.path.exists(dst) and os.listdir(dst):
        raise FileExistsError(f"bdpass prepare: {dst} exists and is not empty")
    if not os.path.exists(os.path.join(src, "config.json")):
        raise FileNotFoundError(f"bdpass prepare: {src} holds no config.json (a transformers checkpoint folder)")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config"):
        raise ValueError(f"bdpass prepare: {src} is quantized ({cfg['quantization_config'].get('quant_method')!r});"
                         f" bdpass prepares unquantized checkpoints")
    opts, own = _split_options(options)
    opts_block = dict(own, split_layers=False)   # a block is one graph of its own
    os.makedirs(dst, exist_ok=True)
    model_class = model_class or transformers.AutoModelForCausalLM
    config = transformers.AutoConfig.from_pretrained(src)
    files = Folder(src)
    dtype = dtype or files.dtype()
    rep = FolderReport()
    times = {"read": 0.0, "prepare": 0.0, "write": 0.0}

    # 1. the model without weights; the parts outside the stack from the files
    build = getattr(model_class, "from_config", None) or model_class._from_config
    with _parameters_on_meta():
        model = build(config, dtype=dtype, **(model_kwargs or {}))
    model.eval()
    blocks = layer_blocks(model)
    if not blocks:
        raise ValueError(f"bdpass prepare: {type(model).__name__} has no layer stack (an nn.ModuleList of blocks "
                         f"of one type); prepare it in memory with bdpass.prepare")
    order = [p for p, _ in blocks]
    routing = _Routing(model, files, order)
    in_block = {k for ks in routing.keys.values() for k in ks}
    output = Output(files)

    t0 = time.perf_counter()
    # the forward runs the base model where there is one (a head is not needed to reach the blocks)
    base = getattr(model, "base_model", None)
    runner = base if isinstance(base, nn.Module) and any(True for _ in base.parameters()) else model
    prefix = next((p for p, m in model.named_modules() if m is runner), "")
    outside = [f"{prefix}.{n}" if prefix else n for n, _ in runner.named_parameters(remove_duplicate=False)]
    outside = [n for n in outside if not any(n.startswith(p + ".") for p in order)]
    rest = [n for n in files.names() if n not in in_block]
    needed = set(outside) | {n for n, _ in model.named_buffers()}
    read = [n for n in rest if routing.targets[n][0] & needed]
    weight_map: dict[str, str] = {}
    rep.outside = rest
    if rest:        # copied while the blocks run
        rest_bytes = files.nbytes(rest)
        rep.bytes_before += rest_bytes
        rep.bytes_after += rest_bytes
        output.copy(os.path.join(dst, "model-outside-layers.safetensors"), rest)
        weight_map.update({n: "model-outside-layers.safetensors" for n in rest})
        log.info("bdpass prepare: %d tensor(s) outside the layer stack are copied as they are (rewrites are made "
                 "inside the blocks only)", len(rest))
    rest_tensors = files.read(read)
    rep.read_bytes += files.nbytes(read)
    _load(model, rest_tensors, outside, dtype, "the model outside its layer stack", tie=True)
    del rest_tensors
    times["read"] += time.perf_counter() - t0

    # 2. the forward, block by block
    shared: dict = {}
    kinds: dict[tuple, _Kind] = {}
    plan_modules: dict[str, dict] = {}
    folded: list[str] = []
    stash: dict[int, tuple] = {}
    queued: dict[str, list[str]] = {}       # block -> the keys whose copy was queued ahead of it
    busy = []      # the block being prepared runs again inside prepare: no hooks then
    names = {id(m): p for p, m in blocks}
    module_of = dict(blocks)
    prefetch = _Prefetch(files)
    threads = torch.get_num_threads()

    def plan_read(path: str) -> tuple[_Kind | None, list[str], set[str]]:
        """What block ``path`` reads: its kind's keys only, or all its keys."""
        kind = kinds.get(_signature(module_of[path])) if own["share_analysis"] else None
        if kind is None:
            return None, list(routing.keys[path]), set()
        keys, made = routing.closure(path, {f"{path}.{n}" for n in kind.real})
        return kind, keys, made

    def read_into(path: str, keys: list[str], required: list[str]) -> None:
        t1 = time.perf_counter()
        tensors = prefetch.take(path, keys)
        rep.read_bytes += files.nbytes(keys)
        _load(model, tensors, required, dtype, path)
        del tensors
        times["read"] += time.perf_counter() - t1

    def pre(block: nn.Module, args: tuple, kwargs: dict) -> None:
        if busy:
            return
        path = names[id(block)]
        t_pre = time.perf_counter()
        sig = _signature(block)
        kind, keys, made = plan_read(path)
        full = [f"{path}.{n}" for n, _ in block.named_parameters()]
        if kind is None:
            read_into(path, keys, full)
        else:
            read_into(path, keys, [])
            loaded = {n for n, p in block.named_parameters() if p.device.type != "meta"}
            copied_made = routing.made_by([k for k in routing.keys[path] if k not in set(keys)])
            why = None
            if {f"{path}.{n}" for n in loaded} != made & set(full):
                why = "its tensors did not load as its kind's did"
            elif not {f"{path}.{n}" for n, _ in block.named_parameters()} - made <= copied_made:
                why = "a parameter is not made by checkpoint keys as transformers routes them"
            if why is not None:
                log.info("bdpass prepare: %s: %s; reading all its weights", path, why)
                rep.reread[path] = why
                read_into(path, routing.keys[path], full)
                kind = None
            else:
                for n, p in list(block.named_parameters()):
                    if p.device.type == "meta":
                        owner, _, attr = n.rpartition(".")
                        m = block.get_submodule(owner) if owner else block
                        m._parameters[attr] = nn.Parameter(kind.keep[n], requires_grad=kind.requires_grad[n])
        stash[id(block)] = (args, kwargs, kind, keys, sig, t_pre)
        k = order.index(path)
        if k + 1 < len(order) and _signature(module_of[order[k + 1]]) != sig:
            prefetch.start(order[k + 1], plan_read(order[k + 1])[1])     # known now: read it meanwhile

    def restore(block: nn.Module, structure: dict, borrowed: set) -> None:
        """The block's modules as before its preparation, its stand-ins back on meta (so that
        reading all its weights must replace every one)."""
        for m, children in structure.items():
            m._modules.clear()
            m._modules.update(children)
        for m in block.modules():
            for attr, p in list(m._parameters.items()):
                if p is not None and p.device.type != "meta" and _storage_key(p) in borrowed:
                    m._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    def post(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if busy:
            return out
        path = names[id(block)]
        a, kw, kind, keys, sig, t_pre = stash.pop(id(block))
        t1 = time.perf_counter()
        before = dict(block.state_dict(keep_vars=True))
        structure_params = list(block.named_parameters())
        structure = {m: dict(m._modules) for m in block.modules()}
        borrowed = {_storage_key(t) for t in kind.keep.values()} if kind is not None else None
        busy.append(path)
        # while the kernel copies, a refit leaves it one core (compute threads that wait on each other's
        # barriers on an oversubscribed core slow it many times over)
        torch.set_num_threads(max(1, threads - 1) if kind is not None and output.copying() else threads)
        try:
            try:
                _prepare(block, a, kw, opts, opts_block, True, shared, session, borrowed=borrowed)
            except NeedsRealWeights as e:
                log.info("bdpass prepare: %s: %s; reading all its weights and preparing it again", path, e)
                rep.reread[path] = str(e)
                restore(block, structure, borrowed)
                times["prepare"] += time.perf_counter() - t1
                read_into(path, routing.keys[path], [f"{path}.{n}" for n, _ in block.named_parameters()])
                t1 = time.perf_counter()
                before = dict(block.state_dict(keep_vars=True))
                structure_params = list(block.named_parameters())
                kind, borrowed, keys = None, None, list(routing.keys[path])
                _prepare(block, a, kw, opts, opts_block, True, shared, session)
        finally:
            busy.pop()
        r = block.bdpass_report
        rep.blocks[path] = r
        rep.bytes_before += r.bytes_before
        rep.bytes_after += r.bytes_after
        folded.extend(f"{path}.{n}" for e in r.edits for n in e["folded"])
        times["prepare"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        # what is written from memory, what is copied from the files
        if kind is None:
            keys, made = routing.closure(path, {f"{path}.{n}" for n in r.touched})
        else:
            made = set()
        copied = [k for k in routing.keys[path] if k not in set(keys)]
        state = block.state_dict(keep_vars=True)
        unchanged = {n for n, t in state.items() if before.get(n) is t and n not in r.touched}
        copied_names = {n[len(path) + 1:] for n in routing.made_by(copied)}
        unrouted = {f"{path}.{n}" for n, _ in structure_params} - routing.made_by(routing.keys[path])
        if not copied_names <= unchanged or (kind is None and unrouted):
            if kind is not None:        # never: a kind's keys were closed over what its rewrites change
                raise RuntimeError(f"bdpass prepare: {path}: {sorted(copied_names - unchanged)[:3]} changed "
                                   f"although its kind's rewrites do not change them")
            why = (f"{sorted(unrouted)[0]} is not made by any checkpoint key as transformers routes them"
                   if unrouted else "tensors made from the same checkpoint keys as a rewritten one changed")
            log.info("bdpass prepare: %s: %s; the block is written from memory, and later blocks of its kind "
                     "read all their weights", path, why)
            copied, copied_names = [], set()
            made = {f"{path}.{n}" for n, _ in structure_params}     # a later block of this kind reads all
        memory = {f"{path}.{n}": t.detach().contiguous() for n, t in state.items() if n not in copied_names}
        if borrowed and any(_storage_key(t) in borrowed for t in memory.values()):
            raise RuntimeError(f"bdpass prepare: {path}: a stand-in would be written")
        if memory:
            fn = f"model-{path.replace('.', '-')}.safetensors"
            output.save(os.path.join(dst, fn), memory)
            weight_map.update({k: fn for k in memory})
        kept = os.path.join(dst, f"model-{path.replace('.', '-')}-kept.safetensors")
        if queued.pop(path, []) != copied:
            if copied:
                output.copy(kept, copied)
            else:
                output.remove(kept)
        weight_map.update({k: os.path.basename(kept) for k in copied})
        del memory, state, before
        for p, m in block.named_modules():
            if isinstance(m, PreparedModule):
                spec = m.spec()
                if "into" in spec:
                    spec = {**spec, "into": f"{path}.{spec['into']}"}
                plan_modules[f"{path}.{p}"] = spec
        if kind is None and own["share_analysis"] and sig not in kinds:
            real = {n[len(path) + 1:] for n in made}
            kinds[sig] = _Kind(real=frozenset(real),
                               keep={n: t.detach() for n, t in structure_params if n not in real},
                               requires_grad={n: t.requires_grad for n, t in structure_params})
        if kind is None:
            # What this block's rewrites touched decides what the later blocks copy, queued now so that
            # the copying runs while they are prepared: for the blocks of its kind, what they will copy;
            # for blocks of a kind not met yet, a guess (the same names), copied again when wrong.
            touched_here = {n[len(path) + 1:] for n in made}
            for later in order[order.index(path) + 1:]:
                sig_l = _signature(module_of[later])
                if sig_l == sig or (sig_l not in kinds and later not in queued):
                    keys_l, _ = routing.closure(later, {f"{later}.{n}" for n in touched_here})
                    copy_l = [k for k in routing.keys[later] if k not in set(keys_l)]
                    if queued.get(later) != copy_l:
                        queued[later] = copy_l
                        fn = os.path.join(dst, f"model-{later.replace('.', '-')}-kept.safetensors")
                        if copy_l:
                            output.copy(fn, copy_l)
                        else:
                            output.remove(fn)
        block.to("meta")
        del block.bdpass_report
        k = order.index(path)
        if k + 1 < len(order):
            prefetch.start(order[k + 1], plan_read(order[k + 1])[1])
        times["write"] += time.perf_counter() - t2
        rep.timeline.append((path, t_pre - t_start, time.perf_counter() - t_start))
        return out

    session = CaptureSession()      # one Dynamo cache for all blocks: a kind of block is traced once
    hooks = []
    for _, m in blocks:
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    vocab = int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    prefetch.start(order[0], plan_read(order[0])[1])
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            runner(input_ids=ids, use_cache=False)
    finally:
        torch.set_num_threads(threads)
        for h in hooks:
            h.remove()
        prefetch.wait()
        kinds.clear()
        torch._dynamo.reset()
        t2 = time.perf_counter()
        output.close()
        times["write"] += time.perf_counter() - t2
    rep.copied_bytes = output.copied_bytes
    rep.timeline += [(f"{kind} {fn}", a - t_start, b - t_start) for kind, fn, a, b in output.jobs]
    rep.timeline.sort(key=lambda e: e[1])
    not_run = [p for p in order if p not in rep.blocks]
    if not_run:
        raise RuntimeError(f"bdpass prepare: the example forward did not run block(s) {not_run[:3]}; "
                           f"prepare this model in memory with bdpass.prepare")

    # 3. the index, the config, the other files
    t3 = time.perf_counter()
    total = sum(os.path.getsize(os.path.join(dst, f)) for f in set(weight_map.values()))
    with open(os.path.join(dst, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}, f, indent=2)
    plan = {"format": PLAN_FORMAT, "bdpass_version": _version(), "modules": plan_modules, "folded": sorted(folded)}
    cfg["quantization_config"] = {"quant_method": "bdpass", "plan": plan}
    cfg["bdpass"] = plan
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for fn in os.listdir(src):
        if fn == "config.json" or fn == INDEX or fn.endswith(".safetensors") or fn.endswith(".bin") \
                or fn.endswith(".pt") or os.path.isdir(os.path.join(src, fn)):
            continue
        shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))
    times["write"] += time.perf_counter() - t3
    rep.seconds = {**times, "total": time.perf_counter() - t_start}
    rep.peak_rss_bytes = _peak_rss()
    log.info("%s", rep)
    return rep
