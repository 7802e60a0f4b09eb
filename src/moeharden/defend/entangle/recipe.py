"""The entangle recipe: every knob of entangled training, as frozen data (YAML, ``version: 1``).

Precedence is command line > recipe file > defaults, decided by ``None`` (a falsy override such
as ``lambda_prune: 0.0`` stands). The shipped defaults are ``src/moeharden/data/entangle_recipe.yaml``;
what each knob does is in :mod:`moeharden.defend.entangle.loop`'s docstring.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeharden.errors import ConfigFileError, validation_problems


class EntangleRecipe(BaseModel):
    """Knobs of entangled training (YAML, ``version: 1``). See :mod:`moeharden.defend.entangle.loop`."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    seed: int = 0
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = 1.0
    grad_accum: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    lambda_task: float = Field(1.0, ge=0)
    lambda_retain: float = Field(1.0, ge=0)
    lambda_prune: float = Field(1.0, ge=0)
    lambda_spread: float = Field(0.5, ge=0)
    tau_token: float = Field(3.0, gt=0)
    lambda_diverge: float = Field(0.0, ge=0)
    diverge_ratio: float = Field(4.0, gt=0)
    lambda_cancel: float = Field(0.0, ge=0)
    cancel_ratio: float = Field(4.0, gt=0)
    lambda_partition: float = Field(0.0, ge=0)   # routers pulled toward a fixed token partition
    subsets_per_step: int = Field(2, ge=1)
    keep_ratios: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    sources: dict[Literal["attribution", "random", "adversarial"], float] = {
        "attribution": 0.5, "random": 0.3, "adversarial": 0.2}
    attribution_methods: tuple[str, ...] = ("frequency", "gate", "reap", "ean", "soft", "contrastive")
    recompute_every: int = Field(50, gt=0)
    adversarial_swaps: int = Field(12, ge=1)
    recovery_term: bool = False
    recovery_lr: float = Field(0.01, gt=0)
    lambda_recovery: float = Field(0.5, ge=0)
    recovery_steps: int = Field(1, ge=1)
    recovery_update: Literal["sgd", "sign"] = "sgd"
    recovery_inner: tuple[Literal["labels", "distill"], ...] = ("labels",)
    recovery_tasks: tuple[str, ...] | None = None      # None: every task
    recovery_every: int = Field(1, ge=1)
    recovery_keep_max: float = Field(0.5, gt=0, le=1)
    init: Literal["original", "scratch"] = "original"   # scratch: train the release from fresh weights
    expert_lr_scale: float = Field(1.0, ge=0)  # the routed experts' lr ÷ lr (0: they keep their initial weights)
    polish_steps: int = Field(0, ge=0)     # the last N steps train the full model only (task + retain)
    checkpoint_every: int = Field(100, gt=0)


def load_recipe(path: Path | None = None, **overrides: Any) -> EntangleRecipe:
    """Default recipe < YAML file < overrides (``None`` overrides are ignored, falsy values are not).

    Args:
        path: a recipe YAML (``None``: the shipped default recipe).
        overrides: recipe fields from the command line.
    Returns:
        the validated, frozen recipe.
    Raises:
        ConfigFileError: unreadable YAML or invalid values (all problems listed at once).
    """
    from moeharden.io.files import load_yaml_data, read_small_text  # regular files only, bounded, no aliases

    text = (read_small_text(Path(path), what="recipe", error=ConfigFileError) if path is not None
            else resources.files("moeharden").joinpath("data/entangle_recipe.yaml").read_text())
    raw = load_yaml_data(text, where=f"Recipe {path or '(default)'}", error=ConfigFileError) or {}
    if not isinstance(raw, dict):
        raise ConfigFileError(f"Recipe {path} must be a mapping of settings.")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EntangleRecipe(**raw)
    except ValidationError as err:
        lines = validation_problems(err)
        raise ConfigFileError(f"Recipe {path or '(default)'} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint="Fix the listed fields; see src/moeharden/data/entangle_recipe.yaml.") from None
