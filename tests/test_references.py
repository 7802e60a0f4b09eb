"""The attack's references re-initialise exactly what they claim, compared tensor by tensor with a
model the class builds itself from the same config and seed (an independent computation)."""

from __future__ import annotations

import pytest
import torch
from families import build_tiny
from transformers import AutoModelForCausalLM

from moeharden.attack.references import reference_model, reinitialised_copy
from moeharden.model.registry import parameter_groups


def _fresh(model, seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "dbrx"])
def test_shared_and_scratch_reinitialise_what_they_claim(family):
    model, _ = build_tiny(family)
    orig = {n: t.detach().clone() for n, t in model.state_dict().items()}
    fresh = _fresh(model, 7).state_dict()
    groups = parameter_groups(None, model)
    routed = set(groups["experts"]) | set(groups["router"])
    assert routed and set(groups["attention"])

    shared, names = reference_model(model, "shared", seed=7)
    assert set(names) >= routed
    for n, t in shared.state_dict().items():
        if n in routed:
            assert torch.equal(t, fresh[n]), n                  # freshly initialised
            assert not torch.equal(t, orig[n]), n               # and really different from the stolen weights
        elif n in orig and n not in names:
            assert torch.equal(t, orig[n]), n                   # everything else is the checkpoint's

    scratch, _ = reference_model(model, "scratch", seed=7)
    for n, t in scratch.state_dict().items():
        assert torch.equal(t, fresh[n]), n

    pruned, names = reference_model(model, "pruned")
    assert names == [] and all(torch.equal(t, orig[n]) for n, t in pruned.state_dict().items())
    # the original is never touched
    assert all(torch.equal(t, orig[n]) for n, t in model.state_dict().items())


@pytest.mark.parametrize("group,kept", [("router", "experts"), ("experts", "router")])
def test_a_single_group_is_reinitialised_and_the_other_kept(group, kept):
    """The parts of the expert head start (bench/headstart_parts.py): one group fresh, the other stolen."""
    model, _ = build_tiny("qwen2_moe")
    orig = {n: t.detach().clone() for n, t in model.state_dict().items()}
    fresh = _fresh(model, 3).state_dict()
    groups = parameter_groups(None, model)
    copy_, names = reinitialised_copy(model, (group,), seed=3)
    assert set(names) == set(groups[group])
    for n, t in copy_.state_dict().items():
        if n in groups[group]:
            assert torch.equal(t, fresh[n]) and not torch.equal(t, orig[n]), n
        else:
            assert torch.equal(t, orig[n]), n
    assert set(groups[kept]) and not set(groups[kept]) & set(names)
