"""The JSON record: where it goes and how it is written.

The record is one dict (``Suite.data``), rewritten whole after every section and every
measurement so that a run cut short still leaves a readable file.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]

SCHEMA_VERSION = 1


def default_out_path(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg)
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / "gpu.json"
    return ROOT / "benchmarks" / "results" / "gpu.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    return str(x)


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=1))
    os.replace(tmp, path)
