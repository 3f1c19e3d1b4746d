"""Deciding by measuring: time a site's original computation and its candidate lowerings on
the machine the model runs on, at the graph's token count; apply a candidate only when the
measurement is *sure* it pays, and remember sure results.

**Sampling.** The candidates run on random inputs of the site's shape, dtype and device in
interleaved rounds (original, candidate 1, candidate 2, ..., the order rotated and reversed
from round to round, :func:`round_order`, so that drifts of the machine and a call's position
in the round hit all alike): at least ``MIN_REPEATS`` rounds, then
until about ``TARGET_SECONDS`` per candidate or ``MAX_REPEATS`` rounds.

**Estimates.** Another process can only add time to a call, never remove it, so each
candidate has three estimates that a busy machine distorts differently: its fastest call (its
*floor*), its median call, and the ratios ``o_i / c_i`` of the calls of each round (the two
ran back to back, so a slow phase of the machine hits both). No single one is the quiet
time: on the 2-core CPU with other jobs running, the floors alone claimed a win 3 times
against bf16 sites that every median put at 0.2-0.9x (the load never paused during one
candidate's calls), and the medians of a same site moved from 0.39x to 0.90x between runs (a
median timing is what once stored 1.59x for a ``kv_b_proj`` form that runs at 0.87x).

**Verdict.** For each candidate ``c`` against the original ``o``, with ``th = 1 / (1 -
cost.MARGIN)``:

* *pays* when the floors' ratio, the medians' ratio and the whole confidence interval of the
  median per-round ratio (:func:`median_interval`: distribution-free, about 95%) are all at
  or above ``th``;
* *slower* when all three lie below it and so does the floors' interval, each time taken as
  its floor plus its spread (``q25 - floor``);
* *unsure* otherwise, and with fewer than ``SURE_ROUNDS`` rounds (a busy machine stretches
  each round, and the time bound stops early) unless the candidate is at least twice slower.

A candidate whose floor ratio exceeds ``cost.PLAUSIBLE`` times the speedup its FLOPs and bytes
allow (:func:`bdpass.cost.pifa_ideal`, :func:`bdpass.cost.bd_ideal`) is *implausible*: a bad
measurement, not a win. Unsure and implausible candidates are measured again with the
original (up to ``EXTRA_BATCHES`` more batches of rounds, each bounded like the first); a
candidate still unsure or implausible after that is not applied, and the caller's skip reason
quotes its ratio, its interval and the word ``unsure`` (or the bound it exceeded).

Evidence (``python benchmarks/timing_noise.py --tokens 256 --reps 4 --out
benchmarks/results/timing_noise_256.json``, the same with ``--tokens 1024``, then ``python
benchmarks/timing_noise.py --judge benchmarks/results/timing_noise_*.json`` to judge the
recorded rounds again, torch 2.15.0 on the 2-core Intel Xeon; 144 samples of 25 interleaved rounds of the PIFA pair d=1024, r=512 and the MLA
block's ``kv_b_proj`` forms, fp32 and bf16, quiet, with 3 bursty or 3 steady busy processes
on the 2 cores; truth = the quiet medians: fp32 forms 1.09-1.18x, bf16 0.52-0.90x): this rule
gave no verdict on the wrong side, and on the quiet machine it was sure of 46 of the 48
samples. The rule it replaced (floor interval and interquartile range of the per-round ratios
both clear of ``th``) was also never wrong but sure of only 35 of 48 quiet samples: it left
the fp32 PIFA pair (1.11x) and the grouped form (1.09x) unsure half the time on a quiet
machine, so a fresh process declined a real gain at random.

**Cache and re-validation.** Results are cached on disk per machine
(``$BDPASS_CACHE_DIR/timings.json``, default ``~/.cache/bdpass``), keyed by the machine
(device name, CPU threads, torch version) and the problem (op, shapes, dtype, form). Each entry
records every candidate's floor, lower quartile, median and number of calls, the verdicts
with their intervals, whether the measurement was sure (``final``), the versions it was
measured with (torch, bdpass, and a hash of the ops' implementation in ``inductor_lowerings``)
and when. The policy:

* an entry measured while unsure (or implausible) is stored with ``final: false``: the
  process that measured it keeps its verdict (the 27 layers of a model share one
  measurement), every later process measures again;
* a final entry is re-validated once per process, the first time it is used, by a short
  confirmation (``CONFIRM_REPEATS`` interleaved rounds of the original and the candidates the
  entry says pay, or its fastest one if none does); the entry is kept only when the
  confirmation reaches the same sure verdict, otherwise (it disagrees, or the machine is too
  busy for it to be sure) the problem is measured afresh and the new result replaces the
  entry. A confirmation costs 2 x ``CONFIRM_REPEATS`` calls per site shape, against
  ``MIN_REPEATS`` to ``MAX_REPEATS`` rounds of every candidate for a measurement; a wrong entry
  costs one more measurement in the next process, not a wrong decision;
* an entry is stale, and measured afresh, when it is older than ``MAX_AGE_DAYS``, when any of
  its versions or the margin differs, when its ratio is implausible, and when it has an older
  format (such entries are never trusted).

``bdpass cache show`` lists the entries, ``bdpass cache clear`` removes them. The file is
updated under an exclusive lock and replaced atomically, so concurrent processes can share it.

When timing is impossible (fake or meta tensors) the caller falls back to the roofline
estimate of :mod:`bdpass.cost`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from . import cost

log = logging.getLogger("bdpass")

# Time spent measuring one problem is bounded: each candidate runs at least MIN_REPEATS
# times and stops after about TARGET_SECONDS (per candidate) or MAX_REPEATS; at most
# EXTRA_BATCHES more such batches re-measure the unsure candidates.
MIN_REPEATS = 5
MAX_REPEATS = 25
TARGET_SECONDS = 0.15
WARMUP = 2
EXTRA_BATCHES = 3
SURE_ROUNDS = 10          # fewer paired rounds are sure only of a candidate twice slower at best
CONFIRM_REPEATS = SURE_ROUNDS
MAX_AGE_DAYS = 30.0
QUANTILE = 0.25
CONFIDENCE_Z = 1.96       # the median interval of the per-round ratios: about 95%
FORMAT = 3                # 3: lo/hi are the median interval (2: the interquartile range)
BASELINE = "original"

_memory: dict[str, "Measured"] = {}     # entries measured or confirmed in this process
spent = 0.0          # seconds spent measuring in this process (cache hits cost nothing)
_ops_hash: str | None = None


# ---------------------------------------------------------------------------- keys
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


def versions() -> dict[str, str]:
    """The software a measurement depends on: torch, bdpass and the ops' implementation (a
    hash of the ``inductor_lowerings`` sources, so that any change to a kernel re-measures)."""
    global _ops_hash
    if _ops_hash is None:
        h = hashlib.sha1()
        try:
            import inductor_lowerings

            root = Path(inductor_lowerings.__file__).parent
            for p in sorted(root.glob("*.py")):
                h.update(p.name.encode())
                h.update(p.read_bytes())
            _ops_hash = h.hexdigest()[:12]
        except (ImportError, OSError, TypeError):
            _ops_hash = "unknown"
    from . import __version__

    return {"torch": torch.__version__, "bdpass": __version__, "ops": _ops_hash}


# ---------------------------------------------------------------------------- statistics
def threshold() -> float:
    """The smallest speedup that pays: ``1 / (1 - cost.MARGIN)``."""
    return 1.0 / (1.0 - cost.MARGIN)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = q * (len(s) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


def summary(samples: Sequence[float]) -> dict[str, float]:
    """Floor (fastest call), lower quartile, median and number of calls of one candidate."""
    return {"n": len(samples), "min": min(samples), "q25": _quantile(samples, QUANTILE),
            "median": statistics.median(samples)}


def spread(st: Mapping[str, float]) -> float:
    """Relative distance of the lower quartile above the floor."""
    return st["q25"] / st["min"] - 1.0 if st["min"] > 0 else float("inf")


STATES = ("pays", "slower", "unsure", "implausible")


@dataclass
class Verdict:
    """How a candidate compares with the original: ``ratio`` = original / candidate (floors),
    ``[lo, hi]`` its uncertainty, ``state`` one of ``pays``, ``slower`` (both sure),
    ``unsure``, ``implausible`` (above ``cost.PLAUSIBLE`` times ``bound``, the speedup its
    FLOPs and bytes allow)."""
    ratio: float
    lo: float
    hi: float
    state: str
    bound: float | None = None
    rounds: int = 0

    @property
    def sure(self) -> bool:
        return self.state in ("pays", "slower")

    def describe(self) -> str:
        if self.state == "unsure":
            return (f"{self.ratio:.2f}x (unsure: {self.lo:.2f}-{self.hi:.2f}x over {self.rounds} rounds, "
                    f"the calls scattered too much to tell)")
        if self.state == "implausible":
            return (f"{self.ratio:.2f}x (implausible: its FLOPs and bytes allow {self.bound:.2f}x, "
                    f"a disturbed measurement; not trusted)")
        return f"{self.ratio:.2f}x"

    def as_json(self) -> dict:
        return {"ratio": self.ratio, "lo": self.lo, "hi": self.hi, "state": self.state, "bound": self.bound,
                "rounds": self.rounds}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Verdict":
        v = cls(float(d["ratio"]), float(d["lo"]), float(d["hi"]), str(d["state"]),
                None if d.get("bound") is None else float(d["bound"]), int(d.get("rounds", 0)))
        if v.state not in STATES:
            raise ValueError(f"unknown state {v.state!r}")
        return v


def median_interval(ratios: Sequence[float], z: float = CONFIDENCE_Z) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of ``ratios``: the order
    statistics ``k`` and ``n - 1 - k`` of the sorted ratios, ``k = floor((n - z sqrt(n)) / 2)``
    (the binomial count of ratios below the median, within ``z`` standard deviations)."""
    s = sorted(ratios)
    n = len(s)
    if n == 0:
        return 0.0, float("inf")
    k = max(0, int(math.floor((n - z * math.sqrt(n)) / 2)))
    return s[k], s[n - 1 - k]


def judge(rounds: Sequence[Mapping[str, float]], name: str, baseline: str = BASELINE,
          bound: float | None = None) -> Verdict:
    """The verdict on ``name`` from interleaved rounds (each a dict name -> seconds; a round
    may lack ``name``). See the module docstring."""
    base = [r[baseline] for r in rounds if baseline in r]
    pairs = [(r[baseline], r[name]) for r in rounds if baseline in r and name in r]
    cand = [r[name] for r in rounds if name in r]
    if not base or not cand:
        raise ValueError(f"no samples of {baseline!r} or {name!r}")
    f_o, q_o = min(base), _quantile(base, QUANTILE)
    f_c, q_c = min(cand), _quantile(cand, QUANTILE)
    s_o, s_c = q_o - f_o, q_c - f_c         # each time within its floor +- this spread
    ratio = f_o / f_c if f_c > 0 else float("inf")
    m_c = statistics.median(cand)
    medians = statistics.median(base) / m_c if m_c > 0 else float("inf")
    hi_floor = (f_o + s_o) / (f_c - s_c) if f_c - s_c > 0 else float("inf")
    lo, hi = median_interval([o / c for o, c in pairs if c > 0])
    th = threshold()
    if bound is not None and ratio > bound * cost.PLAUSIBLE:
        state = "implausible"
    elif len(pairs) < SURE_ROUNDS and not max(hi, hi_floor) < th / 2:
        state = "unsure"              # too few rounds to resolve the floors, unless far slower
    elif lo >= th and ratio >= th and medians >= th:
        state = "pays"
    elif hi < th and ratio < th and medians < th and hi_floor < th:
        state = "slower"
    else:
        state = "unsure"
    return Verdict(ratio, lo, hi, state, bound, len(pairs))


class Measured(dict):
    """Seconds of each candidate (its floor), with the verdicts against the original
    (``verdicts``), each candidate's :func:`summary` (``stats``), whether every verdict is
    sure (``final``) and where it came from (``origin``: measured, confirmed, memory)."""

    def __init__(self, seconds: Mapping[str, float], stats: Mapping[str, Mapping[str, float]],
                 verdicts: Mapping[str, Verdict], origin: str = "measured",
                 measured_at: float | None = None):
        super().__init__(seconds)
        self.stats = dict(stats)
        self.verdicts = dict(verdicts)
        self.origin = origin
        self.measured_at = time.time() if measured_at is None else measured_at

    @property
    def final(self) -> bool:
        return all(v.sure for v in self.verdicts.values())

    def subset(self, names: Sequence[str], origin: str | None = None) -> "Measured":
        return Measured({n: self[n] for n in names}, {n: self.stats[n] for n in names if n in self.stats},
                        {n: v for n, v in self.verdicts.items() if n in names},
                        origin or self.origin, self.measured_at)

    def entry(self) -> dict:
        return {"format": FORMAT, "seconds": dict(self), "stats": self.stats,
                "verdicts": {n: v.as_json() for n, v in self.verdicts.items()},
                "final": self.final, "margin": cost.MARGIN, "versions": versions(),
                "measured_at": self.measured_at}


def verdict(secs: Mapping[str, float], name: str, baseline: str = BASELINE) -> Verdict:
    """The verdict on ``name`` in a result of :func:`measure`; a plain mapping of seconds
    (e.g. a roofline estimate) is taken at its word: sure, plausible."""
    v = getattr(secs, "verdicts", {}).get(name)
    if v is not None:
        return v
    o, c = secs[baseline], secs[name]
    ratio = o / c if c > 0 else float("inf")
    return Verdict(ratio, ratio, ratio, "pays" if c <= (1.0 - cost.MARGIN) * o else "slower")


def pays(secs: Mapping[str, float], name: str, baseline: str = BASELINE) -> bool:
    """Whether ``name`` is surely faster than the baseline by the margin (and plausibly so)."""
    return verdict(secs, name, baseline).state == "pays"


def describe(secs: Mapping[str, float], name: str, baseline: str = BASELINE) -> str:
    """``1.12x`` for a sure verdict; the interval and ``unsure`` (or the bound exceeded)
    otherwise."""
    return verdict(secs, name, baseline).describe()


# ---------------------------------------------------------------------------- plausibility
def ideal(problem: Mapping[str, Any], name: str) -> float | None:
    """The largest speedup of candidate ``name`` that the problem's FLOPs and bytes allow
    (``None``: no bound known for this op)."""
    try:
        op = problem.get("op")
        if op == "pifa":
            return cost.pifa_ideal(int(problem["M"]), int(problem["d_in"]), int(problem["r"]),
                                   int(problem["d_out"]))
        if op == "bd_linear":
            blocks = problem["blocks"][name]
            return cost.bd_ideal(int(problem["M"]), int(problem["d_in"]), int(problem["d_out"]),
                                 [(int(g), int(n)) for g, n in blocks])
    except (KeyError, TypeError, ValueError):
        return None
    return None


# ---------------------------------------------------------------------------- the file
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


def _write(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=".timings.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=0, sort_keys=True)
    os.replace(tmp, path)


def _store(k: str, value: dict) -> None:
    path = cache_path()
    try:
        with _locked(path):
            data = _read(path)
            data[k] = value
            _write(path, data)
    except OSError as e:     # a read-only home: keep the result in memory only
        log.info("bdpass: could not write the timing cache %s (%s)", path, e)


def entries() -> dict:
    """Every entry of the cache file, as stored."""
    return _read(cache_path())


def clear() -> int:
    """Remove every entry of the cache file (and this process's memory of them); returns how
    many there were."""
    path = cache_path()
    _memory.clear()
    if not path.exists():
        return 0
    with _locked(path):
        n = len(_read(path))
        _write(path, {})
    return n


def parse_entry(value: Any, problem: Mapping[str, Any] | None = None) -> tuple[Measured | None, str]:
    """(the entry as a trusted result, "") or (None, why it is not trusted)."""
    if not isinstance(value, dict) or value.get("format") != FORMAT:
        return None, "an entry of an older format"
    try:
        seconds = {str(n): float(s) for n, s in value["seconds"].items()}
        stats = {str(n): {k: float(x) for k, x in st.items()} for n, st in value["stats"].items()}
        verdicts = {str(n): Verdict.from_json(v) for n, v in value["verdicts"].items()}
        measured_at = float(value["measured_at"])
        vers = dict(value["versions"])
        margin = float(value["margin"])
        final = bool(value["final"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return None, f"an unreadable entry ({type(e).__name__}: {e})"
    m = Measured(seconds, stats, verdicts, "cache", measured_at)
    if not final or not m.final:
        return None, "measured while unsure (the calls scattered too much to tell)"
    if vers != versions():
        return None, f"measured with other versions ({vers} != {versions()})"
    if margin != cost.MARGIN:
        return None, f"measured for another margin ({margin})"
    age = (time.time() - measured_at) / 86400.0
    if not (0.0 <= age <= MAX_AGE_DAYS):
        return None, f"measured {age:.0f} days ago (entries expire after {MAX_AGE_DAYS:g})"
    for n, v in verdicts.items():
        b = ideal(problem, n) if problem is not None else None
        if b is not None and v.ratio > b * cost.PLAUSIBLE:
            return None, f"an implausible ratio {v.ratio:.2f}x for {n} (at most {b * cost.PLAUSIBLE:.2f}x)"
    return m, ""


def lookup(k: str) -> Measured | None:
    """This process's result for a key, or the trusted (not yet confirmed) cache entry."""
    if k in _memory:
        return _memory[k]
    got, _ = parse_entry(_read(cache_path()).get(k))
    return got


# ---------------------------------------------------------------------------- measuring
def can_time(t: torch.Tensor) -> bool:
    """Whether ``t``'s device can run the candidates for real (not a fake or meta tensor)."""
    from ._compat import is_fake

    return not is_fake(t) and t.device.type in ("cpu", "cuda")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_order(names: Sequence, i: int) -> list:
    """The order of round ``i``: rotated by one place every two rounds and reversed every
    other round, so that over ``2 len(names)`` rounds each name runs once in every position
    in each direction (with 3 or more names, reversing alone would keep the middle ones in
    the middle: a call's position moved its time by several percent on the 2-core CPU)."""
    names = list(names)
    rot = (i // 2) % max(len(names), 1)
    order = names[rot:] + names[:rot]
    return order[::-1] if i % 2 else order


def _rounds(device: torch.device, candidates: Mapping[str, Callable[[], Any]], names: Sequence[str],
            min_rounds: int, max_rounds: int, warmup: int) -> list[dict[str, float]]:
    """Interleaved rounds of ``names`` (order reversed every other round): a list of dicts
    name -> seconds. At least ``min_rounds``, then until about TARGET_SECONDS per name or
    ``max_rounds``."""
    out: list[dict[str, float]] = []
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                candidates[n]()
        _sync(device)
        start = time.perf_counter()
        for rep in range(max_rounds):
            r: dict[str, float] = {}
            for n in round_order(names, rep):
                t0 = time.perf_counter()
                candidates[n]()
                _sync(device)
                r[n] = time.perf_counter() - t0
            out.append(r)
            if rep + 1 >= min_rounds and time.perf_counter() - start > TARGET_SECONDS * len(names):
                break
    return out


def _result(rounds: list[dict[str, float]], names: Sequence[str], baseline: str,
            bounds: Mapping[str, float | None]) -> Measured:
    samples = {n: [r[n] for r in rounds if n in r] for n in names}
    stats = {n: summary(v) for n, v in samples.items()}
    verdicts = {}
    if baseline in names:
        verdicts = {n: judge(rounds, n, baseline, bounds.get(n)) for n in names if n != baseline}
    return Measured({n: st["min"] for n, st in stats.items()}, stats, verdicts)


def _measure_fresh(device, candidates, names, baseline, bounds) -> Measured:
    rounds = _rounds(device, candidates, names, MIN_REPEATS, MAX_REPEATS, WARMUP)
    res = _result(rounds, names, baseline, bounds)
    for _ in range(EXTRA_BATCHES):
        redo = [n for n, v in res.verdicts.items() if not v.sure]
        if not redo:
            break
        rounds += _rounds(device, candidates, [baseline] + redo, MIN_REPEATS, MAX_REPEATS, 0)
        res = _result(rounds, names, baseline, bounds)
    return res


def _confirm(device, stored: Measured, candidates, names, baseline, bounds) -> tuple[bool, str]:
    """A short confirmation run of a final cache entry (see the module docstring)."""
    check = [n for n, v in stored.verdicts.items() if n in names and v.state == "pays"]
    if not check and stored.verdicts:
        check = [max((n for n in stored.verdicts if n in names), key=lambda n: stored.verdicts[n].ratio)]
    if not check:
        return True, ""
    rounds = _rounds(device, candidates, [baseline] + check, CONFIRM_REPEATS, CONFIRM_REPEATS, WARMUP)
    for n in check:
        now = judge(rounds, n, baseline, bounds.get(n))
        if now.state != stored.verdicts[n].state:
            return False, (f"{n}: cached {stored.verdicts[n].describe()} ({stored.verdicts[n].state}), "
                           f"now {now.describe()} ({now.state})")
    return True, ""


def measure(device: torch.device, problem: Mapping[str, Any], candidates: Mapping[str, Callable[[], Any]],
            *, baseline: str = BASELINE, bounds: Mapping[str, float | None] | None = None) -> Measured:
    """Seconds of each candidate (a callable with no arguments; its floor), with verdicts
    against ``baseline`` (see :func:`pays`, :func:`describe`), cached per machine and problem
    and re-validated as the module docstring says. ``bounds``: the largest plausible speedup
    of each candidate (default: :func:`ideal` of the problem)."""
    global spent
    k = key(device, problem)
    names = list(candidates)
    if bounds is None:
        bounds = {n: ideal(problem, n) for n in names if n != baseline}
    got = _memory.get(k)
    if got is not None and set(names) <= set(got):
        return got.subset(names, "memory")
    t_start = time.perf_counter()
    try:
        value = _read(cache_path()).get(k)
        stored, why = parse_entry(value, problem) if value is not None else (None, "")
        if stored is not None and set(names) <= set(stored):
            ok, why = _confirm(device, stored, candidates, names, baseline, bounds)
            if ok:
                res = stored.subset(names, "confirmed")
                _memory[k] = res
                return res
            why = f"the cached verdict did not hold ({why})"
        if why:
            log.info("bdpass: timing %s again: %s", problem.get("op", "problem"), why)
        res = _measure_fresh(device, candidates, names, baseline, bounds)
        if not res.final:
            log.info("bdpass: timing %s: unsure after %d rounds (%s); not cached as final",
                     problem.get("op", "problem"), max((v.rounds for v in res.verdicts.values()), default=0),
                     ", ".join(f"{n} {v.describe()}" for n, v in res.verdicts.items() if not v.sure))
        _memory[k] = res
        _store(k, res.entry())
        return res
    finally:
        spent += time.perf_counter() - t_start
