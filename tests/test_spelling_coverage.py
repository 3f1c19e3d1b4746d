"""Every op that reaches a tracked channel is one the analysis knows, on the running torch.

Dynamo spells the same source differently from release to release (``W.T`` on a parameter is
``getattr(W, "T")`` up to torch 2.13 and ``aten.numpy_T`` from 2.14). An op the channel-layout
analysis does not model is treated as changing values, which turns a new spelling of a pure
data movement into a silently missed site. This test traces the zoo (Hugging Face models from
configs), the composition families and the fuzz generator's models with the installed torch and
fails on any op that received tracked channels and is neither modelled
(:func:`bdpass.graph.ops.canonical`) nor listed as value-changing (:data:`bdpass.graph.ops.VALUE_OPS`),
so the next release's new spelling is a red test rather than a missed site.
"""
from __future__ import annotations

import pytest
import torch

import compose_models
import fuzz
import zoo
from bdpass.graph import ops
from bdpass.graph.layout import analyze
from bdpass.graph.linears import find_linears
from bdpass.graph.params import find_params


def _unmodelled(model, args, kwargs=None) -> dict[str, int]:
    """Ops without a model that received tracked channels, over every graph of one call."""
    found: dict[str, int] = {}

    def backend(gm, example_inputs):
        sites = find_linears(gm, find_params(gm, example_inputs))
        res = analyze(gm, sites, example_inputs)
        for k, v in res.unmodelled.items():
            found[k] = found.get(k, 0) + v
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **(kwargs or {}))
    torch._dynamo.reset()
    return found


def _unknown(found: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in found.items() if k not in ops.VALUE_OPS}


def test_a_new_spelling_is_reported():
    """The detector itself: an op that only moves channels but is spelled in a way the
    analysis does not model shows up (here ``torch.rot90`` of the key heads by 0 turns, a
    pure copy no analysis would know)."""
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            q = self.q(x).view(2, 5, 4, 8).transpose(1, 2)
            k = torch.rot90(self.k(x).view(2, 5, 4, 8).transpose(1, 2), 0, (0, 1))
            return torch.softmax(q @ k.transpose(-1, -2), -1)

    found = _unknown(_unmodelled(Odd(), (torch.randn(2, 5, 32),)))
    assert set(found) == {"rot90"}, found


@pytest.mark.parametrize("family", zoo.FAMILIES)
def test_zoo_spellings_known(family):
    model, args, kwargs = zoo.build(family)
    assert _unknown(_unmodelled(model, args, kwargs)) == {}


@pytest.mark.parametrize("family", sorted(compose_models.FAMILIES))
def test_compose_spellings_known(family):
    for seed in range(3):
        case = compose_models.build(family, seed)
        assert _unknown(_unmodelled(case.model, case.args)) == {}, (family, seed, case.desc)


def test_fuzz_spellings_known():
    for seed in range(24):
        model, args, _, desc = fuzz.make_case(seed)
        assert _unknown(_unmodelled(model.eval(), args)) == {}, (seed, desc)
