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
from inductor_lowerings.bd_linear import bd_linear_blocks, bd_linear_reference

ROOT = Path(__file__).resolve().parents[1]


def problem(M=7, d_in=24, g=6, H=4, tables="per_head", layout="contiguous", dense=(), bias=True,
            dtype=torch.float32, seed=0, second_size=0):
    """Random op arguments. ``tables``: per_head | shared | groups (of 2). ``layout``:
    contiguous (heads side by side) or interleaved (a dense block of g after each head).
    ``dense``: extra dense blocks (n,) placed after the heads. ``second_size``: if > 0, two
    more heads of that size with a table of their own."""
    gen = torch.Generator().manual_seed(seed)
    T = {"per_head": H, "shared": 1, "groups": 2}[tables]
    head_table = [h * T // H for h in range(H)]
    sel, rest = [], []

    def table(size):
        perm = torch.randperm(d_in, generator=gen)
        sel.append(perm[:size].sort().values)
        rest.append(perm[size:].sort().values)
        return len(sel) - 1
    tabs = [table(g) for _ in range(T)]
    weight, bias_, block_table, block_col = [], [], [], []
    col = 0

    def block(t, n):
        nonlocal col
        weight.append(torch.randn(rest[t].numel(), n, generator=gen))
        bias_.append(torch.randn(n, generator=gen) if bias else None)
        block_table.append(t)
        block_col.append(col)
        col += n
    dense_t = None
    for h in range(H):
        block(tabs[head_table[h]], g)
        if layout == "interleaved":
            dense_t = table(0) if dense_t is None else dense_t
            block(dense_t, g)
    if second_size:
        t2 = table(second_size)
        block(t2, 2 * second_size)
    for n in dense:
        dense_t = table(0) if dense_t is None else dense_t
        block(dense_t, n)
    cast = (lambda t: None if t is None else t.to(dtype))
    x = torch.randn(M, d_in, generator=gen)
    return dict(x=x.to(dtype), sel=sel, rest=rest, weight=[cast(w) for w in weight],
                bias=[cast(b) for b in bias_], block_table=block_table, block_col=block_col, d_out=col)


def expected64(p):
    """The definition, in float64 from the (rounded) arguments."""
    x = p["x"].double()
    y = torch.empty(x.shape[0], p["d_out"], dtype=torch.float64)
    for w, b, t, c in zip(p["weight"], p["bias"], p["block_table"], p["block_col"]):
        n = w.shape[1]
        g = p["sel"][t].numel()
        v = x[:, p["rest"][t]] @ w.double()
        if g:
            v = v + x[:, p["sel"][t]].repeat(1, n // g)
        y[:, c:c + n] = v if b is None else v + b.double()
    return y


def _args(p):
    return (p["x"], p["sel"], p["rest"], p["weight"], p["bias"], p["block_table"], p["block_col"], p["d_out"])


def _bound(p, y64):
    """Elementwise rounding bound: up to 3 roundings to the output dtype (identity plus
    bias, GEMM result, their sum), each at most u_out times a partial sum (<= sum|terms|),
    plus float32 accumulation, gamma_{d_in+2}(u32) * sum|terms|."""
    u_out = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8}[p["x"].dtype]
    x = p["x"].double().abs()
    mag = torch.zeros_like(y64)
    for w, b, t, c in zip(p["weight"], p["bias"], p["block_table"], p["block_col"]):
        n = w.shape[1]
        g = p["sel"][t].numel()
        v = x[:, p["rest"][t]] @ w.double().abs()
        if g:
            v = v + x[:, p["sel"][t]].repeat(1, n // g)
        mag[:, c:c + n] = v if b is None else v + b.double().abs()
    n = p["x"].shape[1] + 2
    gamma = n * 2.0 ** -24 / (1 - n * 2.0 ** -24)
    return 3 * u_out * (y64.abs() + mag) + gamma * mag + 1e-30


CASES = [dict(tables=t, layout=lay, dense=d, bias=b, second_size=s2)
         for t in ("per_head", "shared", "groups") for lay in ("contiguous", "interleaved")
         for d, b, s2 in (((), True, 0), ((5,), False, 3))]


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


def test_fake_checks():
    from torch._subclasses.fake_tensor import FakeTensorMode

    p = problem(tables="shared", dense=(5,))
    with FakeTensorMode() as mode:
        def fake(v):
            if isinstance(v, torch.Tensor):
                return mode.from_tensor(v)
            if isinstance(v, list) and v and any(isinstance(t, torch.Tensor) for t in v):
                return [None if t is None else mode.from_tensor(t) for t in v]
            return v
        fp = {k: fake(v) for k, v in p.items()}
        y = torch.ops.bdpass.bd_linear(*_args(fp))
        assert y.shape == (7, p["d_out"])
        with pytest.raises(Exception, match="cover"):
            torch.ops.bdpass.bd_linear(*_args(dict(fp, d_out=p["d_out"] + 1)))
        with pytest.raises(Exception, match="whole heads"):
            bad = dict(fp, weight=[w[:, :-1] if i == 0 else w for i, w in enumerate(fp["weight"])],
                       bias=[None] * len(fp["bias"]), d_out=p["d_out"] - 1)
            torch.ops.bdpass.bd_linear(*_args(bad))


def test_opcheck_and_gradients():
    p = problem(M=5, d_in=12, g=3, H=2, tables="per_head", dense=(4,), dtype=torch.float64)
    torch.library.opcheck(torch.ops.bdpass.bd_linear.default, _args(p))
    x = p["x"].clone().requires_grad_(True)
    w0 = p["weight"][0].clone().requires_grad_(True)
    wd = p["weight"][-1].clone().requires_grad_(True)

    def f(x, w0, wd):
        weight = [w0, *p["weight"][1:-1], wd]
        return torch.ops.bdpass.bd_linear(x, p["sel"], p["rest"], weight, p["bias"], p["block_table"],
                                          p["block_col"], p["d_out"])
    assert torch.autograd.gradcheck(f, (x, w0, wd))


def test_compiles_as_an_opaque_op():
    """Inductor calls the op as an external kernel (no decomposition into gathers)."""
    from torch._inductor.utils import run_and_get_code

    p = problem(M=9, tables="shared", dense=(5,))

    def f(x):
        return torch.ops.bdpass.bd_linear(x, *_args(p)[1:]) * 2.0
    torch._dynamo.reset()
    y, code = run_and_get_code(torch.compile(f, backend="inductor", dynamic=True), p["x"])
    torch.testing.assert_close(y, 2.0 * bd_linear_reference(*_args(p)))
    assert "bdpass.bd_linear" in "\n".join(code)
    torch._dynamo.reset()


def test_is_exporting_under_compile_and_export():
    """What the prepared modules branch on (the op, or plain aten ops for an exported
    program): False under torch.compile, True under torch.export, strict or not. (torch
    2.11's Dynamo folds ``torch.compiler.is_exporting()`` to True under torch.compile too.)"""
    from bdpass._compat import is_exporting

    class M(torch.nn.Module):
        def forward(self, x):
            return x + 1 if is_exporting() else x - 1

    x = torch.zeros(2)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(M(), backend="eager", fullgraph=True)(x), x - 1)
    for strict in (False, True):
        torch._dynamo.reset()
        assert torch.equal(torch.export.export(M(), (x,), strict=strict).module()(x), x + 1), strict
    assert not is_exporting() and torch.equal(M()(x), x - 1)
    torch._dynamo.reset()


INTERPRETED = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_bd_linear import problem, expected64, _bound
    from inductor_lowerings.bd_linear import bd_linear_blocks
    from inductor_lowerings.triton_kernels import bd_block_triton
    res = {{}}
    for tables in ("per_head", "shared", "groups"):
        for layout in ("contiguous", "interleaved"):
            for dtype in (torch.float32, torch.bfloat16):
                p = problem(M=37, d_in=40, g=8, H=4, tables=tables, layout=layout, dtype=dtype, second_size=4)
                y64 = expected64(p)
                y = bd_linear_blocks(p["x"], p["sel"], p["rest"], p["weight"], p["bias"], p["block_table"],
                                     p["block_col"], p["d_out"], bd_block=bd_block_triton)
                err = (y.double() - y64).abs()
                res[f"{{tables}}-{{layout}}-{{dtype}}"] = bool((err <= 2 * _bound(p, y64)).all())
    print(json.dumps(res))
""")


def test_triton_blocks_interpreted():
    """The BD blocks of the op through the Triton kernel (interpreter on CPU), each written
    into its view of the output (the bound is doubled for bf16: the interpreter truncates)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = INTERPRETED.format(tests=str(ROOT / "tests"))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(results) == 12 and all(results.values()), results
