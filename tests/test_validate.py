"""Validation while compiling: a wrong rewrite never reaches the user."""
from __future__ import annotations

import logging

import pytest
import torch

from bdpass.rewrites import editor as editor_mod
from bdpass.rewrites import pifa as pifa_rw
from attention_models import MHA
from helpers import side_by_side
from test_compose import Stack

OPTS = {"cost_model": False, "min_saving": 0.0}


def _stale_reads(monkeypatch):
    """The editor of an earlier release: a rewrite reads the copy of a node even when an
    earlier rewrite replaced it (a chain fed directly by a rewritten chain read the old
    values)."""
    monkeypatch.setattr(editor_mod.GraphEditor, "new",
                        lambda self, n: self._map[n] if isinstance(n, torch.fx.Node) else n)


def _wrong_order(monkeypatch):
    """Factors whose column order is off by one position."""
    real = pifa_rw._derived

    def derived(f, *a):
        out = real(f, *a)
        out[-1] = out[-1].roll(1)          # the column order (or the rest weights' last row)
        return out
    monkeypatch.setattr(pifa_rw, "_derived", derived)


def test_passing_graph_reports_validation():
    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(Stack("linear", "flinear", "direct"), (torch.randn(2, 5, 48),),
                                                 options=OPTS)
    g = report.graphs[0]
    assert len(report.rewrites) == 2
    assert g.validation.startswith("passed"), g.validation
    assert g.validate_seconds > 0


def test_stale_read_is_refused(monkeypatch, caplog):
    _stale_reads(monkeypatch)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="bdpass"):
        bd_err, ind_err, _, _, report = side_by_side(Stack("linear", "flinear", "direct"),
                                                     (torch.randn(2, 5, 48),), options=OPTS)
    # without validation this composition is 0.4 off; with it, the culprit is refused
    assert bd_err <= 10 * max(ind_err, 1e-7), (bd_err, ind_err)
    reasons = [s.reason for s in report.skipped]
    assert any(r.startswith("validation:") for r in reasons), str(report)
    assert "validation" in caplog.text


def test_wrong_factors_refused_then_lowered_plain(monkeypatch):
    _wrong_order(monkeypatch)
    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(Stack("linear", "linear", "gelu"), (torch.randn(2, 5, 48),),
                                                 options=OPTS)
    assert report.rewrites == [], str(report)
    assert bd_err <= 2 * max(ind_err, 1e-7)
    skipped = [s for s in report.skipped if s.reason.startswith("validation:")]
    assert len(skipped) == 2 and all(s.kind == "pifa" for s in skipped), str(report)
    assert "relative L2 difference" in skipped[0].reason


def test_only_the_wrong_unit_is_refused(monkeypatch):
    """A BD rewrite next to a broken PIFA chain keeps its rewrite."""
    real = pifa_rw._derived

    def derived(f, *a):
        out = real(f, *a)
        out[0] = out[0] * 1.01          # a wrong pivot weight
        return out
    monkeypatch.setattr(pifa_rw, "_derived", derived)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = MHA(d=40, heads=4, head_dim=8, bias=False, attn="sdpa", rope="none")
            self.mlp = Stack("linear", "linear", "direct", d=40, r=12)

        def forward(self, x):
            return self.mlp(self.attn(x))
    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(Block(), (torch.randn(2, 6, 40),), options=OPTS)
    kinds = sorted(r.kind for r in report.rewrites)
    assert "pifa" not in kinds and {"bd_qk", "bd_vo"} <= set(kinds), str(report)
    assert bd_err <= 100 * max(ind_err, 1e-7)


def test_strict_raises(monkeypatch):
    _wrong_order(monkeypatch)
    torch._dynamo.reset()
    model = Stack("linear", "linear", "gelu").eval()
    with pytest.raises(Exception, match="validation"), torch.no_grad():
        torch.compile(model, backend="bd", options={**OPTS, "strict": True})(torch.randn(2, 5, 48))
    torch._dynamo.reset()


def test_validation_off_is_an_option(monkeypatch):
    _wrong_order(monkeypatch)
    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(Stack("linear", "linear", "gelu"), (torch.randn(2, 5, 48),),
                                                 options={**OPTS, "validate": False})
    assert len(report.rewrites) == 2 and report.graphs[0].validation is None
    assert bd_err > 1e-3       # the broken factors reach the output: that is what validation prevents


def test_torch_trace_artifacts(tmp_path):
    """TORCH_TRACE gets the graph before and after and the report (for tlparse)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from lowrank_models import SvdLinear
        m = SvdLinear(32, 8, 32).eval()
        with torch.no_grad():
            torch.compile(m, backend="bd", options={{"cost_model": False, "lowering": "aot_eager"}})(torch.randn(3, 32))
    """))
    env = {**os.environ, "TORCH_TRACE": str(tmp_path / "trace")}
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    text = "".join(p.read_text() for p in (tmp_path / "trace").iterdir())
    for name in ("bdpass_graph_before", "bdpass_graph_after", "bdpass_report"):
        assert f'"name": "{name}"' in text, name


def test_measured_error_growth_is_reported():
    torch.manual_seed(0)
    _, _, _, _, report = side_by_side(Stack("linear", "conv1d", "gelu"), (torch.randn(2, 5, 48),), options=OPTS)
    m = report.graphs[0].measured_error
    assert m is not None and 0 < m["original"] < 1e-5 and 0 < m["rewritten"] < 1e-4
    assert m["growth"] == pytest.approx(m["rewritten"] / max(m["original"], 2 * 2.0 ** -24))
    assert "growth" in report.graphs[0].validation


def test_measured_growth_over_budget_is_refused(monkeypatch):
    """The output error of the rewritten graph in the model's dtype, measured while
    compiling, must stay within the error budget of the original's."""
    from bdpass import validate as val

    monkeypatch.setattr(val, "measured_errors", lambda *a, **k: (1e-7, 1e-3))
    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(Stack("linear", "linear", "gelu"), (torch.randn(2, 5, 48),),
                                                 options=OPTS)
    assert report.rewrites == []
    reasons = {s.reason for s in report.skipped}
    assert any("8.39e+03x the original's" in r and "error budget 100" in r for r in reasons), reasons


class _VmapMasked(torch.nn.Module):
    """Causal attention whose mask is built with ``torch.vmap`` over the query positions, as
    transformers' mask functions do: the traced graph holds vmap's increment and decrement of
    the functorch nesting around the mask computation."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.h, self.e = heads, d // heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, T, D = x.shape
        pos = torch.arange(T, device=x.device)
        keep = torch.vmap(lambda i: pos <= i)(pos)
        q, k, v = (p(x).view(B, T, self.h, self.e).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = (q @ k.transpose(-1, -2)) * self.e ** -0.5
        a = torch.softmax(s.masked_fill(~keep, -1e9), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(B, T, D))


def test_a_graph_with_vmap_is_validated_and_leaves_no_transform_level():
    """Validation runs the graph node by node, vmap's nesting calls included: it must not
    touch ``.data`` of a batched tensor (an error there stopped the run between increment and
    decrement, and the level left behind made Dynamo's guard on the functorch state fail), and
    it leaves the transform stack as it found it."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    torch.manual_seed(0)
    bd_err, ind_err, _, _, report = side_by_side(_VmapMasked(), (torch.randn(2, 5, 64),), options=OPTS)
    assert retrieve_all_functorch_interpreters() == []
    assert report.rewrites and all(g.validation.startswith("passed") for g in report.graphs), str(report)
    assert bd_err <= 10 * max(ind_err, 1e-7), (bd_err, ind_err)


def test_functorch_levels_are_restored_after_an_error_inside_a_transform():
    from torch._C import _functorch as F
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    from bdpass._compat import functorch_levels_restored

    with pytest.raises(ValueError):
        with functorch_levels_restored():
            F._vmap_increment_nesting(2, "error")
            F._vmap_increment_nesting(2, "error")
            raise ValueError("stopped inside the transform")
    assert retrieve_all_functorch_interpreters() == []
