"""Every shipped recipe validates, and its first line is a command the CLI would accept; the
entangle settings check every command-line option and put it above the recipe by ``None``."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from moeharden.defend.entangle.command import RECIPE_OVERRIDES, EntangleSettings
from moeharden.defend.entangle.pools import train_keeps
from moeharden.defend.entangle.recipe import EntangleRecipe, load_recipe
from moeharden.errors import UsageError

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))

# The targets, and what each recipe's keep_ratios are checked against:
# (Hub id, routed experts per MoE layer, top-k), from the models' published configs.
TARGETS = {
    "mixtral-8x7b.yaml": ("mistralai/Mixtral-8x7B-v0.1", 8, 2),
    "mixtral-8x22b.yaml": ("mistralai/Mixtral-8x22B-v0.1", 8, 2),
    "olmoe-1b-7b.yaml": ("allenai/OLMoE-1B-7B-0924", 64, 8),
    "qwen1.5-moe-a2.7b.yaml": ("Qwen/Qwen1.5-MoE-A2.7B", 60, 4),
    "qwen3-30b-a3b.yaml": ("Qwen/Qwen3-30B-A3B", 128, 8),
    "deepseek-v2-lite.yaml": ("deepseek-ai/DeepSeek-V2-Lite", 64, 6),
    "gpt-oss-20b.yaml": ("openai/gpt-oss-20b", 32, 4),
}


def _command(path: Path) -> list[str]:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Command: "), f"{path.name} must begin with '# Command: ...'"
    return shlex.split(first[len("# Command: "):])


def test_every_target_has_a_recipe():
    assert sorted(p.name for p in RECIPES) == sorted(TARGETS)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, EntangleRecipe)
    # every value written in the file is the value the recipe holds (nothing silently defaulted)
    raw = yaml.safe_load(path.read_text())
    held = recipe.model_dump(mode="json")
    for key, value in raw.items():
        assert held[key] == (list(value) if isinstance(value, tuple) else value), key
    assert recipe.mixed_precision == "bf16" and recipe.lr <= 1e-4
    _, experts, top_k = TARGETS[path.name]
    keeps = train_keeps(experts, recipe.keep_ratios)
    # trained against pruned sub-models across the gate's range (keep <= half the experts) and above
    assert len(keeps) >= 3 and min(keeps) <= top_k and max(keeps) > experts // 2, keeps


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_begins_with_a_valid_command(path):
    import typer

    from moeharden.cli import app
    from moeharden.tasks.resolve import preset_names, preset_spec

    text = path.read_text().splitlines()
    assert text[1].startswith("# Hardware: "), f"{path.name}: line 2 must say the hardware it expects"
    argv = _command(path)
    assert argv[:2] == ["moeharden", "entangle"]
    assert argv[2] == TARGETS[path.name][0]
    # parse with the real CLI's entangle command (typer.main.get_command: Typer's documented Click bridge);
    # an unknown flag or a missing required option raises here
    entangle = typer.main.get_command(app).commands["entangle"]
    ctx = entangle.make_context("entangle", argv[2:])
    params = ctx.params
    assert Path(params["recipe"]) == Path("recipes") / path.name
    assert params["out"] is not None
    assert params["task"] and set(params["task"]) <= set(preset_names())
    # the tasks named must be trainable presets (entangle needs a train split)
    for name in params["task"]:
        assert preset_spec(name).split.train > 0, f"{name} has no train split"
    # the settings the CLI would build from this command line are valid, and hold the recipe's values
    overrides = {k: params[k] for k in RECIPE_OVERRIDES}
    settings = EntangleSettings(out=params["out"], tasks=params["task"], recipe_path=path, **overrides)
    held = settings.recipe().model_dump(mode="json")
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():
        want = overrides[key] if overrides.get(key) is not None else value
        assert held[key] == (list(want) if isinstance(want, tuple) else want), key


def test_every_override_is_a_recipe_field_and_an_entangle_flag():
    import typer

    from moeharden.cli import app

    flags = {o for p in typer.main.get_command(app).commands["entangle"].params for o in p.opts}
    for name in RECIPE_OVERRIDES:
        assert name in EntangleRecipe.model_fields and name in EntangleSettings.__dataclass_fields__
        assert f"--{name.replace('_', '-')}" in flags, name


def test_command_line_beats_recipe_beats_defaults_decided_by_none(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nsteps: 50\nlambda_prune: 2.0\nrecovery_term: true\nseed: 7\n")
    defaults = EntangleRecipe()
    r = EntangleSettings(out=tmp_path / "o", recipe_path=p, lambda_prune=0.0, recovery_term=False, seed=0).recipe()
    assert (r.lambda_prune, r.recovery_term, r.seed) == (0.0, False, 0)   # falsy command-line values stand
    assert r.steps == 50                                                  # not given: the recipe's value
    assert r.lr == defaults.lr and r.lambda_retain == defaults.lambda_retain   # in neither: the default
    r = EntangleSettings(out=tmp_path / "o", recipe_path=p).recipe()
    assert (r.steps, r.lambda_prune, r.recovery_term, r.seed) == (50, 2.0, True, 7)
    assert EntangleSettings(out=tmp_path / "o", steps=3).recipe().steps == 3   # no recipe: shipped default + flag
    assert EntangleSettings(out=tmp_path / "o").overrides() == {}


@pytest.mark.parametrize("option,value,words", [
    ("steps", 0, "--steps"), ("batch_size", 0, "--batch-size"), ("lr", -1.0, "--lr"),
    ("grad_accum", 0, "--grad-accum"), ("checkpoint_every", 0, "--checkpoint-every"),
    ("lambda_prune", -0.5, "--lambda-prune"), ("mixed_precision", "fp8", "--mixed-precision"),
    ("stop_after", 0, "stop_after"), ("limit", 0, "--limit"),
])
def test_entangle_settings_check_every_option_when_built(tmp_path, option, value, words):
    with pytest.raises(UsageError, match=words):
        EntangleSettings(out=tmp_path / "o", **{option: value})


@pytest.mark.parametrize("argv,words", [
    (["--steps", "0"], "--steps"), (["--batch-size", "0"], "--batch-size"),
    (["--mixed-precision", "fp8"], "--mixed-precision"), (["--lr", "-1"], "--lr"),
])
def test_entangle_cli_refuses_a_bad_option_before_reading_anything(tmp_path, argv, words):
    from typer.testing import CliRunner

    from moeharden.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["entangle", str(tmp_path / "no-such-checkpoint"), "--out", str(out), *argv])
    assert res.exit_code == 2, res.output
    assert words in res.output and "Traceback" not in res.output
    assert not out.exists()
