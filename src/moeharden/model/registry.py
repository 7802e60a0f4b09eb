"""All MoE-family knowledge, in one registry of small declarative adapters.

Every other module asks this one where a family keeps its router, experts, selection bias,
shared experts and config keys — nothing else branches on a family name. Two views:

* **module view** (:func:`moe_layers`): the MoE blocks of a loaded (or meta-device) model, with
  their router weight ``[E, H]``, router bias, selection bias, fused expert module and top-k;
* **disk view** (:func:`classify_tensor`): which safetensors tensors of a checkpoint are indexed by
  expert. transformers 5 ``save_pretrained`` writes many families in their original per-expert
  layout (Mixtral: ``block_sparse_moe.experts.3.w1.weight``), others fused (gpt-oss:
  ``mlp.experts.gate_up_proj`` ``[E, H, 2I]``), DBRX flattened (``ffn.experts.mlp.w1`` ``[E·I, H]``).

An unsupported or dense model raises :class:`~moeharden.errors.UnsupportedModelError` listing
the supported families.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moeharden.errors import KeepSetError, UnsupportedModelError


@dataclass(frozen=True)
class FamilySpec:
    """Where one MoE family keeps things. Paths are attribute paths (dots) from the named parent.

    Attributes:
        name: display name; model_types: ``config.model_type`` values it covers.
        layers_path: decoder-layer list from the top model; block_attrs: candidate MoE-block
            attributes of a decoder layer (the first one holding an experts module wins; a layer
            without one is dense and skipped).
        router_attr / experts_attr: children of the block; selection_bias: path from the block
            to a ``[E]`` (or ``[1, E]``) selection-bias tensor, if any.
        shared_attrs: shared-expert children, and their gates (never pruned).
        expert_keys / top_k_keys: config keys (dotted for nested configs) of expert count, top-k.
        top_k_attrs: module attributes (paths from the block) holding top-k, capped by masking.
        group_keys: (n_group, topk_group) keys for group-limited routing, if any.
        groups_unless: (config key, value) under which the groups are ignored by the router
            (DeepSeek-V2 ``topk_method: greedy``, e.g. V2-Lite).
        score: how routing probabilities are formed from router logits (for ``probs``).
        weight_on_input: the combine weight scales the expert's *input* (Llama-4).
        flat_rows_key: config key of rows per expert in flattened ``[E·I, H]`` tensors (DBRX).
        logits_at: position of the router logits ``[T, E]`` in the router's output tuple (a
            router returning a bare tensor returns the logits).
    """

    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    block_attrs: tuple[str, ...] = ("mlp",)
    router_attr: str = "gate"
    experts_attr: str = "experts"
    selection_bias: str | None = None
    shared_attrs: tuple[str, ...] = ()
    expert_keys: tuple[str, ...] = ("num_local_experts",)
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok",)
    top_k_attrs: tuple[str, ...] = ("gate.top_k",)
    group_keys: tuple[str, str] | None = None
    groups_unless: tuple[str, str] | None = None
    score: Literal["softmax", "sigmoid"] = "softmax"
    weight_on_input: bool = False
    flat_rows_key: str | None = None
    router_linear: str | None = None
    logits_at: int = 0
    expert_mlp: Literal["swiglu", "custom"] = "swiglu"   # swiglu: act(x·Wg)·(x·Wu)·Wd from fused gate_up/down
    min_keep: int = 1            # fewest experts per layer the routing can run with (Phi-MoE: 2)
    group_min: int = 1           # fewest kept experts per routing group (top-2-sum group scores: 2)
    notes: str = ""


_DEEPSEEK_KEYS = dict(expert_keys=("n_routed_experts",), shared_attrs=("shared_experts",))

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("Mixtral", ("mixtral",)),
    FamilySpec("Qwen2-MoE", ("qwen2_moe",), expert_keys=("num_experts",),
               shared_attrs=("shared_expert", "shared_expert_gate"),
               notes="shared expert with a sigmoid gate"),
    FamilySpec("Qwen3-MoE", ("qwen3_moe",), expert_keys=("num_local_experts", "num_experts")),
    FamilySpec("OLMoE", ("olmoe",), expert_keys=("num_experts",)),
    FamilySpec("DeepSeek-V2", ("deepseek_v2",), group_keys=("n_group", "topk_group"),
               groups_unless=("topk_method", "greedy"), **_DEEPSEEK_KEYS,
               notes="group-limited greedy routing; first_k_dense_replace dense layers"),
    FamilySpec("DeepSeek-V3", ("deepseek_v3",), selection_bias="gate.e_score_correction_bias", score="sigmoid",
               group_keys=("n_group", "topk_group"), group_min=2, **_DEEPSEEK_KEYS,
               notes="sigmoid scores, bias-based selection, group-limited routing"),
    FamilySpec("GLM4-MoE", ("glm4_moe",), selection_bias="gate.e_score_correction_bias", score="sigmoid",
               group_keys=("n_group", "topk_group"), group_min=2, **_DEEPSEEK_KEYS),
    FamilySpec("gpt-oss", ("gpt_oss",), router_attr="router", top_k_attrs=("router.top_k",), expert_mlp="custom",
               notes="router bias; softmax over the top-k logits; fused experts with biases"),
    FamilySpec("Phi-MoE", ("phimoe",), router_attr="router", top_k_attrs=("router.top_k",), min_keep=2,
               notes="sparsemixer routing (always picks 2: keep at least 2)"),
    FamilySpec("GraniteMoE", ("granitemoe",), block_attrs=("block_sparse_moe",), router_attr="router",
               top_k_attrs=("router.top_k",)),
    FamilySpec("DBRX", ("dbrx",), layers_path="transformer.blocks", block_attrs=("ffn",), router_attr="router",
               expert_keys=("ffn_config.moe_num_experts",), top_k_keys=("ffn_config.moe_top_k",),
               top_k_attrs=("top_k",), flat_rows_key="ffn_config.ffn_hidden_size", router_linear="layer",
               expert_mlp="custom",
               notes="experts stored flattened [E*I, H]"),
    FamilySpec("Llama-4 (text)", ("llama4_text",), block_attrs=("feed_forward",), router_attr="router",
               shared_attrs=("shared_expert",), top_k_attrs=("router.top_k", "top_k"), score="sigmoid", logits_at=1,
               weight_on_input=True, expert_mlp="custom", notes="sigmoid of the top-k logits scales the expert input"),
    FamilySpec("ERNIE-4.5-MoE", ("ernie4_5_moe",), selection_bias="gate.moe_statics.e_score_correction_bias",
               expert_keys=("moe_num_experts",), top_k_keys=("moe_k",), shared_attrs=("shared_experts",),
               notes="selection bias of shape [1, E]; moe_layer_start_index/interval dense layers"),
    FamilySpec("MiniMax", ("minimax",)),
    FamilySpec("HunYuan-MoE", ("hunyuan_v1_moe",), expert_keys=("num_experts",), top_k_keys=("moe_topk",),
               shared_attrs=("shared_mlp",), router_linear="wg"),
)

_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}


def supported_families() -> list[str]:
    """Display names of every supported family."""
    return [f.name for f in FAMILIES]


def spec_for_config(config: Any) -> FamilySpec:
    """The adapter for a transformers config.

    Raises:
        UnsupportedModelError: the model type is not a supported MoE family (dense models included).
    """
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    if model_type not in _BY_TYPE and text is not None and getattr(text, "model_type", None) in _BY_TYPE:
        model_type = text.model_type
    if model_type in _BY_TYPE:
        return _BY_TYPE[model_type]
    raise UnsupportedModelError(
        f"Model type {model_type!r} is not a supported Mixture-of-Experts family. Supported: "
        + ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES) + ".",
        hint="moeharden audits MoE checkpoints only; a dense model has no experts to prune.")


def _get(obj: Any, path: str) -> Any:
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
        v = _get(config, k)
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
    num_experts: int
    top_k: int
    spec: FamilySpec

    @property
    def top_k_paths(self) -> tuple[str, ...]:
        """Attribute paths (from ``block``) of the ints the block reads top-k from; masking caps them."""
        return self.spec.top_k_attrs


def _router_params(spec: FamilySpec, router: Any) -> tuple[Any, Any]:
    src = getattr(router, spec.router_linear) if spec.router_linear else router   # DBRX/HunYuan wrap a Linear
    return src.weight, getattr(src, "bias", None)


def moe_layers(model: Any) -> list[MoELayer]:
    """The MoE blocks of a loaded model, in decoder-layer order (dense layers skipped).

    Raises:
        UnsupportedModelError: unsupported family, or a supported family with no MoE layer.
    """
    spec = spec_for_config(model.config)
    base = model
    layers = _get(base, spec.layers_path)
    if layers is None:  # a bare decoder (e.g. LlamaForCausalLM.model) or a wrapper (peft)
        for prefix in ("model", "base_model.model", "base_model.model.model", "language_model"):
            layers = _get(base, f"{prefix}.{spec.layers_path}") or _get(base, f"{prefix}.{spec.layers_path.split('.', 1)[-1]}")
            if layers is not None:
                break
    if layers is None:
        raise UnsupportedModelError(f"Could not find the decoder layers ({spec.layers_path}) of this {spec.name} model.")
    cfg = model.config
    out = []
    for i, layer in enumerate(layers):
        top_k_cfg = config_value(cfg, spec.top_k_keys, i)
        for attr in spec.block_attrs:
            block = getattr(layer, attr, None)
            experts = getattr(block, spec.experts_attr, None) if block is not None else None
            if experts is None:
                continue
            router = _get(block, spec.router_attr)
            w, b = _router_params(spec, router)
            sel = _get(block, spec.selection_bias) if spec.selection_bias else None
            shared = [m for m in (getattr(block, a, None) for a in spec.shared_attrs) if m is not None]
            top_k = next((v for v in (_get(block, p) for p in spec.top_k_attrs) if isinstance(v, int)), top_k_cfg)
            out.append(MoELayer(i, block, router, w, b, sel, experts, shared, int(w.shape[0]), int(top_k), spec))
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


# --------------------------------------------------------------------------- disk view
@dataclass(frozen=True)
class TensorRole:
    """How a checkpoint tensor is indexed by expert.

    ``kind``: ``expert`` (per-expert tensor when ``expert`` is set, else fused along ``axis``),
    ``router`` (rows along ``axis``) or ``selection_bias`` (along ``axis``). Flattened layouts
    (DBRX ``[E·I, H]``) have ``rows_per_expert = I``.
    """

    layer: int
    kind: Literal["expert", "router", "selection_bias"]
    expert: int | None = None
    axis: int | None = None
    rows_per_expert: int = 1

    def rename(self, name: str, new_expert: int) -> str:
        """The name of a per-expert tensor renumbered to ``new_expert``."""
        return _PER_EXPERT.sub(lambda m: f"{m.group(1)}{new_expert}{m.group(3)}", name, count=1)


_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")
_PER_EXPERT = re.compile(r"(\.experts\.)(\d+)(\.)")
_SHARED = re.compile(r"shared_expert|shared_mlp")
# MoE-block names on disk (they may differ from the module names: Mixtral's `mlp` is saved as
# `block_sparse_moe`); router tensors are the block's gate/router weight/bias (DBRX/Granite: .layer.)
_BLOCK_DISK = r"(?:mlp|block_sparse_moe|feed_forward|ffn|moe)"
_ROUTER = re.compile(_BLOCK_DISK + r"\.(?:gate|router)(?:\.layer|\.wg)?\.(?:weight|bias)$")
_FUSED_EXTRA = re.compile(_BLOCK_DISK + r"\.(?:input_linear|output_linear)\.weight$")


def classify_tensor(spec: FamilySpec, config: Any, name: str, shape: Sequence[int]) -> TensorRole | None:
    """Role of one on-disk tensor (``None``: not indexed by expert, copied as is).

    Raises:
        UnsupportedModelError: a tensor that looks expert-indexed but whose shape disagrees with
            the config's expert count (the registry would prune it wrongly).
    """
    m = _LAYER.search(name)
    if m is None or _SHARED.search(name):
        return None
    layer = int(m.group(1))
    E = config_value(config, spec.expert_keys, layer)
    shape = list(shape)
    pe = _PER_EXPERT.search(name)
    if pe is not None:
        if E is not None and int(pe.group(2)) >= int(E):
            raise UnsupportedModelError(f"{name}: expert id {pe.group(2)} but the config has {E} experts per layer.")
        return TensorRole(layer, "expert", expert=int(pe.group(2)))
    if "e_score_correction_bias" in name:
        return TensorRole(layer, "selection_bias", axis=len(shape) - 1)
    if ".experts." in name or _FUSED_EXTRA.search(name):
        if spec.flat_rows_key:
            rows = int(config_value(config, (spec.flat_rows_key,)))
            if shape[0] != E * rows:
                raise UnsupportedModelError(f"{name}: expected {E}×{rows} rows, found shape {shape}.")
            return TensorRole(layer, "expert", axis=0, rows_per_expert=rows)
        if not shape or shape[0] != E:
            raise UnsupportedModelError(f"{name}: fused expert tensor of shape {shape}, expected {E} experts first.")
        return TensorRole(layer, "expert", axis=0)
    if _ROUTER.search(name):
        if not shape or shape[0] != E:
            return None   # e.g. a 1-row gate of a dense block
        return TensorRole(layer, "router", axis=0)
    return None


def pruned_config(spec: FamilySpec, config_dict: dict, kept: int) -> dict:
    """The config of a checkpoint pruned to ``kept`` experts per MoE layer.

    Updates the expert count; caps top-k at ``kept``; with group-limited routing the group count
    must still divide ``kept`` and ``topk_group`` is capped at the group count.

    Raises:
        KeepSetError: ``kept`` out of range or incompatible with expert groups.
    """
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config_dict.items()}
    E = config_value(cfg, spec.expert_keys)
    if not 1 <= kept <= int(E):
        raise KeepSetError(f"Cannot keep {kept} experts per layer: the model has {E}.")

    def put(key: str, value: Any) -> None:
        parts = key.split(".")
        target = cfg
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        if parts[-1] in target or len(parts) == 1:
            target[parts[-1]] = value

    for k in spec.expert_keys:
        v = _get(cfg, k)
        if v is not None:
            put(k, [kept] * len(v) if isinstance(v, (list, tuple)) else kept)
    for k in spec.top_k_keys:
        v = _get(cfg, k)
        if v is not None:
            put(k, [min(int(x), kept) for x in v] if isinstance(v, (list, tuple)) else min(int(v), kept))
    groups = routing_groups(spec, cfg)
    if groups > 1:
        if kept % groups:
            raise KeepSetError(
                f"This {spec.name} model routes in {groups} expert groups; keeping {kept} experts per layer "
                f"does not split evenly across groups.",
                hint=f"Keep a multiple of {groups} experts per layer, the same number from each group.")
        tg_key = spec.group_keys[1]
        if _get(cfg, tg_key) is not None:
            put(tg_key, min(int(_get(cfg, tg_key)), groups))
    return cfg


def routing_groups(spec: FamilySpec, config: Any) -> int:
    """Number of expert groups of group-limited routing (1 when the family routes without groups)."""
    if not spec.group_keys:
        return 1
    if spec.groups_unless and config_value(config, (spec.groups_unless[0],)) == spec.groups_unless[1]:
        return 1
    g = config_value(config, (spec.group_keys[0],))
    return int(g) if g else 1


def valid_keep(spec: FamilySpec, config: Any, keep: int) -> bool:
    """Whether ``keep`` experts per layer is a prunable count for this model (groups, minimums)."""
    E = int(config_value(config, spec.expert_keys))
    G = routing_groups(spec, config)
    if not spec.min_keep <= keep <= E or keep % G:
        return False
    if G == 1:
        return True
    return keep // G >= spec.group_min and (keep // G) * _topk_group(spec, config) >= _top_k(spec, config, keep)


def _topk_group(spec: FamilySpec, config: Any) -> int:
    return int(config_value(config, (spec.group_keys[1],)) or 1) if spec.group_keys else 1


def _top_k(spec: FamilySpec, config: Any, kept: int) -> int:
    return min(int(config_value(config, spec.top_k_keys) or 1), kept)


def check_keep_counts(spec: FamilySpec, config: Any, keep: dict[int, list[int]], *, balanced: bool = True) -> None:
    """Counts the family's routing can run with; with ``balanced``, equal counts per routing group
    (physical pruning needs it; a mask on a loaded model does not).

    Raises:
        KeepSetError: too few experts kept, or unequal/too few per routing group.
    """
    for layer, ids in keep.items():
        if len(ids) < spec.min_keep:
            raise KeepSetError(f"Layer {layer} keeps {len(ids)} expert(s); {spec.name} routing needs at least "
                               f"{spec.min_keep}.")
    if balanced:
        check_group_balance(spec, config, keep)
    G = routing_groups(spec, config)
    if G > 1:
        E = int(config_value(config, spec.expert_keys))
        size = E // G
        for layer, ids in keep.items():
            per = [sum(1 for e in ids if e // size == g) for g in range(G)]
            if min(per) < spec.group_min:
                raise KeepSetError(f"Layer {layer} keeps {per} experts in its {G} routing groups; {spec.name} "
                                   f"scores groups by their top {spec.group_min} and needs at least that many in each.")
            # the router picks top-k only inside its topk_group best groups: those must hold enough
            tg = _topk_group(spec, config)
            if sum(sorted(per)[:tg]) < _top_k(spec, config, len(ids)):
                raise KeepSetError(f"Layer {layer} keeps {per} experts in its {G} routing groups; the router picks "
                                   f"{_top_k(spec, config, len(ids))} experts from its best {tg} group(s), "
                                   "which could hold fewer.", hint="Keep more experts in each routing group.")


def check_group_balance(spec: FamilySpec, config: Any, keep: dict[int, list[int]]) -> None:
    """With group-limited routing, every group must lose the same number of experts.

    Raises:
        KeepSetError: unequal removal across groups in some layer.
    """
    groups = routing_groups(spec, config)
    if groups <= 1:
        return
    E = int(config_value(config, spec.expert_keys))
    size = E // int(groups)
    for layer, ids in keep.items():
        counts = [sum(1 for e in ids if e // size == g) for g in range(int(groups))]
        if len(set(counts)) != 1:
            raise KeepSetError(
                f"Layer {layer} keeps {counts} experts from its {groups} routing groups; group-limited routing "
                "needs the same number kept in every group.",
                hint=f"Group g holds experts g*{size} .. g*{size}+{size - 1}; keep equally many from each.")


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
        g = ("lm_head" if mod is out_emb else "embeddings" if isinstance(mod, torch.nn.Embedding)
             else "attention" if "attention" in kind else "norms" if "norm" in kind else None)
        if g is not None:
            for p in mod.parameters():
                by_module[id(p)] = g
    out: dict[str, list[str]] = {g: [] for g in GROUPS}
    for name, p in model.named_parameters():
        out[ids.get(id(p)) or by_module.get(id(p), "other")].append(name)
    return out
