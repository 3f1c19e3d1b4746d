"""Deciding by measuring: time a site's original computation and its candidate lowerings on
the machine the model runs on, at the graph's token count, and remember the result.

Each measurement runs the candidates on random inputs of the site's shape, dtype and device,
interleaved (original, candidate 1, candidate 2, ... repeated), and keeps each one's median.
Results are cached on disk per machine (``$BDPASS_CACHE_DIR/timings.json``, default
``~/.cache/bdpass``), keyed by the machine (device name, CPU threads, torch version) and the
problem (op, shapes, dtype, form), so a site shape is timed once per machine: the 27 layers
of a model share one measurement, and later compilations none. The file is updated under
an exclusive lock and replaced atomically, so concurrent processes can share it.

When timing is impossible (fake or meta tensors) the caller falls back to the roofline
estimate of :mod:`bdpass.cost`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger("bdpass")

# Time spent measuring one problem is bounded: each candidate runs at least MIN_REPEATS
# times and stops after about TARGET_SECONDS (per candidate) or MAX_REPEATS.
MIN_REPEATS = 5
MAX_REPEATS = 25
TARGET_SECONDS = 0.15
WARMUP = 2

_memory: dict[str, dict[str, float]] = {}
spent = 0.0          # seconds spent measuring in this process (cache hits cost nothing)


def cache_path() -> Path:
    root = os.environ.get("BDPASS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "bdpass")
    return Path(root) / "timings.json"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """What a timing depends on besides the problem: the device and the software."""
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"{_cpu_name()} x{torch.get_num_threads()} threads ({torch.backends.cpu.get_cpu_capability()})"
    return f"{dev} | torch {torch.__version__}"


def key(device: torch.device, problem: Mapping[str, Any]) -> str:
    return machine(device) + " | " + json.dumps(problem, sort_keys=True, default=str)


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(str(path) + ".lock", "a+")
    try:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:      # no fcntl (Windows): last writer wins, entries are idempotent
            pass
        yield
    finally:
        lock.close()


def _read(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store(k: str, value: dict[str, float]) -> None:
    path = cache_path()
    try:
        with _locked(path):
            data = _read(path)
            data[k] = value
            fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".timings.")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
    except OSError as e:     # a read-only home: keep the result in memory only
        log.info("bdpass: could not write the timing cache %s (%s)", path, e)


def lookup(k: str) -> dict[str, float] | None:
    if k in _memory:
        return _memory[k]
    v = _read(cache_path()).get(k)
    if isinstance(v, dict):
        _memory[k] = v
        return v
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, problem: Mapping[str, Any],
            candidates: Mapping[str, Callable[[], Any]]) -> dict[str, float]:
    """Median seconds of each candidate (a callable with no arguments), cached per machine and
    problem. Candidates are run interleaved so that drifts of the machine hit all alike."""
    k = key(device, problem)
    got = lookup(k)
    if got is not None and set(candidates) <= set(got):
        return {n: got[n] for n in candidates}
    global spent
    t_start = time.perf_counter()
    names = list(candidates)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(WARMUP):
                candidates[n]()
        _sync(device)
        start = time.perf_counter()
        for rep in range(MAX_REPEATS):
            for n in names:
                t0 = time.perf_counter()
                candidates[n]()
                _sync(device)
                samples[n].append(time.perf_counter() - t0)
            if rep + 1 >= MIN_REPEATS and time.perf_counter() - start > TARGET_SECONDS * len(names):
                break
    result = {n: statistics.median(v) for n, v in samples.items()}
    spent += time.perf_counter() - t_start
    merged = {**(got or {}), **result}
    _memory[k] = merged
    _store(k, merged)
    return result
