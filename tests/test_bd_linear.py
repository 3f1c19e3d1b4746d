"""``bdpass::bd_linear``: a projection after basis decomposition in one op (block
implementation, reference, fake kernel, autograd, the Triton heads under the interpreter).

Problems are built from a dense projection ``W`` whose BD factors are exact in float64, so
every implementation is checked against ``x @ W`` computed in float64 from the rewritten
weights' own definition: ``y[:, cols_h] = x[:, S_t] + x[:, R_t] W'_h (+ b_h)``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import inductor_lowerings  # noqa: F401  (registers the ops)
from inductor_lowerings.bd_linear import bd_linear_blocks, bd_linear_reference, head_runs

ROOT = Path(__file__).resolve().parents[1]


def problem(M=7, d_in=24, g=6, H=4, tables="per_head", layout="contiguous", dense=(), bias=True,
            dtype=torch.float32, seed=0):
    """Random op arguments. ``tables``: per_head | shared | groups. ``layout``: contiguous
    (heads side by side) or interleaved (head h at 2*h*g, a dense block of g between heads).
    ``dense``: extra dense blocks (n,) placed after the heads."""
    gen = torch.Generator().manual_seed(seed)
    T = {"per_head": H, "shared": 1, "groups": 2}[tables]
    head_table = [h * T // H for h in range(H)]
    sel, rest = [], []
    for t in range(T):
        perm = torch.randperm(d_in, generator=gen)
        sel.append(perm[:g].sort().values)
        rest.append(perm[g:].sort().values)
    sel, rest = torch.stack(sel), torch.stack(rest)
    K = d_in - g
    dense_w, dense_b, dense_col, head_col = [], [], [], []
    col = 0
    for h in range(H):
        head_col.append(col)
        col += g
        if layout == "interleaved":
            dense_w.append(torch.randn(g, d_in, generator=gen))
            dense_b.append(torch.randn(g, generator=gen) if bias else None)
            dense_col.append(col)
            col += g
    for n in dense:
        dense_w.append(torch.randn(n, d_in, generator=gen))
        dense_b.append(torch.randn(n, generator=gen) if bias else None)
        dense_col.append(col)
        col += n
    w_rest = torch.randn(K, H * g, generator=gen)
    b_rest = torch.randn(H * g, generator=gen) if bias else None
    x = torch.randn(M, d_in, generator=gen)
    cast = (lambda t: None if t is None else t.to(dtype))
    return dict(x=x.to(dtype), sel=sel, rest=rest, w_rest=cast(w_rest), b_rest=cast(b_rest),
                head_table=head_table, head_col=head_col, w_dense=[cast(w) for w in dense_w],
                b_dense=[cast(b) for b in dense_b], dense_col=dense_col, d_out=col)


def expected64(p):
    """The definition, in float64 from the (rounded) arguments."""
    x = p["x"].double()
    y = torch.empty(x.shape[0], p["d_out"], dtype=torch.float64)
    g = p["sel"].shape[1]
    for h, (t, c) in enumerate(zip(p["head_table"], p["head_col"])):
        v = x[:, p["sel"][t]] + x[:, p["rest"][t]] @ p["w_rest"][:, h * g:(h + 1) * g].double()
        if p["b_rest"] is not None:
            v = v + p["b_rest"][h * g:(h + 1) * g].double()
        y[:, c:c + g] = v
    for w, b, c in zip(p["w_dense"], p["b_dense"], p["dense_col"]):
        v = x @ w.double().t()
        y[:, c:c + w.shape[0]] = v if b is None else v + b.double()
    return y


def _args(p):
    return (p["x"], p["sel"], p["rest"], p["w_rest"], p["b_rest"], p["head_table"], p["head_col"],
            p["w_dense"], p["b_dense"], p["dense_col"], p["d_out"])


def _bound(p, y64):
    """Elementwise rounding bound: up to 3 roundings to the output dtype (identity plus
    bias, GEMM result, their sum), each at most u_out times a partial sum (<= sum|terms|),
    plus float32 accumulation, gamma_{d_in+2}(u32) * sum|terms|."""
    u_out = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}[p["x"].dtype]
    x = p["x"].double().abs()
    mag = torch.zeros_like(y64)
    g = p["sel"].shape[1]
    for h, (t, c) in enumerate(zip(p["head_table"], p["head_col"])):
        v = x[:, p["sel"][t]] + x[:, p["rest"][t]] @ p["w_rest"][:, h * g:(h + 1) * g].double().abs()
        mag[:, c:c + g] = v
    for w, c in zip(p["w_dense"], p["dense_col"]):
        mag[:, c:c + w.shape[0]] = x @ w.double().abs().t()
    n = p["x"].shape[1] + 2
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    return 3 * u_out * (y64.abs() + mag) + gamma * mag + 1e-30


CASES = [dict(tables=t, layout=lay, dense=d, bias=b)
         for t in ("per_head", "shared", "groups") for lay in ("contiguous", "interleaved")
         for d, b in (((), True), ((5,), False))]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_match_definition(case, dtype):
    p = problem(dtype=dtype, **case)
    y64 = expected64(p)
    for impl in (bd_linear_blocks, bd_linear_reference, torch.ops.bdpass.bd_linear):
        y = impl(*_args(p))
        assert y.dtype == dtype and y.shape == y64.shape
        err = (y.double() - y64).abs()
        assert bool((err <= _bound(p, y64)).all()), (impl, float(err.max()))


def test_leading_dims_and_empty():
    p = problem(M=6, tables="shared")
    p["x"] = p["x"].reshape(2, 3, -1)
    y = torch.ops.bdpass.bd_linear(*_args(p))
    assert y.shape == (2, 3, p["d_out"])
    torch.testing.assert_close(y.reshape(6, -1), bd_linear_reference(*_args({**p, "x": p["x"].reshape(6, -1)})))
    p["x"] = p["x"].reshape(6, -1)[:0]
    assert torch.ops.bdpass.bd_linear(*_args(p)).shape == (0, p["d_out"])


def test_head_runs_coalesce_adjacent_heads_of_one_table():
    assert head_runs([0, 0, 0, 0], [0, 4, 8, 12], 4) == [(0, 4, 0)]
    assert head_runs([0, 0, 1, 1], [0, 4, 8, 12], 4) == [(0, 2, 0), (2, 4, 1)]
    assert head_runs([0, 0, 0], [0, 8, 12], 4) == [(0, 1, 0), (1, 3, 0)]
    assert head_runs([], [], 4) == []


def test_fake_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = problem(tables="shared", dense=(5,))
    with FakeTensorMode() as mode:
        fp = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else
                  [mode.from_tensor(t) if t is not None else None for t in v] if k in ("w_dense", "b_dense") else v)
              for k, v in p.items()}
        y = torch.ops.bdpass.bd_linear(*_args(fp))
        assert y.shape == (7, p["d_out"])
        bad = dict(fp, d_out=p["d_out"] + 1)
        with pytest.raises(Exception, match="cover"):
            torch.ops.bdpass.bd_linear(*_args(bad))


def test_opcheck_and_gradients():
    p = problem(M=5, d_in=12, g=3, H=2, tables="per_head", dense=(4,), dtype=torch.float64)
    torch.library.opcheck(torch.ops.bdpass.bd_linear.default, _args(p))
    x = p["x"].clone().requires_grad_(True)
    w = p["w_rest"].clone().requires_grad_(True)
    wd = [t.clone().requires_grad_(True) for t in p["w_dense"]]
    args = dict(p, x=x, w_rest=w, w_dense=wd)

    def f(x, w, wd0):
        return torch.ops.bdpass.bd_linear(x, p["sel"], p["rest"], w, p["b_rest"], p["head_table"],
                                          p["head_col"], [wd0], p["b_dense"], p["dense_col"], p["d_out"])
    assert torch.autograd.gradcheck(f, (x, w, wd[0]))
    del args


def test_compiles_as_an_opaque_op():
    """Inductor calls the op as an external kernel (no decomposition into gathers)."""
    p = problem(M=9, tables="shared", dense=(5,))

    def f(x):
        return torch.ops.bdpass.bd_linear(x, *_args(p)[1:]) * 2.0
    torch._dynamo.reset()
    y = torch.compile(f, backend="inductor", dynamic=True)(p["x"])
    torch.testing.assert_close(y, 2.0 * bd_linear_reference(*_args(p)))
    torch._dynamo.reset()


INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_bd_linear import problem, expected64, _bound
    from inductor_lowerings.triton_kernels import bd_heads_triton
    res = {{}}
    for tables in ("per_head", "shared", "groups"):
        for layout in ("contiguous", "interleaved"):
            for dtype in (torch.float32, torch.bfloat16):
                p = problem(M=37, d_in=40, g=8, H=3, tables=tables, layout=layout, dtype=dtype)
                y64 = expected64(p)
                out = torch.full((37, p["d_out"]), float("nan"), dtype=dtype)
                bd_heads_triton(p["x"], p["sel"], p["rest"], p["w_rest"], p["b_rest"], p["head_table"],
                                p["head_col"], out)
                g = p["sel"].shape[1]
                cols = [c + j for c in p["head_col"] for j in range(g)]
                err = (out[:, cols].double() - y64[:, cols]).abs()
                bound = 2 * _bound(p, y64)[:, cols]          # bf16 conversion truncates here
                others = [c for c in range(p["d_out"]) if c not in set(cols)]
                res[f"{{tables}}-{{layout}}-{{dtype}}"] = [bool((err <= bound).all()),
                                                          bool(torch.isnan(out[:, others]).all())]
    print(json.dumps(res))
""")


def test_triton_heads_interpreted():
    """The BD heads of the op through the Triton kernel (interpreter on CPU): each head lands
    at its column, untouched columns stay untouched."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = INTERPRETED.format(tests=str(ROOT / "tests"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == 12
    assert all(ok and untouched for ok, untouched in results.values()), results
