"""The ``bdpass`` command line: ``--set`` through a config's aliases, models that cannot run
with their config, and ``bdpass cache``."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

from bdpass import cli, timing

sys.path.insert(0, os.path.dirname(__file__))
from test_timing import PIFA, Scripted, _cands  # noqa: E402


# ---------------------------------------------------------------------------- --set aliases
def test_set_resolves_the_configs_aliases():
    """GPT-2 stores ``num_hidden_layers`` as ``n_layer``: either name overrides the tiny
    default of 2 layers (the alias used to lose to the default's common name)."""
    for key in ("n_layer", "num_hidden_layers"):
        cfg = cli.tiny_config("gpt2", {key: 1})
        assert cfg.num_hidden_layers == 1 and cfg.n_layer == 1
    cfg = cli.tiny_config("gpt2", {"n_embd": 32, "n_head": 2})
    assert (cfg.hidden_size, cfg.num_attention_heads) == (32, 2)
    model, _, _ = cli.build_hf("gpt2", {"n_layer": 1})
    assert len(model.transformer.h) == 1
    assert cli.canonical_keys(cfg, {"n_layer": 3, "vocab_size": 7}) == {"num_hidden_layers": 3, "vocab_size": 7}
    with pytest.raises(cli.CliError, match="n_layer=1.*num_hidden_layers=2|num_hidden_layers=2.*n_layer=1"):
        cli.tiny_config("gpt2", {"n_layer": 1, "num_hidden_layers": 2})


# ---------------------------------------------------------------------------- failing models
def test_a_config_the_model_cannot_run_is_one_line(capsys):
    """DeepSeek-V2 with ``num_experts_per_tok=None`` fails in its router (``top_k`` None):
    one line, non-zero exit, before any compilation."""
    rc = cli.main(["diff", "hf:deepseek_v2", "--set", "num_experts_per_tok=None"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1, err
    assert "hf:deepseek_v2: the model fails with this config" in err and "TypeError" in err, err
    assert "Traceback" not in err and "dynamo" not in err.lower()


FAILING = """
import torch

class Bad(torch.nn.Module):
    def forward(self, x):
        raise ValueError("wrong shape\\nsecond line")

def make():
    return Bad(), (torch.randn(2, 3),)
"""


def test_a_factory_model_that_fails_is_one_line(capsys, tmp_path):
    (tmp_path / "bad.py").write_text(FAILING)
    rc = cli.main(["diff", f"{tmp_path / 'bad.py'}:make"])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1, err
    assert "the model fails on the factory's inputs" in err and "ValueError: wrong shape second line" in err


# ---------------------------------------------------------------------------- bdpass cache
def test_cache_show_clear_path(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})
    assert cli.main(["cache", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "timings.json")
    assert cli.main(["cache", "show"]) == 0
    assert "0 entries" in capsys.readouterr().out
    # a sure entry, an unsure one and one of the older format (medians only)
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 0.8e-3}))
    timing.measure(torch.device("cpu"), PIFA, _cands("original", "pifa"))
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 1e-3}, busy=True))
    timing.measure(torch.device("cpu"), {**PIFA, "M": 32}, _cands("original", "pifa"))
    data = json.loads((tmp_path / "timings.json").read_text())
    old_key = timing.key(torch.device("cpu"), {**PIFA, "M": 64})
    data[old_key] = {"original": 9.84e-3, "pifa": 6.17e-3}
    (tmp_path / "timings.json").write_text(json.dumps(data))
    assert cli.main(["cache", "show"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert "3 entries" in lines[0] and len(lines) == 4, out
    sure = next(x for x in lines if "M=16 " in x)
    assert "pifa float32 M=16 d_in=64 r=32 d_out=64 bias" in sure and "pifa 1.25x [" in sure and "pays" in sure
    assert "spread original " in sure and "%, pifa " in sure and "; sure; age " in sure
    unsure = next(x for x in lines if "M=32 " in x)
    assert "unsure (measured again by the next process)" in unsure
    old = next(x for x in lines if "M=64 " in x)
    assert "older format, not trusted" in old
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    assert timing.entries() == {}
    cli.main(["cache", "show"])
    assert "0 entries" in capsys.readouterr().out


def test_cache_show_marks_stale_entries(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("BDPASS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(timing, "_memory", {})
    monkeypatch.setattr(timing, "_rounds", Scripted({"original": 1e-3, "pifa": 0.8e-3}))
    timing.measure(torch.device("cpu"), PIFA, _cands("original", "pifa"))
    data = json.loads((tmp_path / "timings.json").read_text())
    (e,) = data.values()
    e["measured_at"] = time.time() - 86400 * (timing.MAX_AGE_DAYS + 2)
    (tmp_path / "timings.json").write_text(json.dumps(data))
    cli.main(["cache", "show"])
    out = capsys.readouterr().out
    assert "stale: measured 32 days ago" in out and "age 32d" in out, out
