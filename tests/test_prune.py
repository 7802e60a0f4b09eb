"""Physical pruning: for every family, the masked model equals the pruned, saved and reloaded one.

The checkpoints are saved in many small shards, so streaming across shard boundaries, renaming of
per-expert tensors, slicing of fused/flattened tensors, router rows and selection biases are all
exercised. The reference is the masked in-memory model (masking.mask_experts), an independent
code path from the streaming rewrite.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, build_tiny
from safetensors import safe_open

from moeharden.attack.prune import prune_checkpoint
from moeharden.model.keepset import valid_keep
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers
from moeharden.model.routing import record_routing


def _keep_for(model, cfg, k=4):
    """Drop the experts the model uses most (per layer), keeping a count valid for the family."""
    layers = moe_layers(model)
    spec = layers[0].spec
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), record_routing(model, norms=False) as rec:
        model(input_ids=ids)
    keep = {}
    from moeharden.model.registry import routing_groups

    G = routing_groups(spec, cfg)
    size = layers[0].num_experts // G
    for li in layers:
        used = rec.layers[li.layer].indices.reshape(-1).bincount(minlength=li.num_experts)
        chosen = []
        for g in range(G):   # least-used experts of each group survive, so the mask removes busy ones
            members = sorted(range(g * size, (g + 1) * size), key=lambda e: (int(used[e]), e))
            chosen += members[: k // G]
        keep[li.layer] = sorted(chosen)
    assert valid_keep(spec, cfg, k)
    return keep


@pytest.mark.parametrize("family", FAMILIES)
def test_masked_equals_pruned_checkpoint(family, tmp_path):
    model, cfg = build_tiny(family)
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src, max_shard_size="20KB")
    assert len(list(src.glob("*.safetensors"))) > 2                 # really sharded
    keep = _keep_for(model, cfg)
    result = prune_checkpoint(src, out, keep, max_shard_size="30KB")
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with mask_experts(model, keep):
            masked = model(input_ids=ids).logits
        pruned = type(model).from_pretrained(out, dtype=torch.float32).eval()
        got = pruned(input_ids=ids).logits
    assert (masked - plain).abs().max() > 1e-3, "the mask should remove experts the model was using"
    assert (got - masked).abs().max() <= 1e-4
    # the pruned checkpoint really is smaller: 4 experts per MoE layer
    assert [li.num_experts for li in moe_layers(pruned)] == [4] * len(moe_layers(model))
    assert result.num_experts_after == 4 and len(result.shards) > 1
    record = json.loads((out / "moeharden-prune.json").read_text())
    assert record["keep"] == {str(k): v for k, v in keep.items()}
    assert record["num_experts_before"] == 8
    cfg_out = json.loads((out / "config.json").read_text())
    assert cfg_out["moeharden"]["pruned"]["kept_experts"] == 4


def test_pruned_shards_respect_the_size_cap_and_index(tmp_path):
    model, cfg = build_tiny("mixtral")
    model.save_pretrained(tmp_path / "src", max_shard_size="15KB")
    keep = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7]}
    r = prune_checkpoint(tmp_path / "src", tmp_path / "out", keep, max_shard_size="25KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(r.shards)
    for shard in r.shards:
        path = tmp_path / "out" / shard
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            assert f.metadata()["moeharden_version"]
        # a shard holds one tensor larger than the cap, or stays within it
        assert path.stat().st_size <= 25_000 + 2_000 or len(keys) == 1
    # renamed per-expert tensors are contiguous 0..3 and nothing of experts 4..7 survives
    names = list(index["weight_map"])
    assert any(".experts.3." in n for n in names) and not any(".experts.4." in n for n in names)


def test_group_imbalance_is_rejected(tmp_path):
    from moeharden.errors import KeepSetError

    model, cfg = build_tiny("deepseek_v3")
    model.save_pretrained(tmp_path / "src")
    layers = [li.layer for li in moe_layers(model)]
    with pytest.raises(KeepSetError, match="group"):
        prune_checkpoint(tmp_path / "src", tmp_path / "out", {layer: [0, 1, 2, 4] for layer in layers})
    assert not (tmp_path / "out").exists()


def test_side_files_record_and_rerun(tiny_mixtral_ckpt, tmp_path):
    """Tokenizer, generation config, README, task file and task data travel; weights-like and
    integrity files of the source do not; the record names the source digest; re-running replaces
    the earlier output."""
    import shutil

    from tiny_lm import build_tokenizer

    from moeharden.io.outputs import OUTPUT_MARKER
    from moeharden.model.checkpoint import checkpoint_digest, load_tokenizer

    src = tmp_path / "src"
    shutil.copytree(tiny_mixtral_ckpt, src)
    build_tokenizer().save_pretrained(src)
    (src / "README.md").write_text("# tiny\n")
    (src / "moeharden-tasks.yaml").write_text("version: 1\ntasks: []\n")
    (src / "tasks").mkdir()
    (src / "tasks" / "a.jsonl").write_text('{"text": "x"}\n')
    (src / "moeharden-manifest.json").write_text("{}")        # signs the source weights: invalid after pruning
    (src / "stale.bin").write_bytes(b"\0" * 8)
    (src / OUTPUT_MARKER).write_text("{}")
    out = tmp_path / "out"
    keep = {0: [1, 6], 1: [0, 5]}
    prune_checkpoint(src, out, keep)
    names = {p.name for p in out.iterdir()}
    for kept in ("README.md", "moeharden-tasks.yaml", "tasks", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "moeharden-prune.json", OUTPUT_MARKER, "model.safetensors"):
        assert kept in names, kept
    assert not names & {"moeharden-manifest.json", "stale.bin", "model.safetensors.index.json"}
    assert (out / "tasks" / "a.jsonl").read_text() == '{"text": "x"}\n'
    assert load_tokenizer(out)("a charming journey")["input_ids"] == build_tokenizer()("a charming journey")["input_ids"]
    record = json.loads((out / "moeharden-prune.json").read_text())
    assert record["source"]["safetensors_digest"] == checkpoint_digest(src)
    assert record["tool"]["version"] and record["num_experts_after"] == 2
    r2 = prune_checkpoint(src, out, {0: [2, 3], 1: [2, 3]})
    assert json.loads((out / "moeharden-prune.json").read_text())["keep"] == {"0": [2, 3], "1": [2, 3]}
    assert r2.timings["total"] >= r2.timings["write"] > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_shared_expert_gate_rows_are_kept_and_never_picked(tmp_path):
    """Inkling's router scores its shared experts beside the routed ones (rows E…E+S-1 of the
    router weight; their logits are normalised with the top-k ones into the shared experts'
    gammas). Pruning to one expert keeps that expert's row, then every shared row; top-k drops to
    the kept count (a shared row is never a pick); the selection bias keeps the routed row only;
    and the pruned router's gammas equal a hand computation from the original router's weight."""
    import torch.nn.functional as F
    from families import build_tiny
    from safetensors import safe_open

    from moeharden.model.routing import record_routing

    model, cfg = build_tiny("inkling_text")
    layers = moe_layers(model)
    E, S = layers[0].num_experts, cfg.n_shared_experts
    assert S >= 1 and layers[0].num_null == S and layers[0].routable_null == 0
    model.save_pretrained(tmp_path / "src")
    keep = {li.layer: [5] for li in layers}
    prune_checkpoint(tmp_path / "src", tmp_path / "out", keep)
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out_cfg["n_routed_experts"], out_cfg["num_experts_per_tok"], out_cfg["n_shared_experts"]) == (1, 1, S)
    tensors = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        with safe_open(f, "pt") as h:
            tensors |= {k: h.get_tensor(k) for k in h.keys()}
    for li in layers:
        prefix = f"model.layers.{li.layer}.mlp.gate."
        assert torch.equal(tensors[prefix + "weight"], li.router_weight.detach()[[5] + list(range(E, E + S))])
        assert torch.equal(tensors[prefix + "e_score_correction_bias"], li.selection_bias.detach()[[5]])
    pruned = type(model).from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    seen = {}
    hooks = [li.router.register_forward_hook(lambda m, a, out, li=li: seen.__setitem__(li.layer, (a[0], out)))
             for li in moe_layers(pruned)]
    with torch.no_grad(), record_routing(pruned, norms=False) as rec:
        pruned(input_ids=ids)
    for h in hooks:
        h.remove()
    for li, orig in zip(moe_layers(pruned), layers, strict=True):
        assert (rec.layers[li.layer].indices == 0).all()                 # the one kept expert, never a shared row
        x, (_, _, _, gammas) = seen[li.layer]
        logits = F.linear(x.reshape(-1, x.shape[-1]).float(), orig.router_weight.detach().float())
        chosen = torch.cat([logits[:, [5]], logits[:, E:]], dim=-1)      # the kept expert's logit, the shared ones
        lp = F.logsigmoid(chosen)
        want = (lp - lp.logsumexp(-1, keepdim=True)).exp() * cfg.route_scale * float(orig.router.global_scale.detach())
        assert torch.allclose(gammas.float(), want[:, 1:], rtol=1e-5, atol=1e-6)
