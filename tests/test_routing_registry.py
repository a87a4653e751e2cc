"""Every routed MoE family the installed transformers ships is either supported or listed, with its reason, in the
one table of unsupported families; a new transformers release then says what it added."""

from __future__ import annotations

import ast

import pytest

from moe_prefetch.routing import FAMILIES
from moe_prefetch.routing.discovery import family_of, is_moe_class, moe_families
from moe_prefetch.routing.unsupported import UNSUPPORTED


@pytest.fixture(scope="module")
def found() -> list[str]:
    return moe_families()


def supported_families() -> dict[str, str]:
    """family directory -> supported model_type."""
    return {family_of(model_type): model_type for model_type in FAMILIES}


def test_every_moe_family_is_supported_or_listed_with_a_reason(found):
    missing = sorted(set(found) - set(supported_families()) - set(UNSUPPORTED))
    assert not missing, f"MoE families of transformers with no adapter and no row in routing/unsupported.py: {missing}"
    assert all(reason.strip() for reason in UNSUPPORTED.values())


def test_the_tables_hold_no_stale_or_contradicting_row(found):
    assert not set(UNSUPPORTED) - set(found), "unsupported rows for families transformers no longer ships (or not MoE)"
    assert not set(UNSUPPORTED) & set(supported_families()), "a family is both supported and listed as unsupported"
    assert set(supported_families()) <= set(found), "a supported family that the discovery does not see as MoE"


def test_the_discovery_sees_the_known_cases(found):
    assert {"mixtral", "qwen3_moe", "switch_transformers", "llama4", "nllb_moe", "jetmoe", "doge"} <= set(found)
    assert not {"llama", "mistral", "vitpose_backbone", "bamba", "qwen2"} & set(found)  # dense, or experts not routed
    assert family_of("llama4_text") == "llama4" and family_of("nllb-moe") == "nllb_moe"


@pytest.mark.parametrize("source, is_moe", [
    ("class B:\n def __init__(self, c):\n  self.gate = nn.Linear(2, 4)\n  self.experts = Experts(c)", True),
    ("class B:\n def __init__(self, c):\n  self.router = R(c)\n  self.input_linear = ParallelExperts(c)", True),
    ("class B:\n def __init__(self, c):\n  self.router_gate = nn.Linear(2, 4)\n  self.top_k = c.num_experts_per_tok", True),
    ("class B:\n def __init__(self, c):\n  self.gate = A(c) if c.hash else B(c)\n  self.experts = E(c)", True),
    ("class M:\n def __init__(self, c):\n  self.gate_proj = nn.Linear(2, 4)\n  self.up_proj = nn.Linear(2, 4)", False),
    ("class M:\n def __init__(self, c):\n  self.router_aux_loss_coef = c.router_aux_loss_coef\n  self.num_experts = c.num_experts", False),
    ("class M:\n def __init__(self, c):\n  self.gate = nn.Linear(2, 4)\n  self.num_experts = 4", False),
])
def test_moe_class_rule(source, is_moe):
    (node,) = ast.parse(source).body
    assert is_moe_class(node) is is_moe
