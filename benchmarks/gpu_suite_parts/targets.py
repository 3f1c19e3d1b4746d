"""The speed targets: thresholds, and each target evaluated against a gpu.json record.

Pure data and pure functions (no torch): :func:`evaluate_targets` is what the suite
writes under ``targets`` after every save; ``benchmarks/gpu_table.py`` reads that list
from the JSON.
"""
from __future__ import annotations

import math
from typing import Optional

MEASUREMENT_SECTIONS = ("bd_kv_projection", "bd_kv_module", "pifa_layer", "mla_block")

# Speed targets (issue #13). Pure data, read by evaluate_targets (gpu_table.py reads the
# thresholds from the JSON's targets).
KV_LARGE_M, KV_LARGE_RATIO = 1024, 1.25
KV_SMALL_M, KV_SMALL_RATIO = 16, 1.15
PIFA_RATIO = 1.25
MLA_GAIN_FRACTION = 0.80
FLOOR_RATIO = 0.98


def _entry_key(e: dict) -> dict:
    return {k: e[k] for k in ("M", "tokens", "dtype", "heads") if k in e}


def measured(data: dict, section: str) -> list[dict]:
    return [e for e in data.get(section) or []
            if isinstance(e.get("ratio_vs_inductor"), (int, float)) and math.isfinite(e["ratio_vs_inductor"])]


def _ratio_target(name: str, description: str, entries: list[dict], threshold: float,
                  required_dtypes: tuple = ()) -> dict:
    out = {"name": name, "description": description, "threshold": threshold, "n": len(entries),
           "met": None, "worst": None, "worst_entry": None, "complete": True}
    if required_dtypes:
        missing = sorted(set(required_dtypes) - {e.get("dtype") for e in entries})
        if missing:
            out["complete"] = False
            out["missing_dtypes"] = missing
    if not entries:
        return out
    worst = min(entries, key=lambda e: e["ratio_vs_inductor"])
    out["worst"] = worst["ratio_vs_inductor"]
    out["worst_entry"] = _entry_key(worst)
    out["met"] = bool(worst["ratio_vs_inductor"] >= threshold)
    return out


def gain_fraction(ratio: float, ideal: float) -> Optional[float]:
    """Share of the FLOP model's gain that was realised: (ratio - 1) / (ideal - 1)."""
    if ideal is None or not ideal > 1.0 or ratio is None:
        return None
    return (ratio - 1.0) / (ideal - 1.0)


def evaluate_targets(data: dict) -> list[dict]:
    """The issue's targets against the measured entries of ``data`` (a gpu.json dict).

    ``met`` is True/False, or None when no entry covers the target (not measured, or
    skipped for time); ``complete`` is False when a dtype the target names is missing."""
    kv = measured(data, "bd_kv_projection")
    half = ("float16", "bfloat16")
    targets = [
        _ratio_target("bd_kv_projection_large_m",
                      f"BD K/V projection >= {KV_LARGE_RATIO}x Inductor for M >= {KV_LARGE_M} (fp16 and bf16)",
                      [e for e in kv if e["M"] >= KV_LARGE_M and e["dtype"] in half], KV_LARGE_RATIO, half),
        _ratio_target("bd_kv_projection_small_m",
                      f"BD K/V projection >= {KV_SMALL_RATIO}x Inductor for M <= {KV_SMALL_M}",
                      [e for e in kv if e["M"] <= KV_SMALL_M and e["dtype"] in half], KV_SMALL_RATIO, half),
        _ratio_target("pifa_layer", f"PIFA layer (d=4096, r=2048) >= {PIFA_RATIO}x Inductor",
                      measured(data, "pifa_layer"), PIFA_RATIO),
    ]
    mla = [e for e in measured(data, "mla_block") if e.get("ideal_gain")]
    t = {"name": "mla_block_flop_gain",
         "description": f"MLA block prefill realises >= {MLA_GAIN_FRACTION:.0%} of the FLOP-model gain "
                        "((ratio - 1) / (ideal - 1))",
         "threshold": MLA_GAIN_FRACTION, "n": len(mla), "met": None, "worst": None, "worst_entry": None,
         "complete": True}
    fracs = [(gain_fraction(e["ratio_vs_inductor"], e["ideal_gain"]), e) for e in mla]
    fracs = [(f, e) for f, e in fracs if f is not None]
    if fracs:
        f, e = min(fracs, key=lambda fe: fe[0])
        t.update(worst=f, worst_entry=_entry_key(e), met=bool(f >= MLA_GAIN_FRACTION))
    targets.append(t)
    every = [dict(e, section=s) for s in MEASUREMENT_SECTIONS for e in measured(data, s)]
    floor = _ratio_target("no_entry_below_floor", f"no measured entry below {FLOOR_RATIO}x Inductor",
                          every, FLOOR_RATIO)
    if floor["worst_entry"] is not None:
        worst = min(every, key=lambda e: e["ratio_vs_inductor"])
        floor["worst_entry"]["section"] = worst["section"]
    targets.append(floor)
    kc = data.get("kernel_checks") or {}
    targets.append({"name": "kernel_checks", "description": "kernel checks: 0 failed",
                    "threshold": 0, "n": int(kc.get("passed", 0)) + int(kc.get("failed", 0)),
                    "met": (kc.get("failed") == 0 and kc.get("passed", 0) > 0) if kc else None,
                    "worst": kc.get("failed"), "worst_entry": None, "complete": bool(kc)})
    return targets


def all_targets_met(targets: list[dict]) -> bool:
    return bool(targets) and all(t["met"] is True and t.get("complete", True) for t in targets)
