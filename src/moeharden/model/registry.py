"""All MoE-family knowledge, in one registry of small declarative adapters.

Every other module asks this one where a family keeps its router, experts, selection bias,
shared experts, attention projections and config keys — nothing else branches on a family name.
The families table is :mod:`moeharden.model.families` (entries of :class:`~moeharden.model.spec.FamilySpec`);
this module looks entries up and holds the **module view** (:func:`moe_layers`): the MoE
blocks of a loaded (or meta-device) model, with their router weight ``[E, H]``, router bias,
selection bias, fused expert module and top-k; plus parameter groups and LoRA targets. The
**disk view** (which checkpoint tensors are indexed by expert) is :mod:`moeharden.model.disk`;
keep-set checks against a family's routing are in :mod:`moeharden.model.keepset`.

An unsupported or dense model raises :class:`~moeharden.errors.UnsupportedModelError` listing
the supported families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from moeharden.errors import UnsupportedModelError
from moeharden.model.families import FAMILIES
from moeharden.model.spec import FamilySpec

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_families() -> list[str]:
    """Display names of every supported family."""
    return [f.name for f in FAMILIES if not f.refuse]


def lookup_spec(config: Any) -> FamilySpec | None:
    """The table entry for a transformers config (refused families included), or ``None``.

    A multimodal wrapper whose own type is not listed resolves through its ``text_config``.
    """
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    if model_type not in _BY_TYPE and text is not None and getattr(text, "model_type", None) in _BY_TYPE:
        model_type = text.model_type
    return _BY_TYPE.get(model_type)


def spec_for_config(config: Any) -> FamilySpec:
    """The adapter for a transformers config.

    Raises:
        UnsupportedModelError: the model type is not a supported MoE family (dense models
            included), or a listed family whose routing cannot be pruned exactly (with the reason).
    """
    spec = lookup_spec(config)
    if spec is not None and spec.refuse:
        raise UnsupportedModelError(
            f"{spec.name} ({getattr(config, 'model_type', None)!r}) is refused: {spec.refuse}.",
            hint="Masking and pruning would not compute what the model computes; see docs/families.md.")
    if spec is not None:
        for key, why in spec.refuse_when:
            if config_value(config, (key,)) not in (None, 0, False):
                raise UnsupportedModelError(
                    f"This {spec.name} checkpoint is refused: it sets {key} = {config_value(config, (key,))!r}, and {why}.",
                    hint="Masking and pruning would not compute what the model computes; see docs/families.md.")
        return spec
    model_type = getattr(config, "model_type", None)
    raise UnsupportedModelError(
        f"Model type {model_type!r} is not a supported Mixture-of-Experts family. Supported: "
        + ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES if not f.refuse) + ".",
        hint="moeharden audits MoE checkpoints only; a dense model has no experts to prune.")


def get_path(obj: Any, path: str) -> Any:
    """The value at a dotted attribute (or dict-key) path, or ``None`` where any step is missing."""
    for part in path.split("."):
        if obj is None:
            return None
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return obj


def config_value(config: Any, keys: Sequence[str], layer: int | None = None) -> Any:
    """First present value among dotted ``keys`` of a config object or dict.

    A per-layer list (HunYuan allows ``moe_topk: [2, 2, ...]``) yields its ``layer`` entry, or its
    maximum when no layer is given.
    """
    for k in keys:
        v = get_path(config, k)
        if v is not None:
            if isinstance(v, (list, tuple)):
                return v[layer] if layer is not None and layer < len(v) else max(v)
            return v
    return None


@dataclass
class MoELayer:
    """One MoE block of a loaded model (module view)."""

    layer: int
    block: Any
    router: Any
    router_weight: Any            # [E, H] parameter
    router_bias: Any | None       # [E]
    selection_bias: Any | None    # [E] or [1, E]
    experts: Any
    shared_experts: list[Any]
    num_experts: int              # routed experts E (rows of the router that hold weights)
    top_k: int
    spec: FamilySpec
    num_null: int = 0             # weightless null experts scored after them (router rows E..E+Z-1)

    @property
    def router_rows(self) -> int:
        """Rows of the router weight: the routed experts, then the null experts (never pruned)."""
        return self.num_experts + self.num_null

    @property
    def routable_null(self) -> int:
        """Null experts top-k may pick besides the kept experts (0 where the rows gate shared experts)."""
        return self.num_null if self.spec.null_routable else 0

    @property
    def top_k_paths(self) -> tuple[str, ...]:
        """Attribute paths (from ``block``) of the ints the block reads top-k from; masking caps them."""
        return self.spec.top_k_attrs


def _router_params(spec: FamilySpec, router: Any) -> tuple[Any, Any]:
    src = get_path(router, spec.router_linear) if spec.router_linear else router   # DBRX/HunYuan wrap a Linear
    return src.weight, getattr(src, "bias", None)


def moe_layers(model: Any) -> list[MoELayer]:
    """The MoE blocks of a loaded model, in decoder-layer order (dense layers skipped).

    Raises:
        UnsupportedModelError: unsupported family, or a supported family with no MoE layer.
    """
    spec = spec_for_config(model.config)
    base = model
    layers = get_path(base, spec.layers_path)
    if layers is None:  # a bare decoder (e.g. LlamaForCausalLM.model) or a wrapper (peft)
        for prefix in ("model", "base_model.model", "base_model.model.model", "language_model"):
            layers = get_path(base, f"{prefix}.{spec.layers_path}") or get_path(base, f"{prefix}.{spec.layers_path.split('.', 1)[-1]}")
            if layers is not None:
                break
    if layers is None:
        raise UnsupportedModelError(f"Could not find the decoder layers ({spec.layers_path}) of this {spec.name} model.")
    cfg = model.config
    out = []
    for i, layer in enumerate(layers):
        top_k_cfg = config_value(cfg, spec.top_k_keys, i)
        for attr in spec.block_attrs:
            block = layer if attr == "." else getattr(layer, attr, None)
            experts = getattr(block, spec.experts_attr, None) if block is not None else None
            if experts is None:
                continue
            router = get_path(block, spec.router_attr)
            w, b = _router_params(spec, router)
            sel = get_path(block, spec.selection_bias) if spec.selection_bias else None
            shared = [m for m in (getattr(block, a, None) for a in spec.shared_attrs) if m is not None]
            top_k = next((v for v in (get_path(block, p) for p in spec.top_k_attrs) if isinstance(v, int)), top_k_cfg)
            null = null_experts(spec, cfg, i)
            out.append(MoELayer(i, block, router, w, b, sel, experts, shared, int(w.shape[0]) - null, int(top_k), spec,
                                null))
            break
    if not out:
        raise UnsupportedModelError(f"This {spec.name} model has no MoE layer (every layer is dense).")
    return out


def num_experts(config: Any) -> int:
    """Routed experts per MoE layer, from the config."""
    spec = spec_for_config(config)
    v = config_value(config, spec.expert_keys)
    if v is None:
        raise UnsupportedModelError(f"The {spec.name} config has no expert count ({', '.join(spec.expert_keys)}).")
    return int(v)


def null_experts(spec: FamilySpec, config: Any, layer: int | None = None) -> int:
    """Weightless experts the router scores after the routed ones (0 for most families)."""
    if not spec.null_experts_key:
        return spec.null_experts
    return int(config_value(config, (spec.null_experts_key,), layer) or 0)


def routing_groups(spec: FamilySpec, config: Any) -> int:
    """Number of expert groups of group-limited routing (1 when the family routes without groups)."""
    if not spec.group_keys:
        return 1
    if spec.groups_unless and config_value(config, (spec.groups_unless[0],)) == spec.groups_unless[1]:
        return 1
    g = config_value(config, (spec.group_keys[0],))
    return int(g) if g else 1



def lora_targets(model_or_layers: Any) -> tuple[list[str], list[str]]:
    """What LoRA adapts in a re-alignment attack, for peft's ``LoraConfig``.

    Args:
        model_or_layers: a loaded model of a supported family, or its :func:`moe_layers`.
    Returns:
        ``(target_modules, target_parameters)``: the family's attention projections (module-name
        suffixes) and the fused 3-D expert tensors ``[E, ., .]`` by parameter path from the decoder
        layer (only kept experts are ever routed to, so only their slices matter); the second list
        is empty for families that keep experts as separate modules or flattened 2-D (DBRX).
    Raises:
        UnsupportedModelError: unsupported family, or no MoE layer.
    """
    layers = model_or_layers if isinstance(model_or_layers, (list, tuple)) else moe_layers(model_or_layers)
    li = layers[0]
    params = sorted({f"{li.spec.experts_attr}.{n}" for n, p in li.experts.named_parameters(recurse=False)
                     if p.dim() == 3})
    return list(li.spec.attention_projs), params


# --------------------------------------------------------------------------- parameter groups
GROUPS = ("experts", "router", "shared_experts", "attention", "embeddings", "norms", "lm_head", "other")


def parameter_groups(spec: FamilySpec | None, model: Any) -> dict[str, list[str]]:
    """Parameter names of a loaded model by group (for policies and training).

    Args:
        spec: the model's family adapter (``None``: looked up from ``model.config``).
        model: a loaded (or meta-device) model of a supported family.

    ``experts``: routed expert tensors; ``router``: router weight/bias and selection bias;
    ``shared_experts``; ``attention``: the decoder layers' attention; ``embeddings``; ``norms``;
    ``lm_head``; everything else in ``other`` (dense MLPs of dense layers included).

    Raises:
        UnsupportedModelError: unsupported family, or ``spec`` does not match the model.
    """
    if spec is not None and spec is not spec_for_config(model.config):
        raise UnsupportedModelError(f"parameter_groups: a {spec.name} adapter for a "
                                    f"{spec_for_config(model.config).name} model.")
    ids: dict[int, str] = {}
    for li in moe_layers(model):
        for p in li.experts.parameters():
            ids[id(p)] = "experts"
        for p in li.router.parameters():
            ids[id(p)] = "router"
        if li.selection_bias is not None:
            ids[id(li.selection_bias)] = "router"
        for sh in li.shared_experts:
            for p in sh.parameters():
                ids[id(p)] = "shared_experts"
    # everything else by the type of the innermost module holding it (names are unreliable:
    # DBRX keeps its attention under `norm_attn_norm`)
    import torch

    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    by_module: dict[int, str] = {}
    for _, mod in model.named_modules():       # parents first, so inner modules win
        kind = type(mod).__name__.lower()
        attention = "attention" in kind or kind.endswith("mla")           # MLA: multi-head latent attention
        g = ("lm_head" if mod is out_emb else "embeddings" if isinstance(mod, torch.nn.Embedding)
             else "attention" if attention else "norms" if "norm" in kind else None)
        if g is not None:
            for p in mod.parameters():
                by_module[id(p)] = g
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        out[ids.get(id(p)) or by_module.get(id(p), "other")].append(name)
    return out
