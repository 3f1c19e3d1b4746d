"""benchmarks/gpu_suite.py and benchmarks/gpu_table.py on the CPU.

The suite's dry run (``--dry-run``: Triton kernels through the interpreter, tiny shapes,
aot_eager lowering, CPU timers) runs once in a subprocess and its JSON is checked for the
structure the GPU run writes and for passing checks. The target logic, the time budget,
the failure accounting, the pytest summary parser and the backend registration without an
installed entry point are tested directly.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import benchmarks/<name>.py by path (benchmarks/ is not put on sys.path: its zoo.py
    would shadow tests/zoo.py for the other test modules)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


gpu_suite = _load("gpu_suite")
gpu_table = _load("gpu_table")

ENTRY_KEYS = {
    "bd_kv_projection": {"M", "dtype", "heads", "ms_bd", "ms_inductor", "ratio_vs_inductor", "ideal_gain", "form",
                         "correct", "bd_error_over_bound", "rel_err_bd", "rel_err_inductor", "calls_per_replay"},
    "bd_kv_module": {"M", "dtype", "heads", "ms_bd", "ms_inductor", "ratio_vs_inductor", "ideal_gain", "rewrites",
                     "report_form", "rel_err_bd", "rel_err_inductor"},
    "pifa_layer": {"M", "dtype", "ms_bd", "ms_inductor", "ratio_vs_inductor", "ideal_gain", "rewrites", "report_form",
                   "rel_err_bd", "rel_err_inductor"},
    "mla_block": {"tokens", "dtype", "ms_bd", "ms_inductor", "ratio_vs_inductor", "ideal_gain", "gain_fraction",
                  "rewrites", "report_form", "flops", "flops_saved"},
}
TARGET_NAMES = {"bd_kv_projection_large_m", "bd_kv_projection_small_m", "pifa_layer", "mla_block_flop_gain",
                "no_entry_below_floor", "kernel_checks"}


def _env() -> dict:
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)      # the suite sets it itself, before importing triton
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("gpu_suite") / "gpu.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=_env())
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads(out.read_text()), out


# ----------------------------------------------------------------------------- dry run
def test_dry_run_json_structure(dry):
    data = dry[0]
    assert data["dry_run"] is True and data["status"] == "complete"
    for k in ("device", "torch", "triton"):
        assert isinstance(data[k], str) and data[k]
    assert data["schema"] == gpu_suite.SCHEMA_VERSION
    for section, keys in ENTRY_KEYS.items():
        entries = data[section]
        assert entries, section
        for e in entries:
            assert keys <= set(e), (section, sorted(keys - set(e)))
            assert e["ms_bd"] > 0 and e["ms_inductor"] > 0
            assert math.isclose(e["ratio_vs_inductor"], e["ms_inductor"] / e["ms_bd"], rel_tol=1e-12)
            assert len(e["rounds_ms_bd"]) == len(e["rounds_ms_inductor"]) >= 1
    # the FLOP model: d_in / (d_in - d_h) for the projection, (d_in r + r d_out) / (d_in r + r (d_out - r)) for PIFA
    for e in data["bd_kv_projection"]:
        assert math.isclose(e["ideal_gain"], e["d_in"] / (e["d_in"] - e["d_h"]))
    for e in data["pifa_layer"]:
        d, r = e["d"], e["r"]
        assert math.isclose(e["ideal_gain"], (2 * d * r) / (d * r + r * (d - r)))
    for e in data["mla_block"] + data["bd_kv_module"]:
        assert e["flops_saved"] == e["flops_saved_expected"] > 0        # both BD rewrites were applied
        assert e["ideal_gain"] == e["ideal_gain_applied"] > 1.0
    assert set(data["section_seconds"]) >= {"kernel_checks", "compile_checks", "gpu_pytest", "measurements"}
    assert data["skipped"] == [] and data["errors"] == []
    if data["plot"]:
        assert Path(data["plot"]).is_file()
    else:
        assert data["plot_note"].startswith("no plot")


def test_dry_run_checks_pass_and_cover(dry):
    data = dry[0]
    kc = data["kernel_checks"]
    assert kc["failed"] == 0 and kc["passed"] == len(kc["cases"]) >= 40
    assert kc["interpret"] is True
    cases = kc["cases"]
    assert {c["dtype"] for c in cases} == {"fp32", "bf16", "fp16"}
    assert {c["kind"] for c in cases} == {"launcher", "op", "compiled_op"}
    names = " ".join(c["name"] for c in cases)
    for needle in ("/nobias/", "/bias/", "shared_", "m1_", "odd_", "pivot_linear_triton", "op pivot_linear",
                   "compiled bd_project_shared"):
        assert needle in names, needle
    assert all(c["error_ratio"] <= 1.0 for c in cases)

    cc = data["compile_checks"]
    assert cc["failed"] == 0 and cc["passed"] == len(cc["cases"]) >= 4
    by = {c["name"]: c for c in cc["cases"]}
    modes = {c["mode"] for c in cc["cases"]}
    assert {"default", "reduce-overhead", "max-autotune"} <= modes
    assert any(c["dynamic"] and len(c["sizes"]) > 1 for c in cc["cases"])
    mla = [c for c in cc["cases"] if c["model"] == "mla"]
    assert mla and all({"bd_qk", "bd_vo"} <= set(c["rewrites"]) for c in mla)
    assert all(c["rewrites"] == ["pifa"] for c in cc["cases"] if c["model"] == "pifa")
    for c in by.values():
        assert c["err_bd"] <= c["tolerance"] and c["error_ratio"] <= max(1.0, c["max_error_bound"])
    assert {r["kind"] for r in data["explain"]["mla"]["rewrites"]} == {"bd_qk", "bd_vo"}
    assert {r["kind"] for r in data["explain"]["pifa"]["rewrites"]} == {"pifa"}
    assert "Rewrites" in data["explain"]["pifa"]["text"]

    gp = data["gpu_pytest"]
    assert gp["ok"] and not gp["timed_out"] and gp["failed"] == 0 and gp["summary"]
    assert gp["skipped"] > 0          # every gpu test skips without CUDA: they were collected
    assert data["checks"]["all_passed"] is True


def test_dry_run_measurements_are_rewritten_and_correct(dry):
    data, _ = dry
    for e in data["bd_kv_projection"]:
        assert e["correct"] and e["bd_error_over_bound"] <= 1.0
        assert e["form"] in ("per_head", "shared")
        if "bd_linear" in e:      # the optional second op: timed and checked, or the reason why not
            bl = e["bd_linear"]
            assert "error" in bl or (bl["ms_bd"] > 0 and isinstance(bl["correct"], bool))
    assert any(e.get("backend_form") for e in data["bd_kv_projection"])
    for e in data["bd_kv_module"] + data["mla_block"]:
        assert {"bd_qk", "bd_vo"} <= set(e["rewrites"]) and not e["fallbacks"]
        assert e["report_form"]["bd_basis"]
    for e in data["pifa_layer"]:
        assert e["rewrites"] == ["pifa"] and not e["fallbacks"]
    for section in ("bd_kv_module", "pifa_layer"):
        for e in data[section]:
            assert e["rel_err_bd"] < 3e-2 and e["rel_err_inductor"] < 3e-2


def test_dry_run_targets(dry):
    data, _ = dry
    targets = {t["name"]: t for t in data["targets"]}
    assert set(targets) == TARGET_NAMES
    assert targets["kernel_checks"]["met"] is True
    # the dry run's M list stops below 1024: nothing covers the large-M target
    assert targets["bd_kv_projection_large_m"]["met"] is None and targets["bd_kv_projection_large_m"]["n"] == 0
    n_all = sum(len(data[s]) for s in gpu_suite.MEASUREMENT_SECTIONS)
    assert targets["no_entry_below_floor"]["n"] == n_all
    assert data["targets_met"] is False


def test_table_from_dry_run(dry, capsys):
    data, out = dry
    assert gpu_table.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "DRY RUN" in text and "| measurement | shape |" in text
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| measurement | shape |")) + 2
    rows = lines[start:lines.index("", start)]
    assert len(rows) == sum(len(data[s]) for s in gpu_suite.MEASUREMENT_SECTIONS)
    assert {r.split(" | ")[0] for r in rows} == {"| " + t for t in gpu_table.SECTION_TITLES.values()}
    assert "| kernel checks: 0 failed | yes |" in text
    assert f"Checks: kernels {data['kernel_checks']['passed']} passed, 0 failed" in text


# ----------------------------------------------------------------------------- targets
def _kv(M, dtype, ratio, heads=16):
    return {"M": M, "dtype": dtype, "heads": heads, "ratio_vs_inductor": ratio}


def _targets(data):
    return {t["name"]: t for t in gpu_suite.evaluate_targets(data)}


def test_targets_thresholds():
    data = {"bd_kv_projection": [_kv(1024, "float16", 1.30), _kv(65536, "bfloat16", 1.24), _kv(16, "float16", 1.20),
                                 _kv(16, "bfloat16", 1.16), _kv(64, "float16", 1.01)],
            "pifa_layer": [], "mla_block": [], "bd_kv_module": [],
            "kernel_checks": {"passed": 10, "failed": 0}}
    t = _targets(data)
    assert t["bd_kv_projection_large_m"]["met"] is False
    assert t["bd_kv_projection_large_m"]["worst_entry"] == {"M": 65536, "dtype": "bfloat16", "heads": 16}
    assert t["bd_kv_projection_small_m"]["met"] is True and t["bd_kv_projection_small_m"]["n"] == 2
    assert t["pifa_layer"]["met"] is None and t["mla_block_flop_gain"]["met"] is None
    assert t["no_entry_below_floor"]["met"] is True
    assert t["kernel_checks"]["met"] is True
    data["bd_kv_projection"][1]["ratio_vs_inductor"] = 1.26
    assert _targets(data)["bd_kv_projection_large_m"]["met"] is True
    # one dtype missing: the target is incomplete, and never counts as met overall
    data["bd_kv_projection"] = [e for e in data["bd_kv_projection"] if e["dtype"] == "float16"]
    t = _targets(data)
    assert t["bd_kv_projection_large_m"]["complete"] is False
    assert t["bd_kv_projection_large_m"]["missing_dtypes"] == ["bfloat16"]
    assert gpu_suite.all_targets_met(list(t.values())) is False


def test_targets_floor_gain_and_kernels():
    data = {"bd_kv_projection": [_kv(1024, "float16", 1.3), _kv(1024, "bfloat16", 1.3), _kv(16, "float16", 1.2),
                                 _kv(16, "bfloat16", 1.2)],
            "pifa_layer": [{"M": 16, "dtype": "float16", "ratio_vs_inductor": 1.27}],
            "mla_block": [{"tokens": 2048, "dtype": "float16", "ratio_vs_inductor": 1.09, "ideal_gain": 1.1}],
            "bd_kv_module": [{"M": 16, "dtype": "float16", "heads": 16, "ratio_vs_inductor": 0.99}],
            "kernel_checks": {"passed": 10, "failed": 0}}
    t = _targets(data)
    assert t["mla_block_flop_gain"]["met"] is True and math.isclose(t["mla_block_flop_gain"]["worst"], 0.9)
    assert gpu_suite.all_targets_met(list(t.values())) is True
    data["mla_block"][0]["ratio_vs_inductor"] = 1.07                       # 70% of the gain
    assert _targets(data)["mla_block_flop_gain"]["met"] is False
    data["mla_block"][0]["ratio_vs_inductor"] = 1.09
    data["bd_kv_module"][0]["ratio_vs_inductor"] = 0.97
    t = _targets(data)
    assert t["no_entry_below_floor"]["met"] is False
    assert t["no_entry_below_floor"]["worst_entry"]["section"] == "bd_kv_module"
    data["bd_kv_module"][0]["ratio_vs_inductor"] = 1.0
    data["kernel_checks"]["failed"] = 1
    t = _targets(data)
    assert t["kernel_checks"]["met"] is False and gpu_suite.all_targets_met(list(t.values())) is False
    data["kernel_checks"] = {"passed": 0, "failed": 0}                    # nothing ran is not a pass
    assert _targets(data)["kernel_checks"]["met"] is False
    # entries that errored (no ratio) are not measurements
    data["pifa_layer"] = [{"params": ["float16", 16], "error": "OOM"}]
    assert _targets(data)["pifa_layer"]["met"] is None


def test_gain_fraction():
    assert math.isclose(gpu_suite.gain_fraction(1.2, 1.25), 0.8)
    assert gpu_suite.gain_fraction(1.2, 1.0) is None and gpu_suite.gain_fraction(1.2, None) is None
    assert gpu_suite.gain_fraction(0.9, 1.1) < 0


def test_mla_flop_model():
    # DeepSeek-V2-Lite attention, one token: projections and one (causal) score/value pair
    f, saved = gpu_suite.mla_block_flops(1, hidden=2048, heads=16, latent=512, nope=128, rope=64, v=128)
    proj = 2 * (2048 * 16 * 192 + 2048 * 576 + 512 * 16 * 256 + 16 * 128 * 2048)
    assert f == proj + 2 * 16 * 192 + 2 * 16 * 128
    assert saved == 2 * 16 * (128 ** 2 + 128 ** 2)
    f2, s2 = gpu_suite.mla_block_flops(2048, hidden=2048, heads=16, latent=512, nope=128, rope=64, v=128)
    assert s2 == 2048 * saved and f2 > 2048 * proj         # attention grows faster than linear


# ----------------------------------------------------------------------------- plumbing
def test_budget_and_cost_model():
    now = [100.0]
    b = gpu_suite.Budget(60, clock=lambda: now[0])
    assert b.allows(60) and not b.allows(61)
    now[0] = 150.0
    assert math.isclose(b.left(), 10.0) and not b.allows(11) and b.allows(9)
    c = gpu_suite.CostModel({"a": 5.0})
    assert c.estimate("a") == 5.0 and c.estimate("b") == 10.0
    for s in (2.0, 30.0, 4.0):
        c.record("a", s)
    assert c.estimate("a") == 4.0


def test_out_of_budget_measurements_are_recorded_as_skipped(tmp_path):
    args = gpu_suite.parse_args(["--dry-run", "--budget-s", "0", "--out", str(tmp_path / "g.json")])
    suite = gpu_suite.Suite(args)
    suite.measurements()
    core, ext = suite.plan()
    assert len(suite.data["skipped"]) == len(set(core + ext))
    assert all(s["reason"].startswith("time budget") for s in suite.data["skipped"])
    assert all(suite.data[s] == [] for s in gpu_suite.MEASUREMENT_SECTIONS)


def test_a_failing_section_is_recorded_and_the_suite_goes_on(tmp_path):
    out = tmp_path / "g.json"
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--dry-run", "--out", str(out)]))
    suite.section("broken", lambda: 1 / 0)
    ran = []
    suite.section("next", lambda: ran.append(1))
    data = json.loads(out.read_text())
    assert ran == [1]
    assert [e["where"] for e in data["errors"]] == ["broken"] and "ZeroDivisionError" in data["errors"][0]["error"]
    assert set(data["section_seconds"]) == {"broken", "next"}


def test_kernel_checks_count_a_wrong_kernel_as_failed(tmp_path, monkeypatch):
    """A launcher that drops the identity term fails every one of its cases; a correct one
    passes them all (the launchers are replaced by aten implementations, so no Triton
    kernel runs here)."""
    pytest.importorskip("triton")
    import inductor_lowerings.triton_kernels as tkern
    from inductor_lowerings.aten_impl import bd_project_aten, pivot_linear_aten

    def wrong_bd(x, rows, rest, w_rest, bias, shared=False, *, config=None):
        y = bd_project_aten(x.double(), rows, rest, w_rest.double(), None if bias is None else bias.double(), shared)
        return (y - x.double()[..., rows.reshape(-1) if not shared else rows[0].repeat(rows.shape[0])]).to(x.dtype)

    def right_pivot(x, w_p, b_p, coeff, b_r, pivots, rest, *, config=None):
        d = (lambda t: None if t is None else t.double())
        return pivot_linear_aten(x.double(), w_p.double(), d(b_p), coeff.double(), d(b_r), pivots, rest).to(x.dtype)

    monkeypatch.setattr(tkern, "bd_project_triton", wrong_bd)
    monkeypatch.setattr(tkern, "pivot_linear_triton", right_pivot)
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--dry-run", "--out", str(tmp_path / "g.json")]))
    suite.kernel_checks()
    kc = suite.data["kernel_checks"]
    launchers = [c for c in kc["cases"] if c["kind"] == "launcher"]
    bad = [c for c in launchers if c["name"].startswith("bd_project_triton")]
    good = [c for c in launchers if c["name"].startswith("pivot_linear_triton")]
    assert bad and good
    assert all(not c["ok"] and c["error_ratio"] > 1.0 for c in bad)
    assert all(c["ok"] for c in good)
    assert kc["failed"] == len(bad) and kc["passed"] == len(kc["cases"]) - len(bad)


def test_compile_check_failure_reasons(tmp_path, monkeypatch):
    """A compile check fails when an expected rewrite is missing (here: BD turned off)."""
    pytest.importorskip("transformers")
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--dry-run", "--out", str(tmp_path / "g.json")]))
    orig = suite.bd
    monkeypatch.setattr(suite, "bd", lambda mode=None, **o: orig(mode, pifa=False, **o))
    entry = suite._compile_case("pifa", None, "fp32", False, [(2, 5)], None)
    assert entry["ok"] is False and "expected rewrites ['pifa'], got []" in entry["why"]
    monkeypatch.setattr(suite, "bd", orig)
    assert suite._compile_case("pifa", None, "fp32", False, [(2, 5)], None)["ok"] is True


def test_parse_pytest_summary():
    text = "....s.\n=== 3 failed, 12 passed, 4 skipped, 560 deselected, 2 warnings in 81.22s (0:01:21) ===\n"
    c = gpu_suite.parse_pytest_summary(text)
    assert (c["failed"], c["passed"], c["skipped"], c["deselected"], c["errors"]) == (3, 12, 4, 560, 0)
    assert c["summary"].startswith("3 failed")
    c = gpu_suite.parse_pytest_summary("x\n1 passed, 1 error in 2.00s\n")
    assert c["errors"] == 1 and c["passed"] == 1
    assert gpu_suite.parse_pytest_summary("Traceback ...\nKilled\n")["summary"] is None


def test_default_out_path(monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    assert gpu_suite.default_out_path(None) == ROOT / "benchmarks" / "results" / "gpu.json"
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_suite.default_out_path(None) == tmp_path / "gpu.json"
    assert gpu_suite.default_out_path("/x/y.json") == Path("/x/y.json")


_NO_ENTRY_POINT = r"""
import importlib.metadata as md
_orig = md.entry_points
def entry_points(**kw):
    eps = _orig(**kw)
    if kw.get("group") == "torch_dynamo_backends":
        return md.EntryPoints([e for e in eps if e.name != "bd"])
    return eps
md.entry_points = entry_points          # as on a machine where bdpass is not pip-installed
import sys
sys.path.insert(0, "benchmarks")
import torch
from torch._dynamo.backends import registry
try:
    registry.lookup_backend("bd")
    raise SystemExit("bd resolved without the suite")
except SystemExit:
    raise
except Exception:
    pass
import gpu_suite
print(gpu_suite.ensure_bd_registered())
assert registry.lookup_backend("bd") is __import__("bdpass").bd_backend
print(gpu_suite.ensure_bd_registered())
with torch.no_grad():
    y = torch.compile(torch.nn.Linear(4, 3), backend="bd", options={"lowering": "eager"})(torch.ones(2, 4))
print(tuple(y.shape))
"""


def test_backend_registered_without_entry_point():
    res = subprocess.run([sys.executable, "-c", _NO_ENTRY_POINT], capture_output=True, text=True, timeout=300,
                         cwd=str(ROOT), env=_env())
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines == ["registered by benchmarks/gpu_suite.py", "found (entry point or earlier registration)", "(2, 3)"]


def test_measurement_plan_core_first_and_interleaved():
    suite = gpu_suite.Suite(gpu_suite.parse_args(["--out", "/dev/null"]))
    suite.dry = False
    core, ext = suite.plan()
    assert {c[0] for c in core} == set(gpu_suite.MEASUREMENT_SECTIONS)
    kv = [c for c in core + ext if c[0] == "bd_kv_projection"]
    assert {c[1] for c in kv} == {"float16", "bfloat16"} and {c[2] for c in kv} == {16, 128}
    assert min(c[3] for c in kv) == 16 and max(c[3] for c in kv) == 65536
    assert {c[1] for c in core + ext if c[0] == "pifa_layer"} == {"float16"}
    # a budget cut after a quarter of the extended grid still reaches every section
    assert {c[0] for c in ext[: len(ext) // 4]} == set(gpu_suite.MEASUREMENT_SECTIONS)
