"""Tiny random instances of a transformers MoE config class (for the self-check and discovery).

:func:`tiny_config` shrinks a config — a real checkpoint's, or a config class's defaults — to a
model of a few ten thousand parameters with the same class and the same routing settings: hidden
32, 2 decoder layers, 8 experts, top-2, vocabulary 64; per-layer lists and per-layer dicts are cut
to the kept layers (keeping one of each layer kind, so a hybrid model keeps an attention layer),
and a per-layer list of a model with fewer layers than that is repeated to the tiny depth.
The rules are generic; what a family needs beyond them is its registry entry's ``tiny`` overrides,
so this module never branches on a family name. :func:`build_tiny_model` builds the real
transformers class from it with lively routers (so that routing is not degenerate).
"""

from __future__ import annotations

from typing import Any

from moeharden.model.registry import FamilySpec

# generic small values, by config key; None in a config (a "derived" default) is filled too
_SMALL: dict[str, int] = {
    "hidden_size": 32, "d_model": 32, "num_hidden_layers": 2, "n_layers": 2, "num_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16,   # = qk_nope_head_dim + qk_rope_head_dim (a settable attribute in some configs)
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "n_shared_experts": 1,
}
_OFF_WHEN_NONE = {"n_group", "topk_group"}   # None switches the feature off: keep it off
_LAYER_KEYS = ("num_hidden_layers", "n_layers", "num_layers")
_TOKEN_KEYS = {"bos_token_id": 1, "eos_token_id": 2}
EXPERTS, TOP_K, VOCAB = 8, 2, 64


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _cut_per_layer(v: list, n: int) -> list:
    """A per-layer list cut to ``n`` layers, keeping one of each distinct kind when they fit."""
    kinds: list = []
    for x in v:
        if x not in kinds:
            kinds.append(x)
    if 1 < len(kinds) <= n and all(isinstance(x, str) for x in kinds):
        return (kinds + v[len(kinds):])[:n]
    return v[:n]


def _shrink(d: dict, *, n_layers: int, depth: int = 0) -> dict:
    n_orig = next((d[k] for k in _LAYER_KEYS if _is_int(d.get(k))), None)
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and all(str(x).isdigit() for x in v):      # per-layer dict
            out[k] = {x: y for x, y in v.items() if int(x) < n_layers}
        elif isinstance(v, dict) and depth < 2:
            out[k] = _shrink(v, n_layers=n_layers, depth=depth + 1)
        elif k == "pad_token_id":          # no padding row: a zero embedding would make tokens degenerate
            out[k] = None
        elif k in _TOKEN_KEYS and _is_int(v) and v >= VOCAB:
            out[k] = _TOKEN_KEYS[k]
        elif k in _TOKEN_KEYS and isinstance(v, list):
            out[k] = [x for x in v if _is_int(x) and x < VOCAB] or None
        elif k == "head_dim" and "qk_rope_head_dim" in d:   # latent attention ropes head_dim dims
            out[k] = _SMALL["qk_rope_head_dim"]
        elif k in _LAYER_KEYS and (_is_int(v) or v is None):
            out[k] = n_layers
        elif k in _SMALL and (_is_int(v) or v is None and k not in _OFF_WHEN_NONE):
            out[k] = _SMALL[k]
        elif ("intermediate" in k or k.endswith("ffn_hidden_size")) and (v is None or _is_int(v) and v > 32):
            out[k] = 32
        elif isinstance(v, list) and v and n_orig and len(v) == n_orig and n_orig > n_layers:
            out[k] = _cut_per_layer(v, n_layers)
        elif isinstance(v, list) and v and n_orig and len(v) == n_orig < n_layers:   # a model shallower than tiny
            out[k] = (v * n_layers)[:n_layers]
        else:
            out[k] = v
    return out


def _put(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def tiny_config(config: Any, spec: FamilySpec, *, n_layers: int = 2) -> Any:
    """A tiny config of the same class as ``config`` (8 experts, top-2, hidden 32).

    Args:
        config: a transformers config instance (a checkpoint's, or ``ConfigClass()``).
        spec: the family's registry entry (its expert/top-k keys and ``tiny`` overrides).
        n_layers: decoder layers to keep.
    Raises:
        Exception: whatever the config class raises when the shrunk values do not validate.
    """
    d = _shrink(config.to_dict(), n_layers=n_layers)
    for k in spec.expert_keys[:1]:
        _put(d, k, EXPERTS)
    for k in spec.expert_keys[1:]:
        if k in d:
            _put(d, k, EXPERTS)
    for k in spec.top_k_keys:
        _put(d, k, TOP_K)
    for k, v in spec.tiny:
        _put(d, k, v)
    for k in ("transformers_version", "architectures", "auto_map", "moeharden"):
        d.pop(k, None)
    return type(config).from_dict(d)


def build_tiny_model(config: Any, *, seed: int = 0):
    """The real transformers causal LM of ``config`` (fp32, eval) with lively routers and experts.

    Router weights ~ N(0, 0.6²), router and selection biases small, expert tensors ~ N(0, 0.2²)
    (some classes initialise experts to zeros or leave them empty).
    """
    import torch
    from transformers import AutoModelForCausalLM

    from moeharden.model.registry import moe_layers, spec_for_config

    spec = spec_for_config(config)
    torch.manual_seed(seed)
    model = model_class(spec, config)(config).float().eval() if spec.model_class else \
        AutoModelForCausalLM.from_config(config).float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    saved = {id(t) for t in model.state_dict(keep_vars=True).values()}   # non-persistent buffers stay
    with torch.no_grad():
        for li in moe_layers(model):
            li.router_weight.copy_(torch.randn(li.router_weight.shape, generator=g) * 0.6)
            if li.router_bias is not None:
                li.router_bias.copy_(torch.randn(li.router_bias.shape, generator=g) * 0.3)
            if li.selection_bias is not None and id(li.selection_bias) in saved:   # routed experts' entries
                routed = li.selection_bias.view(-1)[: li.num_experts]              # (a class may fix a null
                routed.copy_(torch.randn(routed.shape, generator=g) * 0.1)         # expert's on load: ZAYA)
            for p in li.experts.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def model_class(spec: FamilySpec, config: Any):
    """The causal-LM class a family is built with (``spec.model_class`` names it in transformers)."""
    import transformers

    return getattr(transformers, spec.model_class)
