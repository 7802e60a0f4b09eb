"""Registry: module view, disk view, pruned config and parameter groups on tiny real models.

The disk view is checked against what ``save_pretrained`` really writes for every family (and
against the fused module naming of ``state_dict()``): the tensors it calls expert / router /
selection-bias tensors must hold exactly as many numbers as the module view's expert, router and
selection-bias tensors — so nothing expert-indexed is missed and nothing else is swept in.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers as T
from families import FAMILIES, HAND_FAMILIES, build_tiny, model_class, tiny_config
from safetensors import safe_open

from moeharden.errors import KeepSetError, UnsupportedModelError
from moeharden.model.disk import classify_tensor, classify_tensors, pruned_config
from moeharden.model.keepset import check_keep_counts, valid_keep
from moeharden.model.registry import (
    FAMILIES as SPECS,
)
from moeharden.model.registry import (
    config_value,
    lora_targets,
    moe_layers,
    null_experts,
    parameter_groups,
    spec_for_config,
    supported_families,
)

SPECS_BY_TYPE = {t: f for f in SPECS for t in f.model_types}


def test_dense_model_is_refused_with_the_supported_list():
    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(UnsupportedModelError) as exc:
        spec_for_config(cfg)
    for name in supported_families():
        assert name in exc.value.message
    assert len(supported_families()) >= 15
    with pytest.raises(UnsupportedModelError):
        moe_layers(T.LlamaForCausalLM(cfg))


# (family, overrides, expected MoE decoder layers) — expected from each config's documented rule
DENSE_CASES = [
    ("qwen2_moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[3]), [1]),
    ("qwen3_moe", dict(num_hidden_layers=3, mlp_only_layers=[0]), [1, 2]),
    ("deepseek_v2", dict(num_hidden_layers=3, first_k_dense_replace=2), [2]),
    ("deepseek_v3", dict(num_hidden_layers=3, first_k_dense_replace=1), [1, 2]),
    ("glm4_moe", dict(num_hidden_layers=3, first_k_dense_replace=0), [0, 1, 2]),
    ("llama4_text", dict(num_hidden_layers=4, interleave_moe_layer_step=2), [1, 3]),
    ("ernie4_5_moe", dict(num_hidden_layers=4, moe_layer_start_index=1, moe_layer_interval=2), [1, 3]),
]


@pytest.mark.parametrize("family,overrides,expected", DENSE_CASES, ids=[c[0] for c in DENSE_CASES])
def test_moe_layers_skip_dense_layers(family, overrides, expected):
    model, cfg = build_tiny(family, **overrides)
    layers = moe_layers(model)
    assert [li.layer for li in layers] == expected
    for li in layers:
        assert li.num_experts == 8 and li.router_weight.shape == (8, cfg.hidden_size)
        assert li.top_k == 2


def test_module_view_fields_for_every_family():
    """Hand-written expectations for the 15 hand-configured families (the others' module views are
    exercised by tests/test_discovery.py against their routers and checkpoints)."""
    for family in HAND_FAMILIES:
        model, cfg = build_tiny(family)
        spec = spec_for_config(cfg)
        for li in moe_layers(model):
            assert li.spec is spec
            assert (li.selection_bias is not None) == (spec.selection_bias is not None)
            assert len(li.shared_experts) == (1 if family in ("qwen2_moe", "llama4_text") else 0) + (
                1 if family in ("qwen2_moe", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe",
                                "hunyuan_v1_moe") else 0)
            assert (li.router_bias is not None) == (family == "gpt_oss")
            # every top-k location names an int equal to the config's top-k
            for path in li.top_k_paths:
                owner = li.block
                for part in path.split("."):
                    owner = getattr(owner, part)
                assert owner == 2, (family, path)


def _expected_numel(model) -> dict[tuple[int, str], int]:
    """Numbers per (layer, role) in the module view: experts, router weight+bias, selection bias
    (when the model saves it: some keep it as a non-persistent buffer) and further [E] router vectors."""
    out: dict[tuple[int, str], int] = {}
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}
    for li in moe_layers(model):
        out[(li.layer, "expert")] = sum(p.numel() for p in li.experts.parameters())
        out[(li.layer, "router")] = li.router_weight.numel() + (0 if li.router_bias is None else li.router_bias.numel())
        out[(li.layer, "router")] += sum(p.numel() for n, p in li.router.named_parameters()
                                         if li.spec.expert_vectors and f"router.{n}".endswith(li.spec.expert_vectors))
        if li.selection_bias is not None and id(li.selection_bias) in saved:
            out[(li.layer, "selection_bias")] = li.selection_bias.numel()
    return out


def _merged(d: dict[tuple[int, str], int]) -> dict[tuple[int, str], int]:
    """Router rows and selection bias together (both are sliced along E; Inkling-2 saves its bias as gate.bias)."""
    out: dict[tuple[int, str], int] = {}
    for (layer, kind), n in d.items():
        key = (layer, "expert" if kind == "expert" else "router")
        out[key] = out.get(key, 0) + n
    return out


def _classified_numel(spec, cfg, tensors: dict[str, list[int]]):
    got: dict[tuple[int, str], int] = {}
    experts_seen: dict[int, set[int]] = {}
    roles = classify_tensors(spec, cfg, tensors)
    for name, shape in tensors.items():
        role = roles[name]
        if role is None:
            continue
        assert "shared" not in name, name
        n = 1
        for d in shape:
            n *= d
        got[(role.layer, role.kind)] = got.get((role.layer, role.kind), 0) + n
        if role.kind == "expert" and role.expert is not None:
            experts_seen.setdefault(role.layer, set()).add(role.expert)
            assert role.rename(name, 5).replace(".experts.5.", f".experts.{role.expert}.", 1) == name
        elif role.kind == "expert":
            assert shape[role.axis] == 8 * role.rows_per_expert
        else:
            assert shape[role.axis] == 8 + role.null       # router rows: experts, then null experts
    for layer, seen in experts_seen.items():
        assert seen == set(range(8)), (layer, seen)
    return got


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_view_matches_module_view(family, tmp_path):
    model, cfg = build_tiny(family)
    spec = spec_for_config(cfg)
    want = _expected_numel(model)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        on_disk = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}
    assert _merged(_classified_numel(spec, cfg, on_disk)) == _merged(want)
    # checkpoints saved in the fused module naming (state_dict of the loaded model) too
    fused = {n: list(t.shape) for n, t in model.state_dict().items()}
    assert _merged(_classified_numel(spec, cfg, fused)) == _merged(want)


def test_disk_view_refuses_an_inconsistent_checkpoint():
    spec = spec_for_config(tiny_config("mixtral"))
    cfg = tiny_config("mixtral")
    with pytest.raises(UnsupportedModelError):
        classify_tensor(spec, cfg, "model.layers.0.mlp.experts.gate_up_proj", [6, 96, 32])
    with pytest.raises(UnsupportedModelError):
        classify_tensor(spec, cfg, "model.layers.0.block_sparse_moe.experts.8.w1.weight", [48, 32])


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_config_builds_a_model_with_kept_experts(family):
    cfg = tiny_config(family)
    spec = spec_for_config(cfg)
    kept = 4
    d = pruned_config(spec, cfg.to_dict(), kept)
    assert cfg.to_dict() != d
    new_cfg = type(cfg).from_dict(d)
    with torch.device("meta"):
        model = model_class(family)(new_cfg)
    layers = moe_layers(model)
    k0 = int(config_value(cfg, spec.top_k_keys))          # 2, or 1 where the family routes top-1 (ZAYA)
    assert {li.num_experts for li in layers} == {kept}
    assert {li.top_k for li in layers} == {k0}
    assert {tuple(li.experts.parameters())[0].shape[0] for li in layers} in ({kept}, {kept * 24})   # DBRX: [E*I, H]
    if valid_keep(spec, cfg, 1):                 # top-k capped at the kept count
        d1 = type(cfg).from_dict(pruned_config(spec, cfg.to_dict(), 1))
        with torch.device("meta"):
            m1 = model_class(family)(d1)
        assert {li.top_k for li in moe_layers(m1)} == {min(k0, 1 + null_experts(spec, cfg) * spec.null_routable)}   # null experts stay
    for bad in (0, 9):
        with pytest.raises(KeepSetError):
            pruned_config(spec, cfg.to_dict(), bad)


def test_group_limited_routing_constraints():
    cfg = tiny_config("deepseek_v3", n_group=2, topk_group=1)
    spec = spec_for_config(cfg)
    with pytest.raises(KeepSetError, match="groups"):
        pruned_config(spec, cfg.to_dict(), 3)                        # 2 groups do not divide 3
    assert pruned_config(spec, cfg.to_dict(), 6)["n_routed_experts"] == 6
    assert not valid_keep(spec, cfg, 2)                              # 1 per group: top-2-sum group score
    with pytest.raises(KeepSetError):
        check_keep_counts(spec, cfg, {1: [0, 1, 2, 4]})              # 3 + 1: unequal per group
    with pytest.raises(KeepSetError, match="best 1 group"):          # 2 groups scored, top-4 from one
        check_keep_counts(spec, tiny_config("deepseek_v3", num_experts_per_tok=4), {1: [0, 1, 4, 5]})
    # DeepSeek-V2 with the greedy method ignores its groups
    greedy = tiny_config("deepseek_v2", topk_method="greedy")
    assert pruned_config(spec_for_config(greedy), greedy.to_dict(), 3)["n_routed_experts"] == 3


def test_per_layer_top_k_list_is_capped():
    cfg = tiny_config("hunyuan_v1_moe", moe_topk=[2, 2])
    spec = spec_for_config(cfg)
    assert pruned_config(spec, cfg.to_dict(), 1)["moe_topk"] == [1, 1]
    model, _ = build_tiny("hunyuan_v1_moe", moe_topk=[2, 2])
    assert [li.top_k for li in moe_layers(model)] == [2, 2]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "dbrx", "llama4_text"])
def test_parameter_groups_partition_the_model(family):
    model, cfg = build_tiny(family)
    groups = parameter_groups(spec_for_config(cfg), model)
    names = [n for g in groups.values() for n in g]
    params = dict(model.named_parameters())
    assert sorted(names) == sorted(params)                           # a partition
    layers = moe_layers(model)
    assert sum(params[n].numel() for n in groups["experts"]) == sum(
        p.numel() for li in layers for p in li.experts.parameters())
    assert sum(params[n].numel() for n in groups["router"]) == sum(
        li.router_weight.numel() + (0 if li.router_bias is None else li.router_bias.numel()) for li in layers)
    assert groups["attention"] and groups["embeddings"] and groups["norms"]
    assert all("shared" in n for n in groups["shared_experts"])
    if family == "qwen2_moe":
        assert any("shared_expert_gate" in n for n in groups["shared_experts"])
    with pytest.raises(UnsupportedModelError):
        parameter_groups(SPECS[0] if family != "mixtral" else SPECS[1], model)


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_targets_cover_each_familys_attention_and_train_only_adapters(family):
    """The registry's LoRA targets adapt every linear layer of every attention module — found here by
    module type, not by name — and nothing outside attention but the fused expert tensors; one
    training step then moves LoRA parameters only."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny(family)
    modules, params = lora_targets(model)
    # Linear layers of every attention module, found by module type: its own and, one level down,
    # those of its projection modules (Inkling-2 wraps each projection's Linear in a module)
    attention_linears = set()
    for name, mod in model.named_modules():
        kind = type(mod).__name__.lower()
        if not ("attention" in kind or kind.endswith("mla")) or kind.endswith("decoderlayer"):   # MLA: latent attention
            continue
        for child, sub in mod.named_children():
            if isinstance(sub, torch.nn.Linear):
                attention_linears.add(f"{name}.{child}")
            elif child.endswith("_proj"):
                attention_linears |= {f"{name}.{child}.{n}" for n, m in sub.named_modules()
                                      if n and isinstance(m, torch.nn.Linear)}
    # peft refuses any target named gate_proj next to fused gate_up experts: the attention output gates
    # of AFMoE, Beam and HY-V4 (self_attn.gate_proj) are not adapted
    attention_linears = {n for n in attention_linears if not n.endswith(".self_attn.gate_proj")}
    assert attention_linears, "no attention projection found by module type"
    decoder = dict(model.named_modules())[SPECS_BY_TYPE[family].layers_path]
    n_decoder = sum(1 for layer in decoder if any("attention" in type(m).__name__.lower()   # hybrids: attention
                                                  or type(m).__name__.lower().endswith("mla")
                                                  for m in layer.modules() if m is not layer))   # layers only
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(modules),
                                                  target_parameters=list(params) or None, lora_dropout=0.0))
    adapted = {n.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
               for n, _ in peft_model.named_parameters() if ".lora_A" in n}
    assert attention_linears <= adapted                                   # every attention projection
    others = adapted - attention_linears
    assert all(".experts" in n for n in others), sorted(others)[:3]       # plus fused expert tensors only
    assert len({re.search(r"\.(?:layers|blocks)\.(\d+)\.", n).group(1)
                for n in attention_linears}) == n_decoder                  # in every (attention) decoder layer
    if family == "dbrx":
        assert any(n.endswith("Wqkv") for n in adapted) and any(n.endswith("out_proj") for n in adapted)

    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert all(p.requires_grad for p in lora)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(lora, lr=1e-2)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    peft_model.train()
    peft_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any(n.endswith(("Wqkv.lora_B.default.weight", "q_proj.lora_B.default.weight", "q_a_proj.lora_B.default.weight",
                           "q_b_proj.lora_B.default.weight", "qkv_proj.lora_B.default.weight",
                           "q_proj.linear.lora_B.default.weight", "q_gate_proj.lora_B.default.weight",
                           # ZAYA scales keys by a learned temperature initialised to 0: at the first step
                           # attention is uniform and only its value projections get a gradient
                           "v_proj_current.lora_B.default.weight"))
               for n in changed)


def test_self_check_builds_a_tiny_model_of_a_shallower_checkpoint():
    """A real config truncated to one layer (gpt-oss: one ``layer_types`` entry) still self-checks:
    its per-layer lists are repeated to the tiny model's two layers (they used to fail validation)."""
    from moeharden.model.selfcheck import check_adapter
    from moeharden.model.tiny import tiny_config as shrink

    cfg = T.GptOssConfig(num_hidden_layers=1, layer_types=["sliding_attention"], num_local_experts=32,
                         hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
                         head_dim=64, vocab_size=201088)
    tiny = shrink(cfg, spec_for_config(cfg))
    assert tiny.num_hidden_layers == 2 and tiny.layer_types == ["sliding_attention", "sliding_attention"]
    res = check_adapter(cfg)
    assert res.ok, res.reason


def test_a_checkpoint_stored_in_its_original_layout_is_read_through_the_conversion_table(tmp_path):
    """Ergo saves its router transposed (``feed_forward.gate_kernel`` ``[H, E]``) and its experts'
    RMSNorm scales beside them: the stored names place nothing, the conversion table places each
    along the stored expert axis. A checkpoint whose stored names place everything never builds
    the table (it costs ~0.7 s of every prune)."""
    from moeharden.model import disk

    model, cfg = build_tiny("ergo")
    spec = spec_for_config(cfg)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        shapes = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}
    E, H = cfg.num_experts, cfg.hidden_size
    assert all(classify_tensor(spec, cfg, n, s) is None for n, s in shapes.items())
    roles = classify_tensors(spec, cfg, shapes)
    router = [(n, r) for n, r in roles.items() if r is not None and r.kind == "router"]
    assert router and all(n.endswith("gate_kernel") and r.axis == 1 and shapes[n] == [H, E] for n, r in router)
    norms = [r for n, r in roles.items() if n.endswith(".feed_forward.expert_output_norm.scale")]
    assert norms and all(r is not None and r.kind == "expert" and r.axis == 0 for r in norms)
    assert any(r is not None and r.kind == "selection_bias" for n, r in roles.items() if n.endswith("router_bias"))

    disk._VIEWS.clear()
    qwen, qcfg = build_tiny("qwen3_moe")
    qwen.save_pretrained(tmp_path / "q")
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        qshapes = {n: list(f.get_slice(n).get_shape()) for n in f.keys()}
    classify_tensors(spec_for_config(qcfg), qcfg, qshapes)
    assert not disk._VIEWS


def test_kept_rows_keep_null_expert_rows_last():
    """Pruning a router keeps the kept experts' rows, then every null expert's row (LongCat-Flash);
    a flattened layout keeps each kept expert's block of rows."""
    from moeharden.model.disk import TensorRole

    assert TensorRole(0, "router", axis=0, null=2).kept_rows([5, 1], 10) == [5, 1, 8, 9]
    assert TensorRole(0, "router", axis=0).kept_rows([5, 1], 8) == [5, 1]
    assert TensorRole(0, "expert", axis=0, rows_per_expert=3).kept_rows([2, 0], 24) == [6, 7, 8, 0, 1, 2]
