"""Tiny real configs of every supported MoE family (hidden 32, 2-3 layers, 8 experts).

``build_tiny(family)`` returns a seeded, eval-mode model of the real transformers class with
non-trivial router weights (so routing is not degenerate), and its config. The first 15 families
(``HAND_FAMILIES``) have hand-written configs below; families with leading dense layers get one,
so that layer skipping is exercised. Every other supported family the installed transformers has
(found by :func:`moeharden.model.discover.discover_moe_families`) gets the library's tiny config of
its config class (:func:`moeharden.model.tiny.tiny_config`), so ``FAMILIES`` is every supported
family and each test parametrised over it runs on all of them.
"""

from __future__ import annotations

import torch
import transformers as T

COMMON = dict(vocab_size=64, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=64)

# family -> (config class, model class, config kwargs)
SPECS = {
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM,
                dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "qwen2_moe": (T.Qwen2MoeConfig, T.Qwen2MoeForCausalLM,
                  dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=24,
                       num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False)),
    "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM,
                  dict(intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, num_experts=8,
                       num_experts_per_tok=2, norm_topk_prob=True, head_dim=16)),
    "olmoe": (T.OlmoeConfig, T.OlmoeForCausalLM,
              dict(intermediate_size=24, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
                   eos_token_id=1, pad_token_id=0)),
    "deepseek_v2": (T.DeepseekV2Config, T.DeepseekV2ForCausalLM,
                    dict(intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                         topk_method="group_limited_greedy", n_group=2, topk_group=1, routed_scaling_factor=1.5,
                         num_key_value_heads=2)),
    "deepseek_v3": (T.DeepseekV3Config, T.DeepseekV3ForCausalLM,
                    dict(intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                         q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=2,
                         topk_group=1, routed_scaling_factor=2.0, norm_topk_prob=True, num_key_value_heads=2)),
    "glm4_moe": (T.Glm4MoeConfig, T.Glm4MoeForCausalLM,
                 dict(intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=3, n_routed_experts=8,
                      num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                      head_dim=16, routed_scaling_factor=1.0, norm_topk_prob=True)),
    "gpt_oss": (T.GptOssConfig, T.GptOssForCausalLM,
                dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=16, layer_types=["full_attention", "full_attention"])),
    "phimoe": (T.PhimoeConfig, T.PhimoeForCausalLM,
               dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "granitemoe": (T.GraniteMoeConfig, T.GraniteMoeForCausalLM,
                   dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2)),
    "dbrx": (T.DbrxConfig, T.DbrxForCausalLM,
             dict(d_model=32, n_heads=2, n_layers=2, max_seq_len=64,
                  attn_config={"kv_n_heads": 1, "rope_theta": 10000.0, "clip_qkv": 8.0},
                  ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 24})),
    "llama4_text": (T.Llama4TextConfig, T.Llama4ForCausalLM,
                    dict(intermediate_size=24, intermediate_size_mlp=48, num_hidden_layers=2, num_local_experts=8,
                         num_experts_per_tok=2, head_dim=16, interleave_moe_layer_step=1)),
    "ernie4_5_moe": (T.Ernie4_5_MoeConfig, T.Ernie4_5_MoeForCausalLM,
                     dict(intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2, moe_num_experts=8,
                          moe_k=2, head_dim=16)),
    "minimax": (T.MiniMaxConfig, T.MiniMaxForCausalLM,
                dict(intermediate_size=24, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2,
                     head_dim=16)),
    "hunyuan_v1_moe": (T.HunYuanMoEV1Config, T.HunYuanMoEV1ForCausalLM,
                       dict(intermediate_size=24, num_hidden_layers=2, num_experts=8, moe_topk=2, head_dim=16)),
}

HAND_FAMILIES = sorted(SPECS)


def _discovered() -> list[str]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeharden.model.discover import discover_moe_families
    from moeharden.model.registry import lookup_spec

    out = []
    for fam in discover_moe_families():
        spec = lookup_spec(CONFIG_MAPPING[fam.model_type]())
        if spec is not None and not spec.refuse and not set(spec.model_types) & set(SPECS):
            out.append(fam.model_type)
    return out


DISCOVERED_FAMILIES = _discovered()
FAMILIES = sorted(set(SPECS) | set(DISCOVERED_FAMILIES))


def model_class(family: str):
    """The causal-LM class of ``family`` (Llama-4's text model is not what AutoModelForCausalLM picks)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeharden.model.registry import lookup_spec

    if family in SPECS:
        return SPECS[family][1]
    spec = lookup_spec(CONFIG_MAPPING[family]())
    if spec.model_class:
        return getattr(T, spec.model_class)
    return T.AutoModelForCausalLM._model_mapping[type(tiny_config(family))]


def tiny_config(family: str, **overrides):
    if family not in SPECS:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        from moeharden.model import tiny
        from moeharden.model.registry import lookup_spec

        base = CONFIG_MAPPING[family]()
        cfg = tiny.tiny_config(base, lookup_spec(base))
        return type(cfg).from_dict({**cfg.to_dict(), **overrides}) if overrides else cfg
    cfg_cls, _, kw = SPECS[family]
    kw = {**({} if family == "dbrx" else COMMON), **kw, **overrides}
    if family == "dbrx":
        kw.setdefault("vocab_size", 64)
    return cfg_cls(**kw)


def build_tiny(family: str, seed: int = 0, **overrides):
    """A seeded tiny model of ``family`` in eval mode (fp32), with lively routers; and its config."""
    from moeharden.model.registry import moe_layers

    cfg = tiny_config(family, **overrides)
    if family not in SPECS:
        from moeharden.model.tiny import build_tiny_model

        return build_tiny_model(cfg, seed=seed), cfg
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg) if family != "llama4_text" else SPECS[family][1](cfg)
    model = model.float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for li in moe_layers(model):
            li.router_weight.copy_(torch.randn(li.router_weight.shape, generator=g) * 0.6)
            if li.router_bias is not None:
                li.router_bias.copy_(torch.randn(li.router_bias.shape, generator=g) * 0.3)
            if li.selection_bias is not None:
                li.selection_bias.copy_(torch.randn(li.selection_bias.shape, generator=g) * 0.1)
            for p in li.experts.parameters():   # some classes initialise experts to zeros/empty
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, cfg


# The policy of the locked tiny Mixtral that tests share (conftest.locked_release).
LOCK_POLICY = """version: 1
license: apache-2.0
permitted_uses: research only
contact: sec@example.com
groups:
  experts: frozen
  router: frozen
  attention: {lora: {max_rank: 8}}
  norms: trainable
"""
