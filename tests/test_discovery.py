"""Every MoE family of the installed transformers, found by inspecting its modeling classes.

For each discovered family a tiny config is built from its config class (``ConfigClass()``
shrunk by :mod:`moeharden.model.tiny`: 2 layers, hidden 32, 8 experts, top-2) and the real model
is checked end to end:

(a) the routing record against an independent computation from the router's own logits (its
    forward output, captured with a plain hook) under the registry's declared rule — score
    function, selection bias, routing groups, combine weights, renormalisation, scaling;
(b) masked ≡ physically pruned (``prune_checkpoint``), saved and reloaded (max-abs ≤ 1e-4);
(c) the disk view of what ``save_pretrained`` writes against the module view.

Refused families are listed with their reason, and a family the registry does not know fails
the coverage test by name. ``docs/families.md``'s table is generated from the same registry table.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeharden.model.discover import discover_moe_families
from moeharden.model.masking import mask_experts
from moeharden.model.registry import config_value, lookup_spec, moe_layers, routing_groups
from moeharden.model.routing import record_routing

DISCOVERED = discover_moe_families()
SUPPORTED = [f.model_type for f in DISCOVERED
             if lookup_spec(CONFIG_MAPPING[f.model_type]()) and not lookup_spec(CONFIG_MAPPING[f.model_type]()).refuse]
ROOT = Path(__file__).resolve().parents[1]


def test_coverage_table_every_discovered_family_is_listed():
    rows, unknown = [], []
    for fam in DISCOVERED:
        spec = lookup_spec(CONFIG_MAPPING[fam.model_type]())
        if spec is None:
            unknown.append(fam.model_type)
            continue
        rows.append((fam.model_type, spec.name, "refused" if spec.refuse else "supported", spec.refuse))
    print("\nfamily coverage (installed transformers):")
    for mt, name, status, why in rows:
        print(f"  {mt:22s} {name:32s} {status}{': ' + why if why else ''}")
    assert not unknown, (f"transformers has MoE families the registry does not list: {unknown} "
                         "(add them to model/families.py; scripts/constraints.txt pins the tested version)")
    assert len(DISCOVERED) >= 50
    assert len(SUPPORTED) >= 0.9 * len(DISCOVERED), (len(SUPPORTED), len(DISCOVERED))
    for mt, _, status, why in rows:
        assert status == "supported" or len(why) > 20, mt


def test_a_family_named_shared_is_found_and_shared_experts_are_not():
    """``Shared`` marks a shared-expert class only after the family's own prefix: GraniteMoeShared's
    routed experts are ``GraniteMoeSharedExperts`` (it went undiscovered while any name with
    ``Shared`` was skipped); Inkling's ``InklingSharedExperts`` are its shared experts."""
    by_type = {f.model_type: f for f in DISCOVERED}
    assert by_type["granitemoeshared"].experts_classes == ("GraniteMoeSharedExperts",)
    assert by_type["inkling_text"].experts_classes == ("InklingExperts",)


def test_docs_table_is_generated_from_the_registry():
    from moeharden.model.famdoc import render_families_md

    text = (ROOT / "docs" / "families.md").read_text()
    assert render_families_md(text) == text, "docs/families.md drifted: run python -m moeharden.model.famdoc"


@pytest.fixture(scope="module", params=SUPPORTED)
def tiny(request):
    from moeharden.model.tiny import build_tiny_model, tiny_config

    base = CONFIG_MAPPING[request.param]()
    cfg = tiny_config(base, lookup_spec(base))
    return request.param, build_tiny_model(cfg), cfg


def _ids(seed):
    return torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(seed))


def _group_mask(choice, G, topk_group, group_min):
    T, E = choice.shape
    g = choice.view(T, G, E // G)
    score = g.max(-1).values if group_min == 1 else g.topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, G).scatter(1, score.topk(topk_group, -1).indices, 1.0)
    return keep.repeat_interleave(E // G, dim=1).bool()


def reference(li, cfg, logits):
    """(indices [T,k], weights [T,k] or None) from the router's own logits, by the declared rule."""
    spec, k = li.spec, li.top_k
    logits = logits.float()
    bias = 0.0 if li.selection_bias is None else li.selection_bias.detach().float().reshape(1, -1)
    if spec.combine == "topk_logits_softmax":
        v, i = logits.topk(k, -1)
        return i, v.softmax(-1)
    if spec.combine == "topk_logits_sigmoid":               # selection on logits (+ bias), sigmoid weights
        i = (logits + bias).topk(k, -1).indices
        w = logits.gather(1, i).sigmoid()
        if spec.renorm_key and spec.renorm_key != "always" and config_value(cfg, (spec.renorm_key,)):
            w = w / w.sum(-1, keepdim=True)
        return i, w
    s = {"softmax": lambda x: x.softmax(-1), "sigmoid": torch.sigmoid, "probs": lambda x: x}[spec.score](logits)
    choice = s + bias
    G = routing_groups(spec, cfg)
    if G > 1:
        tg = int(config_value(cfg, (spec.group_keys[1],)))
        choice = choice.masked_fill(~_group_mask(choice, G, tg, spec.group_min), float("-inf"))
    i = choice.topk(k, -1).indices
    if spec.combine == "custom":
        return i, None
    w = s.gather(1, i)
    if spec.null_output == "zero":                          # a null pick adds nothing: weight 0 (ZAYA's skip)
        w = w.masked_fill(i >= li.num_experts, 0.0)
    renorm = spec.renorm_key == "always" or bool(spec.renorm_key and config_value(cfg, (spec.renorm_key,)))
    if renorm:
        w = w / w.sum(-1, keepdim=True)
    scale = config_value(cfg, (spec.scale_key,)) if spec.scale_key else None
    return i, w * (float(scale) if scale is not None else 1.0)


def test_a_record_matches_routing_from_the_routers_own_logits(tiny):
    family, model, cfg = tiny
    layers = moe_layers(model)
    logits = {}
    hooks = [li.router.register_forward_hook(
        lambda m, a, out, li=li: logits.__setitem__(
            li.layer, (out[li.spec.logits_at] if isinstance(out, tuple) else out).detach().flatten(0, -2)))
        for li in layers]
    with torch.no_grad(), record_routing(model, norms=False) as rec:
        model(input_ids=_ids(1))
    for h in hooks:
        h.remove()
    for li in layers:
        ref_i, ref_w = reference(li, cfg, logits[li.layer])
        got_i, got_w = rec.layers[li.layer].indices, rec.layers[li.layer].weights
        assert got_i.shape == ref_i.shape, family
        for t in range(got_i.shape[0]):
            assert set(got_i[t].tolist()) == set(ref_i[t].tolist()), (family, li.layer, t)
            if ref_w is not None:
                want = dict(zip(ref_i[t].tolist(), ref_w[t].tolist(), strict=True))
                for e, w in zip(got_i[t].tolist(), got_w[t].tolist(), strict=True):
                    assert w == pytest.approx(want[e], rel=1e-4, abs=1e-5), (family, li.layer, t, e)


def test_b_masked_equals_pruned_saved_and_reloaded(tiny, tmp_path):
    from moeharden.attack.prune import prune_checkpoint
    from moeharden.model.selfcheck import choose_keep

    family, model, cfg = tiny
    model.save_pretrained(tmp_path / "src")
    with torch.no_grad(), record_routing(model, norms=False) as rec:
        model(input_ids=_ids(2))
    keep = choose_keep(model, cfg, rec)
    prune_checkpoint(tmp_path / "src", tmp_path / "out", keep, self_check=False)
    ids = _ids(3)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with mask_experts(model, keep):
            masked = model(input_ids=ids).logits
        pruned = type(model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        got = pruned(input_ids=ids).logits
    assert (masked - plain).abs().max() > 1e-3, "the mask should remove experts the model was using"
    assert (got - masked).abs().max() <= 1e-4, family
    assert [li.num_experts for li in moe_layers(pruned)] == [4] * len(keep)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["moeharden"]["pruned"]["kept_experts"] == 4


def test_c_disk_view_matches_module_view(tiny, tmp_path):
    from safetensors import safe_open

    from moeharden.model.disk import classify_tensors

    family, model, cfg = tiny
    spec = lookup_spec(cfg)
    model.save_pretrained(tmp_path)
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    want: dict[tuple[int, str], int] = {}
    for li in moe_layers(model):
        want[(li.layer, "expert")] = sum(p.numel() for p in li.experts.parameters())
        # router rows: weight, bias, selection bias (when saved) and further [E] vectors
        n = li.router_weight.numel() + (0 if li.router_bias is None else li.router_bias.numel())
        n += li.selection_bias.numel() if li.selection_bias is not None and id(li.selection_bias) in saved else 0
        n += sum(p.numel() for name, p in li.router.named_parameters() if f"router.{name}".endswith(spec.expert_vectors)
                 ) if spec.expert_vectors else 0
        want[(li.layer, "router")] = n
    got: dict[tuple[int, str], int] = {}
    shapes: dict[str, list[int]] = {}
    for shard in tmp_path.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            shapes.update({name: list(f.get_slice(name).get_shape()) for name in f.keys()})
    for name, role in classify_tensors(spec, cfg, shapes).items():
        if role is not None:   # a selection bias is sliced like router rows (some save it as gate.bias)
            kind = "expert" if role.kind == "expert" else "router"
            got[(role.layer, kind)] = got.get((role.layer, kind), 0) + int(torch.tensor(shapes[name]).prod())
    assert got == want, family


@pytest.mark.parametrize("model_type", ["mixtral", "deepseek_v3", "qwen3_5_moe_text", "nemotron_h"])
def test_self_check_passes_and_is_cached(model_type):
    from moeharden.model.selfcheck import check_adapter, ensure_adapter

    cfg = CONFIG_MAPPING[model_type]()
    r = check_adapter(cfg)
    assert r.ok, r.reason
    assert r.prune_max_abs <= 1e-4 and r.record_max_abs <= 1e-4
    assert ensure_adapter(cfg) is r            # cached: a process pays once per family


def test_self_check_refuses_a_broken_adapter(monkeypatch):
    """An adapter whose block path is wrong (as a transformers rename would make it) is refused, exit 3."""
    import dataclasses

    from moeharden.errors import UnsupportedModelError
    from moeharden.model import families, registry, selfcheck

    # the MoE block renamed (as a transformers release might): the adapter finds no experts
    broken = dataclasses.replace(lookup_spec(CONFIG_MAPPING["mixtral"]()), block_attrs=("block_sparse_moe",))
    monkeypatch.setattr(registry, "_BY_TYPE", {**registry._BY_TYPE, "mixtral": broken})
    monkeypatch.setattr(selfcheck, "_CACHE", {})
    with pytest.raises(UnsupportedModelError, match="Self-check") as exc:
        selfcheck.ensure_adapter(CONFIG_MAPPING["mixtral"]())
    assert exc.value.exit_code == 3
    assert families.FAMILIES  # the real table is untouched


def test_refused_families_say_why():
    from moeharden.errors import UnsupportedModelError
    from moeharden.model.registry import spec_for_config

    for mt in ("deepseek_v4", "jetmoe"):
        with pytest.raises(UnsupportedModelError, match="refused"):
            spec_for_config(CONFIG_MAPPING[mt]())
    # A.X K2 is refused only with group routing (light checkpoints route without groups)
    with pytest.raises(UnsupportedModelError, match="n_group"):
        spec_for_config(CONFIG_MAPPING["axk2"](n_group=8, topk_group=4))
    assert spec_for_config(CONFIG_MAPPING["axk2"]()).name == "A.X K2"


def test_cli_prune_refuses_when_the_self_check_fails_and_skip_bypasses_it(tiny_mixtral_ckpt, tmp_path, monkeypatch):
    """A failing self-check is exit 3 with the reason, and prune publishes nothing — although its
    work ran beside the check, nothing reaches ``--out`` and no temporary sibling is left;
    ``--skip-self-check`` lets an expert through."""
    from typer.testing import CliRunner

    from moeharden.cli import app
    from moeharden.model import adapter_check, selfcheck

    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"keep": {"0": [0, 1, 2, 3], "1": [4, 5, 6, 7]}}))
    failing = selfcheck.SelfCheckResult("Mixtral", False, "the physically pruned model differs from the masked one")
    monkeypatch.setattr(adapter_check, "prepare_check", lambda config, seed: failing)
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from", str(keep), "--out", str(out)])
    assert res.exit_code == 3, res.output
    assert "Self-check" in res.output and "differs from the masked one" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from", str(keep), "--out", str(out),
                              "--skip-self-check"])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").exists()


@pytest.fixture
def cold_self_check(tmp_path, monkeypatch):
    """No cached self-check result, in memory or on disk."""
    from moeharden.model import selfcheck

    monkeypatch.setattr(selfcheck, "_CACHE", {})
    monkeypatch.setenv("MOEHARDEN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_self_check_beside_a_command_runs_in_a_child_and_matches_in_process(cold_self_check, monkeypatch):
    """Cold, the check runs in a forked child process (its result equals the in-process check's, and is
    then cached on disk); warm, no child is started."""
    from moeharden.model import adapter_check, selfcheck
    from moeharden.model.adapter_check import AdapterCheck

    cfg = CONFIG_MAPPING["mixtral"]()
    started = []                                             # children forked
    real = adapter_check._fork
    monkeypatch.setattr(adapter_check, "_fork", lambda *a: started.append(a) or real(*a))
    with AdapterCheck(cfg) as check:
        got = check.wait()
    assert len(started) == 1 and got.ok
    assert list((cold_self_check / "selfcheck").glob("*.json"))
    monkeypatch.setattr(selfcheck, "_CACHE", {})
    here = selfcheck.check_adapter(cfg)                      # from the disk cache the child wrote
    assert (here.family, here.ok, here.record_max_abs, here.prune_max_abs) == \
        (got.family, got.ok, got.record_max_abs, got.prune_max_abs)
    for f in (cold_self_check / "selfcheck").glob("*.json"):
        f.unlink()
    monkeypatch.setattr(selfcheck, "_CACHE", {})
    fresh = selfcheck.check_adapter(cfg)                     # really run in this process
    assert (fresh.ok, fresh.record_max_abs, fresh.prune_max_abs) == (got.ok, got.record_max_abs, got.prune_max_abs)
    with AdapterCheck(cfg) as check:                         # cached now: no child
        check.wait()
    assert len(started) == 1


def test_self_check_child_failure_is_reported_and_a_dead_child_is_replaced(cold_self_check, monkeypatch):
    """A failing result from the child raises exit 3 (also when the command's own work failed:
    the self-check is the error reported, the command's error its cause); a child that dies
    without a result is replaced by the in-process check."""
    from moeharden.errors import InputError, UnsupportedModelError
    from moeharden.model import adapter_check, selfcheck

    cfg = CONFIG_MAPPING["mixtral"]()
    import os

    failing = selfcheck.SelfCheckResult("Mixtral", False, "a masked expert was still selected")
    monkeypatch.setattr(adapter_check, "_child_run", lambda config, seed: failing)   # the forked child's answer
    with pytest.raises(UnsupportedModelError, match="still selected") as exc:
        with adapter_check.AdapterCheck(cfg):
            pass
    assert exc.value.exit_code == 3
    with pytest.raises(UnsupportedModelError, match="still selected") as exc:
        with adapter_check.AdapterCheck(cfg):
            raise InputError("the command's own error")
    assert isinstance(exc.value.__cause__, InputError)
    assert not selfcheck._CACHE                                # a failure is not remembered, even in memory
    monkeypatch.setattr(adapter_check, "_child_run", lambda config, seed: os._exit(9))
    with adapter_check.AdapterCheck(cfg) as check:
        assert check.wait().ok                               # run here instead
    assert not adapter_check.AdapterCheck(cfg, enabled=False).wait()



def test_a_cold_self_check_prints_nothing_of_its_own(cold_self_check, capfd):
    """The self-check saves and reloads its tiny model beside the user's command; transformers'
    progress bars for that ("Writing model shards", "Loading weights") were interleaved with the
    command's output. They are off during the check and back on afterwards."""
    import warnings

    from transformers.utils import logging as hf_logging

    from moeharden.model import selfcheck

    was = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings():      # huggingface_hub's own bars stay off (conftest sets HF_HUB_DISABLE_PROGRESS_BARS)
        warnings.simplefilter("ignore", UserWarning)
        hf_logging.enable_progress_bar()                      # transformers' bars on, as in a user's terminal
    try:
        assert selfcheck.check_adapter(CONFIG_MAPPING["qwen3_moe"]()).ok
        err = capfd.readouterr().err
        assert "Writing model shards" not in err and "Loading weights" not in err
        assert hf_logging.is_progress_bar_enabled()
    finally:
        if not was:
            hf_logging.disable_progress_bar()
