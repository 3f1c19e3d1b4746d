"""The custom ops ``bdpass::bd_project`` and ``bdpass::pivot_linear``: aten (CPU) path, fake
kernels, autograd, the fallback without Triton, the raw Triton kernels under
``TRITON_INTERPRET=1`` (in a subprocess, so that the interpreter never leaks into the rest
of the test session) and, on a CUDA machine, the compiled path.

Every result is compared with a float64 reference computed from the same (rounded) inputs,
against an elementwise error bound derived from the computation itself: with ``S`` the sum
of the absolute values of the terms of an output element (``|x_id| + |b| + sum |x_k w_k|``),
``K`` the length of its dot product and ``u`` the unit roundoff,

    |error| <= (gamma_{K+2}(u_acc) + n_round * u_out * (1 + gamma)) * S,
    gamma_n(u) = n u / (1 - n u),

where ``u_acc`` is float32's (all paths accumulate in float32), ``u_out`` the output
dtype's (doubled for bfloat16 under the Triton interpreter, whose float32 -> bfloat16
conversion truncates) and ``n_round`` counts the roundings to the output dtype on the path
(1 for a kernel that rounds once in its epilogue; up to 3 for the aten path, whose GEMM,
identity addition and bias addition may each round).
The pivot columns of ``pivot_linear`` carry their bound ``e_P`` into the other columns:
``e_R = e_P @ |coeff| + (gamma_{r+1} + n_round u_out (1 + gamma)) ((|y_P| + e_P) @ |coeff| + |b_r|)``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch

import inductor_lowerings

ROOT = Path(__file__).resolve().parents[1]

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11,
                 torch.float64: 2.0 ** -53}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _gamma(n: int, u: float) -> float:
    return n * u / (1.0 - n * u)


# ----------------------------------------------------------------------------- problems
@dataclass(frozen=True)
class BdCase:
    name: str
    lead: tuple            # leading dims of x; M = prod(lead)
    H: int
    G: int                 # head dim d_h (the number of identity rows per head)
    d_in: int
    shared: bool
    strided_x: bool = False      # x is a transposed (non-contiguous) view
    khg_weights: bool = False    # w_rest stored (d_in-g, H, g)-contiguous, viewed (H, d_in-g, g)
    config: Optional[tuple] = None   # explicit (BLOCK_M, BLOCK_N, BLOCK_K) for the raw kernel


@dataclass(frozen=True)
class PivotCase:
    name: str
    lead: tuple
    d_in: int
    r: int
    d_out: int
    strided_x: bool = False
    config: Optional[tuple] = None


BD_CASES = [
    BdCase("m1_g12", (1,), 2, 12, 40, False),
    BdCase("m7_g24_strided", (7,), 3, 24, 64, False, strided_x=True, config=(16, 32, 32)),
    BdCase("m300_g12", (2, 150), 2, 12, 48, False),
    BdCase("shared_m7_g12", (7,), 3, 12, 40, True, config=(16, 16, 32)),
    BdCase("shared_m300_g24_khg", (300,), 2, 24, 56, True, khg_weights=True),
    BdCase("shared_block_m1_g24", (1,), 4, 24, 40, True),
]
PIVOT_CASES = [
    PivotCase("m1", (1,), 40, 12, 30),
    PivotCase("m7_strided", (7,), 64, 24, 56, strided_x=True, config=(16, 32, 32)),
    PivotCase("m300", (3, 100), 48, 40, 72),
]
BIAS = {"bias": (True, True), "nobias": (False, False)}
PIVOT_BIAS = {"bias": (True, True), "nobias": (False, False), "bp_only": (True, False)}


def _sorted_subset(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.sort(torch.randperm(n, generator=g)[:k]).values


def _x(lead, d_in, dtype, strided, g):
    M = math.prod(lead)
    if strided:
        x = torch.randn(d_in, M, generator=g, dtype=torch.float64).to(dtype).t()
        return x.reshape(*lead, d_in) if len(lead) > 1 else x
    return torch.randn(*lead, d_in, generator=g, dtype=torch.float64).to(dtype)


def make_bd(case: BdCase, dtype: torch.dtype, bias: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    H, G, d_in = case.H, case.G, case.d_in
    K = d_in - G
    if case.name.startswith("shared_block"):
        rows = torch.arange(d_in - G, d_in).expand(H, G).contiguous()     # one contiguous block
    elif case.shared:
        rows = _sorted_subset(d_in, G, g).expand(H, G).contiguous()
    else:
        rows = torch.stack([_sorted_subset(d_in, G, g) for _ in range(H)])
    keep = torch.ones(H, d_in, dtype=torch.bool)
    keep.scatter_(1, rows, False)
    rest = torch.nonzero(keep)[:, 1].reshape(H, K)
    if case.khg_weights:
        w = (torch.randn(K, H, G, generator=g, dtype=torch.float64) / math.sqrt(K)).to(dtype).permute(1, 0, 2)
    else:
        w = (torch.randn(H, K, G, generator=g, dtype=torch.float64) / math.sqrt(K)).to(dtype)
    b = torch.randn(H, G, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return dict(x=_x(case.lead, d_in, dtype, case.strided_x, g), rows=rows, rest=rest, w_rest=w,
                bias=b, shared=case.shared)


def _out_unit(dtype: torch.dtype, truncating: bool) -> float:
    """Error of one rounding to ``dtype``: half an ulp (u) when rounding to nearest; a
    whole ulp (2u) for the Triton interpreter's float32 -> bfloat16 conversion, which
    truncates (a GPU rounds to nearest)."""
    return UNIT_ROUNDOFF[dtype] * (2.0 if truncating and dtype == torch.bfloat16 else 1.0)


def bd_reference(p: dict, n_round: int, truncating: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result and elementwise error bound of ``bd_project(**p)``."""
    x = p["x"].double()
    rows, rest, w = p["rows"], p["rest"], p["w_rest"].double()
    H, G = rows.shape
    K = rest.shape[1]
    ys, ss = [], []
    for h in range(H):
        xi, xr = x[..., rows[h]], x[..., rest[h]]
        y, s = xi + xr @ w[h], xi.abs() + xr.abs() @ w[h].abs()
        if p["bias"] is not None:
            b = p["bias"][h].double()
            y, s = y + b, s + b.abs()
        ys.append(y)
        ss.append(s)
    y, s = torch.cat(ys, -1), torch.cat(ss, -1)
    gam = _gamma(K + 2, UNIT_ROUNDOFF[torch.float32])
    tol = (gam + n_round * _out_unit(p["x"].dtype, truncating) * (1 + gam)) * s
    return y, tol


def make_pivot(case: PivotCase, dtype: torch.dtype, bias: tuple, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d_in, r, d_out = case.d_in, case.r, case.d_out
    pivots = _sorted_subset(d_out, r, g)
    keep = torch.ones(d_out, dtype=torch.bool)
    keep[pivots] = False
    rest = torch.nonzero(keep).flatten()
    w_p = (torch.randn(d_in, r, generator=g, dtype=torch.float64) / math.sqrt(d_in)).to(dtype)
    coeff = (torch.randn(r, d_out - r, generator=g, dtype=torch.float64) / math.sqrt(r)).to(dtype)
    b_p = torch.randn(r, generator=g, dtype=torch.float64).to(dtype) if bias[0] else None
    b_r = torch.randn(d_out - r, generator=g, dtype=torch.float64).to(dtype) if bias[1] else None
    return dict(x=_x(case.lead, d_in, dtype, case.strided_x, g), w_p=w_p, b_p=b_p, coeff=coeff, b_r=b_r,
                pivots=pivots, rest=rest)


def pivot_reference(p: dict, n_round: int, truncating: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 result and elementwise error bound of ``pivot_linear(**p)``."""
    x, w_p, c = p["x"].double(), p["w_p"].double(), p["coeff"].double()
    u_out, u32 = _out_unit(p["x"].dtype, truncating), UNIT_ROUNDOFF[torch.float32]
    d_in, r = w_p.shape
    yp, s1 = x @ w_p, x.abs() @ w_p.abs()
    if p["b_p"] is not None:
        yp, s1 = yp + p["b_p"].double(), s1 + p["b_p"].double().abs()
    g1 = _gamma(d_in + 2, u32)
    e1 = (g1 + n_round * u_out * (1 + g1)) * s1
    yr, s2 = yp @ c, (yp.abs() + e1) @ c.abs()
    if p["b_r"] is not None:
        yr, s2 = yr + p["b_r"].double(), s2 + p["b_r"].double().abs()
    g2 = _gamma(r + 2, u32)
    e2 = e1 @ c.abs() + (g2 + n_round * u_out * (1 + g2)) * s2
    d_out = r + c.shape[1]
    y = torch.empty(*x.shape[:-1], d_out, dtype=torch.float64)
    tol = torch.empty_like(y)
    y[..., p["pivots"]], y[..., p["rest"]] = yp, yr
    tol[..., p["pivots"]], tol[..., p["rest"]] = e1, e2
    return y, tol


def error_ratio(y: torch.Tensor, ref: torch.Tensor, tol: torch.Tensor) -> float:
    """max |y - ref| / tol (<= 1 passes); inf for a wrong shape or a non-finite value."""
    if tuple(y.shape) != tuple(ref.shape) or not bool(torch.isfinite(y).all()):
        return math.inf
    return float(((y.double().cpu() - ref) / tol).abs().max())


def _bd_args(p):
    return (p["x"], p["rows"], p["rest"], p["w_rest"], p["bias"], p["shared"])


def _pivot_args(p):
    return (p["x"], p["w_p"], p["b_p"], p["coeff"], p["b_r"], p["pivots"], p["rest"])


def _to(p: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}


# ----------------------------------------------------------------------------- aten path
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("bias", list(BIAS))
@pytest.mark.parametrize("case", BD_CASES, ids=[c.name for c in BD_CASES])
def test_bd_project_cpu(case, bias, dtype):
    p = make_bd(case, DTYPES[dtype], BIAS[bias][0])
    ref, tol = bd_reference(p, n_round=3)
    y = torch.ops.bdpass.bd_project(*_bd_args(p))
    assert y.dtype == p["x"].dtype and y.is_contiguous()
    assert error_ratio(y, ref, tol) <= 1.0


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("bias", list(PIVOT_BIAS))
@pytest.mark.parametrize("case", PIVOT_CASES, ids=[c.name for c in PIVOT_CASES])
def test_pivot_linear_cpu(case, bias, dtype):
    p = make_pivot(case, DTYPES[dtype], PIVOT_BIAS[bias])
    ref, tol = pivot_reference(p, n_round=2)
    y = torch.ops.bdpass.pivot_linear(*_pivot_args(p))
    assert y.dtype == p["x"].dtype and y.is_contiguous()
    assert error_ratio(y, ref, tol) <= 1.0


def test_shared_flag_matches_per_head():
    """With identical rows in every head, the shared GEMM and the per-head path agree."""
    case = BD_CASES[3]
    p = make_bd(case, torch.float64, True)
    shared = torch.ops.bdpass.bd_project(*_bd_args(p))
    per_head = torch.ops.bdpass.bd_project(*_bd_args({**p, "shared": False}))
    torch.testing.assert_close(shared, per_head, rtol=1e-12, atol=1e-12)


def test_tolerance_is_not_vacuous():
    """The bound catches a wrong result: dropping the identity term, or using rows of the
    wrong head, fails it by orders of magnitude."""
    p = make_bd(BD_CASES[2], torch.float32, True)
    ref, tol = bd_reference(p, n_round=3)
    x = p["x"]
    y = torch.ops.bdpass.bd_project(*_bd_args(p))
    no_identity = y - torch.cat([x[..., p["rows"][h]] for h in range(p["rows"].shape[0])], -1)
    assert error_ratio(no_identity, ref, tol) > 1e3
    swapped = torch.ops.bdpass.bd_project(*_bd_args({**p, "rows": p["rows"].flip(0), "rest": p["rest"].flip(0)}))
    assert error_ratio(swapped, ref, tol) > 1e3


# ----------------------------------------------------------------------------- fake kernels
def test_fake_kernels_shapes_and_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = make_bd(BD_CASES[2], torch.bfloat16, True)
    q = make_pivot(PIVOT_CASES[2], torch.float32, (True, True))
    with FakeTensorMode() as mode:
        pf = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
        qf = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in q.items()}
        y = torch.ops.bdpass.bd_project(*_bd_args(pf))
        assert tuple(y.shape) == (2, 150, 24) and y.dtype == torch.bfloat16
        z = torch.ops.bdpass.pivot_linear(*_pivot_args(qf))
        assert tuple(z.shape) == (3, 100, 72) and z.dtype == torch.float32
        with pytest.raises(RuntimeError, match="w_rest must have shape"):
            torch.ops.bdpass.bd_project(pf["x"], pf["rows"], pf["rest"], pf["w_rest"][:, 1:], None, False)
        with pytest.raises(RuntimeError, match="channels"):
            torch.ops.bdpass.bd_project(pf["x"][..., 1:], pf["rows"], pf["rest"], pf["w_rest"], None, False)
        with pytest.raises(RuntimeError, match="dtype"):
            torch.ops.bdpass.pivot_linear(qf["x"].to(torch.bfloat16), *_pivot_args(qf)[1:])
        with pytest.raises(RuntimeError, match="rest must have"):
            torch.ops.bdpass.pivot_linear(*_pivot_args(qf)[:6], qf["rest"][1:])


@pytest.mark.parametrize("op", ["bd_project", "bd_project_shared", "pivot_linear"])
def test_compile_aot_eager_dynamic(op):
    """The fake kernel lets Dynamo trace the op with symbolic token counts; one graph serves
    every size and matches eager."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    if op.startswith("bd_project"):
        p = make_bd(BD_CASES[4] if op.endswith("shared") else BD_CASES[1], torch.float32, True)
        args = list(_bd_args(p))
        fn = torch.ops.bdpass.bd_project
    else:
        p = make_pivot(PIVOT_CASES[1], torch.float32, (True, True))
        args = list(_pivot_args(p))
        fn = torch.ops.bdpass.pivot_linear
    d_in = args[0].shape[-1]

    def f(x, *rest):
        return torch.relu(fn(x * 2.0, *rest)) + 1.0

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True)
    for lead in ((2, 5), (3, 9), (4, 33)):
        x = torch.randn(*lead, d_in)
        torch._dynamo.mark_dynamic(x, 0)
        torch._dynamo.mark_dynamic(x, 1)
        torch.testing.assert_close(compiled(x, *args[1:]), f(x, *args[1:]), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1


def test_cpu_graph_for_inductor_is_aten():
    """Under AOTAutograd (what Inductor receives) both ops decompose into aten ops on the
    CPU: no opaque call to the op is left for Inductor to fall back on."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    p = make_bd(BD_CASES[1], torch.float32, True)
    q = make_pivot(PivotCase("c", (7,), 24, 8, 20), torch.float32, (True, True))

    def f(x):
        y = torch.ops.bdpass.bd_project(x, *_bd_args(p)[1:])
        return torch.ops.bdpass.pivot_linear(y[..., :24], *_pivot_args(q)[1:])

    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm

    compiled = torch.compile(f, backend=aot_autograd(fw_compiler=capture), dynamic=True, fullgraph=True)
    for M in (7, 19):
        x = torch.randn(M, 64)
        torch.testing.assert_close(compiled(x), f(x), rtol=1e-6, atol=1e-6)
    assert len(graphs) == 1
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    assert not any("bdpass" in t for t in targets), targets
    assert any("index_select" in t for t in targets) and any("index_copy" in t for t in targets), targets


@pytest.mark.slow
def test_compile_inductor_cpu():
    """Inductor on the CPU compiles the decomposition; its output matches eager."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    p = make_bd(BD_CASES[1], torch.float32, True)
    q = make_pivot(PivotCase("c", (7,), 24, 8, 20), torch.float32, (True, True))

    def f(x):
        y = torch.ops.bdpass.bd_project(x, *_bd_args(p)[1:])
        return torch.ops.bdpass.pivot_linear(y[..., :24], *_pivot_args(q)[1:])

    compiled = torch.compile(f, dynamic=True)
    for M in (7, 19):
        x = torch.randn(M, 64)
        out, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(out, f(x), rtol=1e-5, atol=1e-5)
    assert "bdpass" not in "\n".join(code)


# ----------------------------------------------------------------------------- autograd
def test_opcheck():
    """Schema, fake kernel, dynamic shapes under AOT dispatch and the autograd registration,
    checked by torch.library.opcheck (float64, inputs requiring grad)."""
    def grad(p):
        return {k: v.clone().requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in p.items()}

    for case, bias in ((BD_CASES[1], True), (BD_CASES[3], False)):
        p = grad(make_bd(case, torch.float64, bias))
        torch.library.opcheck(torch.ops.bdpass.bd_project.default, _bd_args(p))
    for bias in ("bias", "bp_only"):
        q = grad(make_pivot(PIVOT_CASES[0], torch.float64, PIVOT_BIAS[bias]))
        torch.library.opcheck(torch.ops.bdpass.pivot_linear.default, _pivot_args(q))


@pytest.mark.parametrize("which", ["per_head", "shared", "pivot"])
def test_gradcheck(which):
    if which == "pivot":
        q = make_pivot(PivotCase("g", (3,), 10, 3, 7), torch.float64, (True, True))
        q = {k: v.requires_grad_() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in q.items()}
        assert torch.autograd.gradcheck(lambda *a: torch.ops.bdpass.pivot_linear(*a), _pivot_args(q))
    else:
        case = BdCase("g", (3,), 2, 3, 7, which == "shared")
        p = make_bd(case, torch.float64, True)
        for k in ("x", "w_rest", "bias"):
            p[k] = p[k].clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda *a: torch.ops.bdpass.bd_project(*a), _bd_args(p))


# ----------------------------------------------------------------------------- without Triton
_NO_TRITON_SCRIPT = r"""
import sys
sys.modules["triton"] = None            # import triton -> ImportError
import torch
from torch._dynamo.backends.common import aot_autograd
import inductor_lowerings as il
assert not il.HAS_TRITON_KERNELS
from inductor_lowerings.aten_impl import bd_project_aten, pivot_linear_aten
H, G, d_in = 2, 4, 10
rows = torch.tensor([[0, 2, 5, 9], [1, 2, 3, 4]])
rest = torch.stack([torch.tensor([i for i in range(d_in) if i not in r]) for r in rows.tolist()])
w, b = torch.randn(H, d_in - G, G), torch.randn(H, G)
piv, oth = torch.tensor([1, 4]), torch.tensor([0, 2, 3, 5])
wp, c = torch.randn(H * G, 2), torch.randn(2, 4)
def f(x):
    return torch.ops.bdpass.pivot_linear(torch.ops.bdpass.bd_project(x, rows, rest, w, b, False),
                                         wp, None, c, None, piv, oth)
codes = []
def capture(gm, example_inputs):
    codes.append(gm.code)
    return gm
g = torch.compile(f, backend=aot_autograd(fw_compiler=capture), dynamic=True, fullgraph=True)
for M in (3, 11):
    x = torch.randn(M, d_in)
    ref = pivot_linear_aten(bd_project_aten(x, rows, rest, w, b, False), wp, None, c, None, piv, oth)
    torch.testing.assert_close(f(x), ref)
    torch.testing.assert_close(g(x), ref)
assert len(codes) == 1 and "bdpass" not in codes[0], codes
print("OK")
"""


def _subprocess_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(extra)
    return env


def test_ops_without_triton():
    """Without Triton the ops are plain custom ops with the aten implementation; under
    torch.compile they still decompose into aten ops (what Inductor receives)."""
    res = subprocess.run([sys.executable, "-c", _NO_TRITON_SCRIPT], capture_output=True, text=True,
                         env=_subprocess_env(), timeout=300, cwd=str(ROOT))
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout[-3000:] + res.stderr[-3000:]


# ----------------------------------------------------------------------------- Triton (interpreter)
def _interp_cases() -> list[tuple[str, str, object, str, object]]:
    """Every shape in both dtypes; the bias variants rotate over (shape, dtype) so that each
    dtype meets each variant (the interpreter is slow: no full cross product)."""
    out = []
    for i, case in enumerate(BD_CASES):
        for j, dt in enumerate(DTYPES):
            b = list(BIAS)[(i + j) % len(BIAS)]
            out.append((f"bd-{case.name}-{b}-{dt}", "bd", case, dt, b))
    for i, case in enumerate(PIVOT_CASES):
        for j, dt in enumerate(DTYPES):
            b = list(PIVOT_BIAS)[(i + 2 * j) % len(PIVOT_BIAS)]
            out.append((f"pivot-{case.name}-{b}-{dt}", "pivot", case, dt, b))
    return out


INTERP_CASES = _interp_cases()


def run_kernel_cases(device: str = "cpu") -> dict:
    """Run every case through the Triton launchers (autotuned kernel, or the raw kernel
    with the case's explicit block configuration); returns {case id: error ratio}."""
    from inductor_lowerings.triton_kernels import INTERPRET as interpreted
    from inductor_lowerings.triton_kernels import bd_project_triton, pivot_linear_triton

    results = {}
    for cid, kind, case, dt, b in INTERP_CASES:
        cfg = None if case.config is None else dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K"), case.config))
        if kind == "bd":
            p = make_bd(case, DTYPES[dt], BIAS[b][0])
            ref, tol = bd_reference(p, n_round=1, truncating=interpreted)
            y = bd_project_triton(*_bd_args(_to(p, device)), config=cfg)
        else:
            p = make_pivot(case, DTYPES[dt], PIVOT_BIAS[b])
            ref, tol = pivot_reference(p, n_round=1, truncating=interpreted)
            y = pivot_linear_triton(*_pivot_args(_to(p, device)), config=cfg)
        results[cid] = error_ratio(y, ref, tol)
    return results


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton")
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--interpret"],
                         capture_output=True, text=True, timeout=600, cwd=str(ROOT),
                         env=_subprocess_env(TRITON_INTERPRET="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cid", [c[0] for c in INTERP_CASES])
def test_triton_kernel_interpreted(interpreted_results, cid):
    assert interpreted_results[cid] <= 1.0, f"error / bound = {interpreted_results[cid]:.3g}"


def test_triton_ops_expose_their_kernels():
    """With Triton installed the ops are triton_ops: torch.compile can see (and the AOT
    autograd cache key covers) the kernels behind them."""
    pytest.importorskip("triton")
    from torch._library.triton import get_triton_kernels_for_op

    assert inductor_lowerings.HAS_TRITON_KERNELS
    names = {k: {getattr(getattr(t, "fn", t), "__name__", "") for t in get_triton_kernels_for_op(f"bdpass::{k}")}
             for k in ("bd_project", "pivot_linear")}
    assert "_bd_project_kernel" in names["bd_project"]
    assert {"_pivot_stage1_kernel", "_pivot_stage2_kernel"} <= names["pivot_linear"]


def test_cuda_branch_traces_to_triton_kernels():
    """Without a GPU, trace what AOTAutograd makes of the ops on (fake) CUDA tensors with a
    symbolic token count: each op becomes calls to its Triton kernels (no aten GEMM), with
    one grid per autotuning configuration and the arguments the kernels expect. (Inductor's
    analysis of which arguments a kernel writes needs a GPU; it logs a warning here.)"""
    pytest.importorskip("triton")
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    from inductor_lowerings.triton_kernels import CONFIGS

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake_cuda(shape, dtype=torch.bfloat16, dynamic_first=False):
        sizes = [DimDynamic.DYNAMIC if i == 0 and dynamic_first else DimDynamic.STATIC for i in range(len(shape))]
        t = mode.from_tensor(torch.empty(shape, dtype=dtype, device="meta"),
                             symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))
        t.fake_device = torch.device("cuda", 0)
        return t

    H, G, d_in, r, d_out = 2, 12, 40, 12, 30
    args = dict(x=fake_cuda((7, d_in), dynamic_first=True),
                rows=fake_cuda((H, G), torch.int64), rest=fake_cuda((H, d_in - G), torch.int64),
                w=fake_cuda((H, d_in - G, G)), b=fake_cuda((H, G)),
                wp=fake_cuda((d_in, r)), c=fake_cuda((r, d_out - r)), br=fake_cuda((d_out - r,)),
                piv=fake_cuda((r,), torch.int64), oth=fake_cuda((d_out - r,), torch.int64))

    def f(x, rows, rest, w, b, wp, c, br, piv, oth):
        return (torch.ops.bdpass.bd_project(x, rows, rest, w, b, False),
                torch.ops.bdpass.bd_project(x, rows, rest, w, None, True),
                torch.ops.bdpass.pivot_linear(x, wp, None, c, br, piv, oth))

    with mode:
        gm = make_fx(dispatch_functionalize(f), tracing_mode="symbolic")(*args.values())
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target)]
    names = [kernel_side_table.get_kernel(n.kwargs["kernel_idx"]).fn.__name__ for n in calls]
    assert names == ["_bd_project_kernel", "_bd_project_kernel", "_pivot_stage1_kernel", "_pivot_stage2_kernel"]
    for n in calls:
        kw = n.kwargs["kwargs"]
        assert len(n.kwargs["grid"]) == len(CONFIGS)
        assert isinstance(kw["M"], torch.fx.Node) and kw["M_BUCKET"] == 0   # symbolic token count
        assert kw["DOT_F32"] is False and kw["TF32"] is False
    assert [calls[0].kwargs["kwargs"]["SHARED"], calls[1].kwargs["kwargs"]["SHARED"]] == [False, True]
    assert [n.kwargs["kwargs"]["HAS_BIAS"] for n in calls] == [True, False, False, True]
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not any(k in t for t in ops for k in ("mm", "index_select", "index_copy", "bdpass")), ops


# ----------------------------------------------------------------------------- GPU
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
def test_gpu_kernels_eager():
    pytest.importorskip("triton")
    results = run_kernel_cases("cuda")
    bad = {k: v for k, v in results.items() if not v <= 1.0}
    assert not bad, bad


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("which", ["per_head", "shared"])
def test_gpu_compiled_bd_project(which, dtype):
    """Inductor launches the Triton kernel itself (no aten GEMM fallback), with symbolic
    token counts, and the result is within the kernel's bound."""
    pytest.importorskip("triton")
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    case = BdCase("gpu", (1,), 4, 64, 256, which == "shared")
    p_cpu = make_bd(case, dtype, True)
    p = _to(p_cpu, "cuda")
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(lambda x: torch.ops.bdpass.bd_project(x, *_bd_args(p)[1:]), backend=counter)
    for M in (7, 300, 1031):
        x = torch.randn(M, 256, dtype=torch.float64).to(dtype)
        xc = x.cuda()
        torch._dynamo.mark_dynamic(xc, 0)
        y, code = run_and_get_code(f, xc)
        ref, tol = bd_reference({**p_cpu, "x": x}, n_round=1)
        assert error_ratio(y, ref, tol) <= 1.0
    src = "\n".join(code)
    assert "_bd_project_kernel" in src
    assert "extern_kernels.mm" not in src and "extern_kernels.bmm" not in src
    assert counter.frame_count == 1


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_gpu_compiled_pivot_linear(dtype):
    pytest.importorskip("triton")
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    case = PivotCase("gpu", (1,), 256, 96, 320)
    p = make_pivot(case, dtype, (True, True))
    pc = _to(p, "cuda")
    counter = CompileCounterWithBackend("inductor")
    f = torch.compile(lambda x: torch.ops.bdpass.pivot_linear(x, *_pivot_args(pc)[1:]), backend=counter)
    for M in (7, 300, 1031):
        x = torch.randn(M, 256, dtype=torch.float64).to(dtype)
        xc = x.cuda()
        torch._dynamo.mark_dynamic(xc, 0)
        y, code = run_and_get_code(f, xc)
        ref, tol = pivot_reference({**p, "x": x}, n_round=1)
        assert error_ratio(y, ref, tol) <= 1.0
    src = "\n".join(code)
    assert "_pivot_stage1_kernel" in src and "_pivot_stage2_kernel" in src
    assert "extern_kernels.mm" not in src and "extern_kernels.addmm" not in src
    assert counter.frame_count == 1


@pytest.mark.gpu
@needs_cuda
def test_gpu_backward_matches_cpu():
    p = make_bd(BD_CASES[1], torch.float32, True)
    grads = []
    for dev in ("cpu", "cuda"):
        q = _to(p, dev)
        q["x"] = q["x"].detach().clone().requires_grad_()
        q["w_rest"] = q["w_rest"].detach().clone().requires_grad_()
        torch.ops.bdpass.bd_project(*_bd_args(q)).square().sum().backward()
        grads.append((q["x"].grad.cpu(), q["w_rest"].grad.cpu()))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-4)


if __name__ == "__main__" and "--interpret" in sys.argv:
    # Entry point of the interpreter subprocess (TRITON_INTERPRET=1 set by the fixture).
    assert os.environ.get("TRITON_INTERPRET") == "1"
    print(json.dumps(run_kernel_cases("cpu")))
