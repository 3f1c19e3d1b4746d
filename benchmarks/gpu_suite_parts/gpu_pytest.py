"""``pytest -m gpu`` in a subprocess beside the checks: start it, wait for it within its
limit, and read its counts from the summary line. Its output goes to ``gpu_pytest.log``
beside the JSON.

The subprocess loads ``benchmarks/gpu_suite.py`` as a pytest plugin (``-p gpu_suite``),
whose ``pytest_configure`` registers the ``bd`` backend unless it resolves already
(bdpass not pip-installed).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

_PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")


def parse_pytest_summary(text: str) -> dict:
    """Counts from pytest's final summary line (the last line that has any)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "xfailed": 0, "xpassed": 0, "deselected": 0}
    for line in reversed(text.strip().splitlines()[-40:]):
        found = _PYTEST_COUNT.findall(line)
        if found and (" in " in line or "no tests ran" in line):
            for n, what in found:
                if what.startswith("warning"):
                    continue
                counts["errors" if what.startswith("error") else what] = int(n)
            counts["summary"] = line.strip(" =")
            return counts
    counts["summary"] = None
    return counts


def start_gpu_pytest(log_path: Path) -> tuple[subprocess.Popen, Any, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.pop("TRITON_INTERPRET", None)        # the gpu tests launch real kernels (or skip)
    env["PYTHONUNBUFFERED"] = "1"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", "-p", "gpu_suite",
           "-p", "no:cacheprovider"]
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    return proc, log, time.monotonic()


def finish_gpu_pytest(proc: subprocess.Popen, log, started: float, limit: float, log_path: Path) -> dict:
    timed_out = False
    try:
        proc.wait(timeout=max(1.0, limit - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)       # the process group this suite started
            proc.wait(timeout=10)
        except Exception:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            except Exception:
                pass
    log.close()
    text = log_path.read_text(errors="replace")
    res = parse_pytest_summary(text)
    res.update({"command": "python -m pytest -m gpu -q tests -p gpu_suite -p no:cacheprovider",
                "returncode": proc.returncode, "timed_out": timed_out, "limit_s": limit,
                "seconds": round(time.monotonic() - started, 1), "log": str(log_path), "tail": text[-3000:]})
    res["ok"] = (not timed_out and proc.returncode in (0, 5) and res["failed"] == 0 and res["errors"] == 0
                 and res["summary"] is not None)
    return res
