"""Reference starting points for the re-alignment attack: what a task costs without stealing.

A number of labels means something only next to what the same attack needs from

* ``pruned``  — the stolen model itself (routed experts outside the keep-set masked);
* ``shared``  — the checkpoint's non-expert weights (embeddings, attention, norms, LM head, shared
  experts where a family has them) with every routed expert and the router freshly initialised:
  what a thief gets *without* the experts;
* ``scratch`` — the same architecture with every weight freshly initialised: the task with nothing
  stolen.

A weight-level defense must leave the released full model useful, so its shared weights stay
useful to anyone; what it can take away is what the experts add — the gap between ``pruned`` and
``shared`` (the *expert head start*). The gap between ``pruned`` and ``scratch`` is the *theft head
start*. Fresh weights come from the model class's own initialiser (``from_config`` under a seed),
so a reference is exactly what a new model of that config would start from.
"""

from __future__ import annotations

import copy

import torch

REFERENCES = ("pruned", "shared", "scratch")
REINIT_GROUPS = {"pruned": (), "shared": ("experts", "router"), "scratch": None}   # None: everything


def fresh_model(model, seed: int):
    """A new model of ``model``'s config and dtype, initialised by its class under ``seed``."""
    from transformers import AutoModelForCausalLM

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = AutoModelForCausalLM.from_config(model.config, dtype=next(model.parameters()).dtype)
    finally:
        torch.random.set_rng_state(state)
    return fresh.to(next(model.parameters()).device).eval()


def reference_model(model, reference: str, *, seed: int = 0):
    """A copy of ``model`` re-initialised as ``reference`` says (``pruned``: an exact copy).

    Args:
        model: a loaded model of a supported family (left untouched).
        reference: one of :data:`REFERENCES`.
        seed: seed of the fresh initialisation.
    Returns:
        ``(new_model, reinitialised)`` — the copy and the names of the parameters and buffers that
        were replaced by fresh values.
    """
    from moeharden.errors import UsageError

    if reference not in REFERENCES:
        raise UsageError(f"Unknown reference {reference!r}.", hint=f"Choose from {', '.join(REFERENCES)}.")
    if reference == "pruned":
        return copy.deepcopy(model), []
    return reinitialised_copy(model, REINIT_GROUPS[reference], seed=seed)


def reinitialised_copy(model, groups: tuple[str, ...] | None, *, seed: int = 0):
    """A copy of ``model`` with the parameter ``groups`` freshly initialised, the rest kept.

    Args:
        model: a loaded model of a supported family (left untouched).
        groups: group names of :func:`moeharden.model.registry.parameter_groups` (``experts``,
            ``router``, ...; a selection-bias buffer belongs to ``router``); None: every weight.
        seed: seed of the fresh initialisation (the model class's own initialiser).
    Returns:
        ``(new_model, reinitialised)`` as :func:`reference_model`.
    """
    from moeharden.model.registry import moe_layers, parameter_groups

    fresh = fresh_model(model, seed)
    if groups is None:
        return fresh, [n for n, _ in fresh.named_parameters()] + [n for n, _ in fresh.named_buffers()]
    by_group = parameter_groups(None, model)
    names = {n for g in groups for n in by_group[g]}
    if "router" in groups:   # selection biases (e.g. DeepSeek-V3's e_score_correction_bias) may be buffers
        sel = {id(li.selection_bias) for li in moe_layers(model) if li.selection_bias is not None}
        names |= {n for n, b in model.named_buffers() if id(b) in sel}
    out = copy.deepcopy(model)
    fresh_state = dict(fresh.named_parameters()) | dict(fresh.named_buffers())
    with torch.no_grad():
        for n, t in list(out.named_parameters()) + list(out.named_buffers()):
            if n in names:
                t.copy_(fresh_state[n])
    del fresh
    return out.eval(), sorted(names)
