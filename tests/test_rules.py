"""The rule registry: every applier loops over it, rules plan in order and see what earlier
rules claimed, and each prepared module class belongs to exactly one rule."""
from __future__ import annotations

import torch

import bdpass
from bdpass import rules
from bdpass.prepare.modules import PreparedModule, from_spec
from lowrank_models import LowRankMLP


def test_registry_lists_both_identities_in_planning_order():
    names = [r.name for r in rules.all_rules()]
    assert names == ["pifa", "bd"]
    assert rules.kinds() == ("pifa", "bd_qk", "bd_vo")
    owned = [m for r in rules.all_rules() for m in r.modules]
    assert len(owned) == len(set(owned)) and all(issubclass(m, PreparedModule) for m in owned)
    assert set(PreparedModule._types.values()) == set(owned)
    for m in owned:
        assert rules.rule_for_module(m.__name__).modules == rules.rule_for_module(m.__name__).modules
        assert m in rules.rule_for_module(m.__name__).modules


def test_the_interface_is_abstract():
    """A rule or prepared module class that leaves out part of the interface cannot be made."""
    import pytest

    class Half(rules.Rule):
        name = "half"

        def plan(self, ctx):
            return []

    with pytest.raises(TypeError, match="abstract"):
        Half()
    with pytest.raises(TypeError, match="abstract"):
        PreparedModule()


def test_unknown_module_type_is_a_clear_error():
    import pytest

    with pytest.raises(ValueError, match="unknown prepared module type 'Nope'"):
        from_spec({"type": "Nope"})
    with pytest.raises(ValueError, match="unknown prepared module type 'Nope'"):
        rules.rule_for_module("Nope")


def test_backend_plans_every_registered_rule_after_the_earlier_ones(monkeypatch):
    """A rule added to the registry is planned by the backend, after PIFA and BD, and sees
    the linear sites they decided as claimed."""
    seen = {}

    class Probe(rules.Rule):
        name = "probe"
        kinds = ("probe",)

        def enabled(self, opts):
            return True

        def plan(self, ctx):
            seen["claimed"] = {n.name for n in ctx.claimed}
            seen["free"] = [s.core.name for s in ctx.free_linears()]
            return []

        def _never(self, *a):       # the probe decides nothing, so nothing else is called
            raise AssertionError("called for a decision the probe never made")

        rewrite = refit = module_edits = shard_module = _never

    monkeypatch.setattr(rules, "REGISTRY", rules.all_rules() + [Probe()])
    torch.manual_seed(0)
    model = LowRankMLP(64, 16, 128).eval()
    x = torch.randn(2, 8, 64)
    with bdpass.collect_reports() as rep, torch.no_grad():
        torch.compile(model, backend="bd", options={"cost_model": False, "lowering": "aot_eager"})(x)
    torch._dynamo.reset()
    assert [r.kind for r in rep.rewrites] == ["pifa", "pifa"]
    assert len(seen["claimed"]) == 4 and seen["free"] == [], seen
