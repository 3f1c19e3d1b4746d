"""Preparing a checkpoint folder layer by layer: ``bdpass prepare SRC DST``.

:func:`prepare_folder` reads a transformers checkpoint folder (``config.json`` and
safetensors, sharded or not) and writes the prepared folder, holding a few layers' weights
at a time rather than the model:

1. The model is built from the config with its parameters on the meta device (no memory,
   no initialization) and its buffers as the constructors compute them (rotary
   ``inv_freq``, which the files do not hold). Everything outside the layer stack
   (embeddings, final norm, head) is loaded from the files.
2. The model runs once on example token ids (``use_cache=False``, no grad). Before a block
   of the layer stack runs, its weights are read from the files into it; after it ran (its
   output computed with the original weights goes on to the next block), the block is
   prepared on the inputs it received (:func:`bdpass.prepare` of the block), its prepared
   tensors are written to the block's own safetensors file, and the block goes back to the
   meta device. The first block of each kind is analysed and validated in float64; the
   others refit its decisions to their own weights (``share_analysis``).
3. The tensors outside the stack are copied unchanged, the other files of the folder
   (tokenizer, generation config) are copied, and ``config.json`` gets the plan as
   ``quantization_config`` (``quant_method: "bdpass"``), so that
   ``AutoModelForCausalLM.from_pretrained(DST)`` loads the prepared model after
   ``import bdpass``.

Rewrites are made inside the blocks of the layer stack only: a rewrite site outside it
(a low-rank head, say) is left as it is and logged, where preparing the model in memory
would rewrite it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .. import _compat
from .apply import _prepare, _split_options
from .capture import CaptureSession, layer_blocks
from .checkpoint import PLAN_FORMAT, _version
from .modules import PreparedModule

log = logging.getLogger("bdpass")

__all__ = ["prepare_folder", "FolderReport"]

_INDEX = "model.safetensors.index.json"


@dataclass
class FolderReport:
    """What :func:`prepare_folder` did: per block its prepare report, the seconds spent
    reading, preparing and writing, and the peak resident memory."""
    blocks: dict[str, Any] = field(default_factory=dict)       # block path -> PrepareReport
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    peak_rss_bytes: int | None = None
    outside: list[str] = field(default_factory=list)            # tensors copied unchanged

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
                         + "".join(f"; {b.line()}" for b in r.not_preparable))
        lines.append("time: " + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()))
        if self.peak_rss_bytes is not None:
            lines.append(f"peak resident memory: {self.peak_rss_bytes / 2**30:.2f} GiB")
        return "\n".join(lines)


class _Files:
    """The tensors of a safetensors checkpoint folder, by name, read on demand."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, _INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"bdpass prepare: {folder} holds no model.safetensors nor {_INDEX} "
                                    f"(only safetensors checkpoints are read)")

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names``, read into memory; the files are closed again (a mapping
        left open would keep every page read resident)."""
        from safetensors import safe_open

        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for fn, ns in by_file.items():
            with safe_open(os.path.join(self.folder, fn), framework="pt") as f:
                for n in ns:
                    out[n] = f.get_tensor(n)
        return out

    def dtype(self) -> torch.dtype:
        """The dtype of the checkpoint's first floating tensor (from the file headers)."""
        from safetensors import safe_open

        kinds = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
        for fn in dict.fromkeys(self.where.values()):
            with safe_open(os.path.join(self.folder, fn), framework="pt") as f:
                for n in f.keys():
                    dt = kinds.get(f.get_slice(n).get_dtype())
                    if dt is not None:
                        return dt
        return torch.get_default_dtype()


class _Prefetch:
    """Reads the next block's tensors from disk on a background thread while the current
    block is prepared (one block ahead at most). Only the reading: converting them into
    parameters (copies) on a second thread would compete with the factorizations for the
    cores."""

    def __init__(self, files: _Files) -> None:
        self.files = files
        self._thread: threading.Thread | None = None
        self._key: str | None = None
        self._result: Any = None

    def start(self, key: str, names: list[str]) -> None:
        def run() -> None:
            try:
                self._result = self.files.read(names)
            except BaseException as e:      # re-raised by take
                self._result = e

        self._key, self._result = key, None
        self._thread = threading.Thread(target=run, name="bdpass-prepare-reader", daemon=True)
        self._thread.start()

    def take(self, key: str, names: list[str]) -> dict[str, torch.Tensor]:
        """The tensors of block ``key``: from the background read, or read now."""
        if self._thread is not None and self._key == key:
            self._thread.join()
            self._thread, result, self._result = None, self._result, None
            if isinstance(result, BaseException):
                raise result
            return result
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


class _Writer:
    """Writes safetensors files on a background thread, one file queued at most (so at most
    two blocks' tensors are held: the one being written and the one being prepared)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self.seconds = 0.0
        self._thread = threading.Thread(target=self._run, name="bdpass-prepare-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from safetensors.torch import save_file

        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    save_file(item[1], item[0], metadata={"format": "pt"})
                except BaseException as e:      # re-raised by put / close
                    self._error = e
                self.seconds += time.perf_counter() - t0

    def put(self, path: str, state: dict) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((path, state))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


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
    files = _Files(src)
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
    block_paths = {p for p, _ in blocks}

    def in_block(name: str) -> bool:
        return any(name.startswith(p + ".") for p in block_paths)

    t0 = time.perf_counter()
    outside = [n for n, _ in model.named_parameters(remove_duplicate=False) if not in_block(n)]
    rest = [n for n in files.names() if not in_block(n)]    # read once: loaded, and copied as they are
    rest_tensors = files.read(rest)
    _load(model, dict(rest_tensors), outside, dtype, "the model outside its layer stack", tie=True)
    times["read"] += time.perf_counter() - t0

    # 2. the forward, block by block
    shared: dict = {}
    plan_modules: dict[str, dict] = {}
    folded: list[str] = []
    weight_map: dict[str, str] = {}
    stash: dict[int, tuple] = {}

    busy = []      # the block being prepared runs again inside prepare: no hooks then

    def pre(block: nn.Module, args: tuple, kwargs: dict) -> None:
        if busy:
            return
        path = names[id(block)]
        t1 = time.perf_counter()
        tensors = prefetch.take(path, in_files[path])
        k = order.index(path)
        if k + 1 < len(order):
            prefetch.start(order[k + 1], in_files[order[k + 1]])
        _load(model, tensors, [path + "." + n for n, _ in block.named_parameters()], dtype, path)
        del tensors
        times["read"] += time.perf_counter() - t1
        stash[id(block)] = (args, kwargs)

    def post(block: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if busy:
            return out
        path = names[id(block)]
        a, kw = stash.pop(id(block))
        t1 = time.perf_counter()
        busy.append(path)
        try:
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
        state = {f"{path}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        fn = f"model-{path.replace('.', '-')}.safetensors"
        writer.put(os.path.join(dst, fn), state)      # written while the next block is read and prepared
        weight_map.update({k: fn for k in state})
        del state
        for p, m in block.named_modules():
            if isinstance(m, PreparedModule):
                spec = m.spec()
                if "into" in spec:
                    spec = {**spec, "into": f"{path}.{spec['into']}"}
                plan_modules[f"{path}.{p}"] = spec
        block.to("meta")
        del block.bdpass_report
        times["write"] += time.perf_counter() - t2
        return out

    names = {id(m): p for p, m in blocks}
    order = [p for p, _ in blocks]
    in_files = {p: [n for n in files.names() if n.startswith(p + ".")] for p in order}
    prefetch = _Prefetch(files)
    writer = _Writer()
    rep.outside = rest
    if rest:        # written while the blocks run
        rest_bytes = sum(t.numel() * t.element_size() for t in rest_tensors.values())
        rep.bytes_before += rest_bytes
        rep.bytes_after += rest_bytes
        writer.put(os.path.join(dst, "model-outside-layers.safetensors"), rest_tensors)
        weight_map.update({n: "model-outside-layers.safetensors" for n in rest_tensors})
    del rest_tensors
    session = CaptureSession()      # one Dynamo cache for all blocks: a kind of block is traced once
    hooks = []
    for _, m in blocks:
        hooks.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(m.register_forward_hook(post, with_kwargs=True))
    vocab = int(getattr(config, "vocab_size", 0) or getattr(config.get_text_config(), "vocab_size", 0) or 2)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        prefetch.wait()
        torch._dynamo.reset()
        t2 = time.perf_counter()
        writer.close()
        times["write"] += time.perf_counter() - t2
    not_run = [p for p, _ in blocks if p not in rep.blocks]
    if not_run:
        raise RuntimeError(f"bdpass prepare: the example forward did not run block(s) {not_run[:3]}; "
                           f"prepare this model in memory with bdpass.prepare")

    # 3. the index, the config, the other files
    t3 = time.perf_counter()
    total = sum(os.path.getsize(os.path.join(dst, f)) for f in set(weight_map.values()))
    with open(os.path.join(dst, _INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total, "format": "pt"}, "weight_map": weight_map}, f, indent=2)
    plan = {"format": PLAN_FORMAT, "bdpass_version": _version(), "modules": plan_modules, "folded": sorted(folded)}
    cfg["quantization_config"] = {"quant_method": "bdpass", "plan": plan}
    cfg["bdpass"] = plan
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    for fn in os.listdir(src):
        if fn == "config.json" or fn == _INDEX or fn.endswith(".safetensors") or fn.endswith(".bin") \
                or fn.endswith(".pt") or os.path.isdir(os.path.join(src, fn)):
            continue
        shutil.copy2(os.path.join(src, fn), os.path.join(dst, fn))
    times["write"] += time.perf_counter() - t3
    rep.seconds = {**times, "total": time.perf_counter() - t_start}
    rep.peak_rss_bytes = _peak_rss()
    log.info("%s", rep)
    return rep
