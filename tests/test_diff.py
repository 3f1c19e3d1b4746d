"""bdpass.diff and ``bdpass diff``: alignment, numerics, rule table, renderers, CLI."""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bdpass
from bdpass import cli
from bdpass.diff import Diff, build_diff
from bdpass.report import Report

# aot_eager: the diff runs both graphs through an interpreter anyway; no cost model, so
# that the tiny CPU shapes here are rewritten
OPTS = {"lowering": "aot_eager", "cost_model": False}


class LowRank(nn.Module):
    """Two linears with an inner width (8) below both outer widths (32, 48)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(32, 8, bias=False)
        self.up = nn.Linear(8, 48)

    def forward(self, x):
        return torch.relu(self.up(self.down(x))) * 2.0


class Attention(nn.Module):
    """Separate q/k/v/o projections; ``eager`` spells the attention out (matmul, softmax)."""

    def __init__(self, d=64, heads=4, eager=False):
        super().__init__()
        self.h, self.hd, self.eager = heads, d // heads, eager
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.o_proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q = self.q_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.h, self.hd).transpose(1, 2)
        if self.eager:
            s = (q @ k.transpose(-1, -2)) / math.sqrt(self.hd)
            o = torch.softmax(s, dim=-1) @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.o_proj(o.transpose(1, 2).reshape(B, T, D))


class Broken(nn.Module):
    """A low-rank chain on each side of a graph break."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 8, bias=False), nn.Linear(8, 48)
        self.c, self.d = nn.Linear(48, 6, bias=False), nn.Linear(6, 32)

    def forward(self, x):
        h = self.b(self.a(x))
        torch._dynamo.graph_break()
        return self.d(self.c(torch.tanh(h)))


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x):
        return torch.tanh(self.lin(x)) * 2


def _seeded(cls, *a, **kw):
    torch.manual_seed(0)
    return cls(*a, **kw).eval()


@pytest.fixture(scope="module")
def lowrank() -> Diff:
    torch.manual_seed(1)
    return bdpass.diff(_seeded(LowRank), torch.randn(2, 5, 32), options=OPTS)


@pytest.fixture(scope="module")
def attention() -> Diff:
    torch.manual_seed(1)
    return bdpass.diff(_seeded(Attention), torch.randn(2, 8, 64), options=OPTS)


def _lines_fit(text: str, width: int = 100) -> None:
    assert text.strip()
    assert max(len(line) for line in text.splitlines()) <= width


# ---------------------------------------------------------------------------- low-rank chain
def test_lowrank_alignment(lowrank):
    assert len(lowrank.graphs) == 1
    g = lowrank.graphs[0]
    assert g.rewritten and len(g.regions) == 1
    assert g.regions[0].kinds == ["pifa"]
    replaced = [r for r in g.rows if r.status == "replaced"]
    assert len(replaced) == 1
    row = replaced[0]
    # the chain's output node is paired with the node that replaces it
    assert row.before.target == "linear" and row.after.origin == row.before.name
    assert row.role == "replacement" and row.ref == row.before.name and row.region == 0
    # untouched nodes are paired with themselves; the relu now reads the replacement
    same = {r.before.name: r for r in g.rows if r.status == "same"}
    relu = next(r for r in same.values() if r.before.target == "relu")
    assert relu.after.name == relu.before.name and row.after.name in relu.after.args
    # every node of both graphs appears exactly once
    rep = g.report
    assert sorted(r.before.name for r in g.rows if r.before) == sorted(n.name for n in rep.nodes_before)
    assert sorted(r.after.name for r in g.rows if r.after) == sorted(n.name for n in rep.nodes_after)
    derived = [r for r in g.rows if r.role == "derived weight"]
    assert derived and all(r.region == 0 and r.before is None for r in derived)


def test_lowrank_numerics(lowrank):
    g = lowrank.graphs[0]
    row = next(r for r in g.rows if r.status == "replaced")
    assert row.orig is not None and row.new is not None and row.ref_kind == "orig64"
    assert 0 < row.orig.rel_l2 < 1e-5 and 0 < row.new.rel_l2 < 1e-5
    assert row.new.sqnr_db == pytest.approx(-20 * math.log10(row.new.rel_l2), rel=1e-6)
    assert row.new.max_abs > 0
    assert row.dev64 is not None and row.dev64 < 1e-4           # exact identity, factor rounding only
    # the rewritten chain is one op (bdpass::pivot_linear): nothing internal to compare
    assert [r for r in g.rows if r.role == "internal"] == []
    assert all(not r.diverged for r in g.rows) and lowrank.first_divergence is None
    out = g.outputs()
    assert len(out) == 1 and out[0].new.rel_l2 < 1e-5
    assert lowrank.floor == pytest.approx(100.0 * 2.0 ** -24)


def test_lowrank_rules_and_costs(lowrank):
    rules = {r.kind: r for r in lowrank.rules()}
    assert rules["pifa"].applied == 1 and rules["pifa"].matched == 1 and rules["pifa"].skipped == 0
    assert rules["bd_qk"].matched == 0
    t = lowrank.totals()
    rec = lowrank.report.rewrites[0]
    assert t["params_before"] - t["params_after"] == rec.params_saved
    assert t["bytes_before"] == 4 * t["params_before"] and t["bytes_after"] == 4 * t["params_after"]
    assert t["flops_after"] < t["flops_before"]
    assert t["flops_saved_per_token"] == rec.flops_saved > 0


def test_lowrank_text(lowrank):
    text = lowrank.to_text()
    _lines_fit(text)
    assert "pifa" in text and "first divergence: none" in text
    assert "R0~" in text and "R0+" in text
    full = lowrank.to_text(context=None)
    _lines_fit(full)
    assert all(n.name[:20] in full or n.op == "placeholder" for n in lowrank.graphs[0].report.nodes_after)


def test_divergence_is_reported(lowrank):
    """A corrupted derived weight makes the replacement node the first divergence."""
    g = lowrank.graphs[0].report
    orig_gm, new_gm, ex, new_ex = g.graphs_kept
    bad = list(new_ex)
    k = next(i for i in range(len(ex), len(bad)) if bad[i].is_floating_point() and bad[i].dim() == 2)
    bad[k] = bad[k] * (1 + 1e-3 * torch.randn_like(bad[k]))
    g2 = type(g)(**{**g.__dict__, "graphs_kept": (orig_gm, new_gm, ex, bad)})
    d = build_diff(Report(graphs=[g2]), OPTS)
    first = d.first_divergence
    assert first is not None
    row = first[1]
    assert row.status == "replaced" and row.region == 0
    assert row.new.rel_l2 > max(2 * row.orig.rel_l2, d.floor)
    assert "first divergence: graph 0 node" in d.to_text()


# ---------------------------------------------------------------------------- attention
def test_attention_regions(attention):
    g = attention.graphs[0]
    assert g.rewritten
    kinds = {k for reg in g.regions for k in reg.kinds}
    assert {"bd_qk", "bd_vo"} <= kinds
    replaced = [r for r in g.rows if r.status == "replaced"]
    assert len(replaced) >= 2
    # q/k/v come out in another per-head basis: compared against the rewritten graph's own
    # float64 run; the output projection restores the original values
    changed = [r for r in g.rows if r.basis_changed]
    assert changed and all(r.ref_kind == "new64" and r.dev64 > 0.1 for r in changed)
    o_proj = [r for r in replaced if not r.basis_changed]
    assert o_proj and all(r.ref_kind == "orig64" and r.new.rel_l2 < 1e-5 for r in o_proj)
    assert attention.first_divergence is None
    out = g.outputs()
    assert out and all(not r.basis_changed and r.new.rel_l2 < 1e-5 for r in out)
    _lines_fit(attention.to_text())


def test_attention_eager_scores_restore_basis():
    torch.manual_seed(1)
    d = bdpass.diff(_seeded(Attention, eager=True), torch.randn(2, 8, 64), options={**OPTS, "bd_vo": False})
    g = d.graphs[0]
    assert any(r.basis_changed for r in g.rows)
    scores = next(r for r in g.rows if r.status == "same" and r.after.target == "softmax")
    assert not scores.basis_changed and scores.ref_kind == "orig64" and scores.new.rel_l2 < 1e-5
    assert d.first_divergence is None


def test_hf_gpt2_builder_and_diff():
    pytest.importorskip("transformers")
    model, args, kwargs = cli.build_hf("gpt2", {"num_hidden_layers": 1})
    assert model.config.n_embd == 64 and model.config.n_head == 4 and model.config.vocab_size == 128
    assert model.config.use_cache is False and kwargs["input_ids"].shape == (2, 8)
    d = bdpass.diff(model, *args, options=OPTS, **kwargs)
    assert {"bd_qk", "bd_vo"} <= {r.kind for r in d.report.rewrites}
    assert d.first_divergence is None
    out = d.graphs[0].outputs()
    assert out and out[0].new.rel_l2 < 1e-5


def test_hf_builder_rejects_non_text_models():
    pytest.importorskip("transformers")
    with pytest.raises(cli.CliError, match="input_ids"):
        cli.build_hf("vit", {"image_size": 16, "patch_size": 8})
    with pytest.raises(cli.CliError, match="unknown model type"):
        cli.build_hf("no_such_model_type", {})


# ---------------------------------------------------------------------------- graph breaks, nothing matched
def test_graph_break():
    torch.manual_seed(1)
    d = bdpass.diff(_seeded(Broken), torch.randn(2, 5, 32), options=OPTS)
    assert len(d.graphs) == 2
    assert all(g.rewritten and len(g.regions) == 1 for g in d.graphs)
    assert [g.position for g in d.graphs] == [0, 1]
    assert d.first_divergence is None
    text = d.to_text()
    _lines_fit(text)
    assert "Graph 0" in text and "Graph 1" in text and "2 graphs" in text
    data = json.loads(d.to_json())
    assert len(data["graphs"]) == 2 and len(data["report"]["graphs"]) == 2


def test_nothing_found():
    d = bdpass.diff(_seeded(Plain), torch.randn(3, 16), options=OPTS)
    assert not any(g.rewritten for g in d.graphs)
    assert "no linear chains or attention found" in d.nothing_matched()
    text = d.to_text()
    assert "no linear chains or attention found" in text
    g = d.graphs[0]
    assert all(r.status == "same" for r in g.rows)
    assert g.outputs()[0].new is not None and g.flops_before == g.flops_after
    assert "no linear chains or attention found" in d.to_html()


def test_nothing_applied_lists_skip_reasons():
    d = bdpass.diff(_seeded(LowRank), torch.randn(2, 5, 32), options={**OPTS, "min_saving": 0.9})
    why = d.nothing_matched()
    assert why.startswith("no rewrites") and "skipped" in why
    pifa = next(r for r in d.rules() if r.kind == "pifa")
    assert pifa.applied == 0 and pifa.skipped == 1 and pifa.matched == 1 and pifa.reasons
    reason = pifa.reasons[0][0]
    assert reason[:30] in " ".join(d.to_text(width=100).split())


def test_numerics_failure_is_reported(monkeypatch):
    import bdpass.diff.core as core

    def boom(self, n):
        raise RuntimeError("cannot run this node\nsecond line")

    monkeypatch.setattr(core._Recorder, "run_node", boom)
    d = bdpass.diff(_seeded(LowRank), torch.randn(2, 5, 32), options=OPTS)
    g = d.graphs[0]
    assert g.rewritten and g.numerics_error == "RuntimeError: cannot run this node"
    assert all(r.orig is None and r.new is None for r in g.rows)
    text = d.to_text()
    assert "numerics unavailable" in text and "first divergence: unknown" in text
    json.loads(d.to_json())


# ---------------------------------------------------------------------------- renderers
def test_json(lowrank):
    data = json.loads(lowrank.to_json())
    assert data["format"] == "bdpass-diff" and data["dtype"] == "float32"
    assert data["rules"][0]["kind"] == "pifa" and data["rules"][0]["matched"] == 1
    rows = data["graphs"][0]["rows"]
    rep = next(r for r in rows if r["status"] == "replaced")
    assert rep["region"] == 0 and isinstance(rep["new"]["rel_l2"], float)
    assert data["worst_growth"]["ratio"] > 0 and data["first_divergence"] is None
    again = Report.from_dict(data["report"])
    assert [r.kind for r in again.rewrites] == ["pifa"]
    assert data["totals"]["flops_saved_per_token"] == lowrank.report.flops_saved


def test_html(lowrank, attention, tmp_path):
    for d in (lowrank, attention):
        page = d.to_html()
        assert page.startswith("<!DOCTYPE html>")
        assert "http://" not in page and "https://" not in page and "<link" not in page
        assert 'class="row replaced rewritten' in page
        g = d.graphs[0]
        for r in g.rows:
            if r.status == "replaced":
                assert f'title="{r.before.name}"' in page and f'title="{r.after.name}"' in page
    path = tmp_path / "d.html"
    attention.save_html(str(path))
    assert path.read_text(encoding="utf-8") == attention.to_html()


def _png_is_blank(path) -> bool:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + n]
        pos += 12 + n
    raw = zlib.decompress(idat)
    return len(set(raw)) < 16


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed")
def test_html_renders_in_chromium(attention, tmp_path):
    page = tmp_path / "diff.html"
    attention.save_html(str(page))
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--window-size=1200,900", f"--screenshot={shot}", page.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 5000
    assert not _png_is_blank(shot)


# ---------------------------------------------------------------------------- CLI
def test_parse_values():
    assert cli.parse_value("3") == 3 and cli.parse_value("2.5") == 2.5
    assert cli.parse_value("True") is True and cli.parse_value("false") is False
    assert cli.parse_value("None") is None and cli.parse_value("null") is None
    assert cli.parse_value("aot_eager") == "aot_eager" and cli.parse_value('{"a": 1}') == {"a": 1}
    assert cli.parse_pairs(["a=1", "b = x=y"], "--set") == {"a": 1, "b": "x=y"}
    with pytest.raises(cli.CliError):
        cli.parse_pairs(["novalue"], "--set")


def test_tiny_config_overrides():
    pytest.importorskip("transformers")
    cfg = cli.tiny_config("llama", {"hidden_size": 32, "num_key_value_heads": 2})
    assert cfg.hidden_size == 32 and cfg.num_attention_heads == 4 and cfg.head_dim == 8
    assert cfg.num_key_value_heads == 2 and cfg.intermediate_size == 128 and cfg.use_cache is False


FACTORY = textwrap.dedent("""
    import torch
    import torch.nn as nn

    class LowRank(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(32, 8, bias=False)
            self.up = nn.Linear(8, 48)

        def forward(self, x, scale=1.0):
            return self.up(self.down(x)) * scale

    def make():
        torch.manual_seed(0)
        return LowRank().eval(), (torch.randn(2, 5, 32),), {"scale": 2.0}
""")


def _run_cli(*argv, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "bdpass.cli", *argv], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def test_cli(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    target = f"{tmp_path / 'factory.py'}:make"
    html_path, json_path = tmp_path / "out.html", tmp_path / "out.json"
    proc = _run_cli("diff", target, "--options", "lowering=aot_eager", "--options", "cost_model=false",
                    "--html", str(html_path), "--json", str(json_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _lines_fit(proc.stdout)
    assert "rewrites pifa x1" in proc.stdout and "Rules" in proc.stdout
    data = json.loads(json_path.read_text())
    assert data["report"]["graphs"][0]["rewrites"][0]["kind"] == "pifa"
    assert data["options"]["lowering"] == "aot_eager" and data["options"]["cost_model"] is False
    rows = data["graphs"][0]["rows"]
    page = html_path.read_text()
    assert 'class="row replaced rewritten' in page
    for r in rows:
        for name in (r["before"], r["after"]):
            if name and not name.startswith("l_self_"):
                assert name in page


def test_cli_json_stdout_and_errors(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    proc = _run_cli("diff", "factory.py:make", "--options", "lowering=aot_eager", "--options", "pifa=false",
                    "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["rules"][0] == {"kind": "pifa", "enabled": False, "matched": 0, "applied": 0,
                                "skipped": 0, "reasons": []}
    assert "no linear chains or attention found" in data["nothing_matched"]
    bad = _run_cli("diff", "factory.py:nope", cwd=tmp_path)
    assert bad.returncode == 2 and "no callable 'nope'" in bad.stderr
    bad = _run_cli("diff", "factory.py:make", "--options", "no_such_option=1", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown option" in bad.stderr
