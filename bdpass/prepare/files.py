"""Safetensors checkpoint folders for ``bdpass prepare SRC DST``: reading tensors by name,
and writing the prepared folder on a background thread.

Most of a checkpoint's bytes are not changed by preparing it (the experts of a mixture of
experts, the MLPs next to a rewritten attention). Those tensors are not read into memory to
be written again: :meth:`Output.copy` writes a safetensors file of them whose data is
copied from the source files by the kernel (``os.copy_file_range``, as ``cp`` copies), byte
for byte, so they cost what copying them costs. The tensors that preparing made go through
memory (:meth:`Output.save`).
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
from typing import Any

import torch

__all__ = ["Folder", "Output", "INDEX"]

INDEX = "model.safetensors.index.json"
_KINDS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
_ITEM = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}


def read_header(path: str) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (``dtype``, ``shape``, ``data_offsets``) and the
    byte offset where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"bdpass prepare: {path} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Folder:
    """The tensors of a safetensors checkpoint folder, by name, read on demand."""

    def __init__(self, folder: str):
        from safetensors import safe_open

        self.folder = folder
        index = os.path.join(folder, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.where = dict(json.load(f)["weight_map"])
        elif os.path.exists(os.path.join(folder, "model.safetensors")):
            with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
                self.where = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"bdpass prepare: {folder} holds no model.safetensors nor {INDEX} "
                                    f"(only safetensors checkpoints are read)")
        self._headers: dict[str, tuple[dict, int]] = {}

    def names(self) -> list[str]:
        return list(self.where)

    def entry(self, name: str) -> tuple[str, dict, int]:
        """(file name, header entry, data start) of tensor ``name``."""
        fn = self.where[name]
        if fn not in self._headers:
            self._headers[fn] = read_header(os.path.join(self.folder, fn))
        header, start = self._headers[fn]
        return fn, header[name], start

    def nbytes(self, names: list[str]) -> int:
        total = 0
        for n in names:
            _, e, _ = self.entry(n)
            total += e["data_offsets"][1] - e["data_offsets"][0]
        return total

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
        for n in self.where:
            dt = _KINDS.get(self.entry(n)[1]["dtype"])
            if dt is not None:
                return dt
        return torch.get_default_dtype()


def _copy_range(src: int, dst: int, count: int, src_off: int, dst_off: int, kernel: list[bool]) -> None:
    """``count`` bytes from ``src`` at ``src_off`` to ``dst`` at ``dst_off``: in the kernel
    where it can (``copy_file_range``), else through a buffer (``kernel[0]`` is then set to
    False, and the caller's later ranges go through the buffer at once)."""
    while count > 0:
        n = 0
        if kernel[0] and hasattr(os, "copy_file_range"):
            try:
                n = os.copy_file_range(src, dst, count, src_off, dst_off)
            except OSError:         # not supported here, or across file systems
                kernel[0] = False
        if n <= 0:
            buf = os.pread(src, min(count, 64 << 20), src_off)
            if not buf:
                raise OSError(f"bdpass prepare: unexpected end of file copying {count} bytes")
            n = os.pwrite(dst, buf, dst_off)
        count, src_off, dst_off = count - n, src_off + n, dst_off + n


def copy_tensors(folder: Folder, names: list[str], path: str) -> int:
    """Write the safetensors file ``path`` holding the tensors ``names`` of ``folder``, their
    bytes copied unchanged. Returns the bytes written."""
    entries = []
    for n in names:
        fn, e, start = folder.entry(n)
        entries.append((n, fn, e, start))
    # widest elements first keeps every tensor aligned to its element size
    entries.sort(key=lambda x: (-_ITEM.get(x[2]["dtype"], 1), x[1], x[2]["data_offsets"][0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    runs: list[list] = []           # [src file, src offset, dst offset, length], merged when adjacent
    off = 0
    for n, fn, e, start in entries:
        b, end = e["data_offsets"]
        header[n] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [off, off + end - b]}
        if runs and runs[-1][0] == fn and runs[-1][1] + runs[-1][3] == start + b:
            runs[-1][3] += end - b
        else:
            runs.append([fn, start + b, off, end - b])
        off += end - b
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    fds: dict[str, int] = {}
    kernel = [True]
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(out, struct.pack("<Q", len(text)) + text)
        for fn, src_off, dst_off, length in runs:
            if fn not in fds:
                fds[fn] = os.open(os.path.join(folder.folder, fn), os.O_RDONLY)
            _copy_range(fds[fn], out, length, src_off, base + dst_off, kernel)
    finally:
        os.close(out)
        for fd in fds.values():
            os.close(fd)
    return base + off


class Output:
    """Writes the prepared folder's files on one background thread, in order: tensors from
    memory (:meth:`save`; at most ``hold`` bytes of them waiting, so memory stays bounded)
    and tensors copied from the source files (:meth:`copy`). Tensors in memory are written
    first; copies keep their order, so a later copy to the same path replaces the earlier
    one's file."""

    def __init__(self, folder: Folder, hold: int = 2 << 30) -> None:
        self.folder = folder
        self.hold = hold
        self.copied_bytes = 0
        self.jobs: list[tuple[str, str, float, float]] = []     # (kind, file, start, end), perf_counter
        self._waiting = 0
        self._copies = 0            # copies queued or running
        self._cond = threading.Condition()
        self._jobs: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bdpass-prepare-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from safetensors.torch import save_file

        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                # tensors waiting in memory go first; copies, and removals, keep their order
                i = next((i for i, j in enumerate(self._jobs) if j is not None and j[0] == "save"), 0)
                item = self._jobs.pop(i)
            if item is None:
                return
            kind, path, what, size = item
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    if kind == "save":
                        save_file(what, path, metadata={"format": "pt"})
                    elif kind == "remove":
                        if os.path.exists(path):
                            os.remove(path)
                    else:
                        self.copied_bytes += copy_tensors(self.folder, what, path)
                except BaseException as e:      # re-raised by the next call, or close
                    self._error = e
                self.jobs.append((kind, os.path.basename(path), t0, time.perf_counter()))
            del what
            with self._cond:
                self._waiting -= size
                self._copies -= kind == "copy"
                self._cond.notify_all()

    def _put(self, job: Any) -> None:
        with self._cond:
            self._jobs.append(job)          # None: the end, after everything queued before it
            self._cond.notify_all()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def save(self, path: str, tensors: dict[str, torch.Tensor]) -> None:
        self._check()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._cond:
            while self._waiting > 0 and self._waiting + size > self.hold and self._error is None:
                self._cond.wait()
            self._waiting += size
        self._put(("save", path, tensors, size))

    def copy(self, path: str, names: list[str]) -> None:
        self._check()
        with self._cond:
            self._copies += 1
        self._put(("copy", path, list(names), 0))

    def copying(self) -> bool:
        """Whether a copy is queued or running (the kernel then needs a core)."""
        return self._copies > 0

    def remove(self, path: str) -> None:
        """Remove ``path`` once what is queued before is written."""
        self._check()
        self._put(("remove", path, None, 0))

    def close(self) -> None:
        self._put(None)
        self._thread.join()
        self._check()
