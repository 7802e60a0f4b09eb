"""The shape of one registry entry: where an MoE family keeps its router, experts and config keys.

:class:`FamilySpec` is data only; the table of entries is :mod:`moeharden.model.families` and the
functions that read it are :mod:`moeharden.model.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class FamilySpec:
    """Where one MoE family keeps things. Paths are attribute paths (dots) from the named parent.

    Attributes:
        name: display name; model_types: ``config.model_type`` values it covers.
        layers_path: decoder-layer list from the top model; block_attrs: candidate MoE-block
            attributes of a decoder layer (the first one holding an experts module wins; a layer
            without one is dense and skipped; ``"."`` is the decoder layer itself).
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
        attention_projs: module-name suffixes of the attention projections (LoRA targets); names
            a given model lacks are ignored (DeepSeek's ``q_proj`` exists only without q-LoRA).
        combine / renorm_key / scale_key: how combine weights come from the scores (top-k of the
            scores, or softmax/sigmoid of the top-k logits; renormalised when the config key is
            true or ``"always"``; times the config's scaling factor) — checked by discovery.
        model_class: the causal-LM class (when ``AutoModelForCausalLM`` does not pick it).
        tiny: config overrides a tiny random instance needs (:mod:`moeharden.model.tiny`).
        expert_vectors: name suffixes of further ``[E]`` router tensors (Gemma-4's per-expert scale).
        refuse: why the family's routing cannot be masked/pruned exactly; a non-empty reason
            refuses the family (listed, never rewritten); refuse_when: ``(config key, reason)``
            pairs refusing only checkpoints whose config sets that key (support what is exact).
        null_experts_key / null_experts: config key of the number of weightless experts the router
            also scores (LongCat-Flash's "zero-computation experts"), or that number where the class
            fixes it (ZAYA's one skip expert): router rows ``E … E+Z-1`` after the ``E`` routed
            experts. They hold no weights, are never pruned and always stay routable. ``null_output``:
            what a pick of one adds — the token itself times the weight (``identity``) or nothing
            (``zero``, its weight is 0). Such a block hands its experts module remapped pairs, so the
            routing record takes the indices from the router's own ``torch.topk`` and the weights
            from position ``router_weights_at`` of the router's output. ``gate``: the rows are not
            experts a token can pick but the gates of always-on shared experts, scored by the router
            beside the routed ones (Inkling: their logits are normalised with the top-k ones); they
            are kept like null rows but never count as routable (top-k ≤ kept).
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
    score: Literal["softmax", "sigmoid", "probs"] = "softmax"   # probs: the router returns probabilities
    weight_on_input: bool = False
    flat_rows_key: str | None = None
    router_linear: str | None = None
    logits_at: int = 0
    expert_mlp: Literal["swiglu", "custom"] = "swiglu"   # swiglu: act(x·Wg)·(x·Wu)·Wd from fused gate_up/down
    min_keep: int = 1            # fewest experts per layer the routing can run with (Phi-MoE: 2)
    group_min: int = 1           # fewest kept experts per routing group (top-2-sum group scores: 2)
    attention_projs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    combine: Literal["topk_probs", "topk_logits_softmax", "topk_logits_sigmoid", "custom"] = "topk_probs"
    renorm_key: str | None = "norm_topk_prob"   # config key (or "always") renormalising the top-k weights
    scale_key: str | None = "routed_scaling_factor"   # config key of a factor on the combine weights
    model_class: str | None = None   # causal-LM class when AutoModelForCausalLM does not pick it
    tiny: tuple[tuple[str, Any], ...] = ()   # config overrides a tiny instance needs (model/tiny.py)
    expert_vectors: tuple[str, ...] = ()   # other [E] tensors (name suffixes) sliced with the router rows
    refuse_when: tuple[tuple[str, str], ...] = ()   # (config key, reason): refused when the key is set
    null_experts_key: str | None = None    # config key of Z weightless experts (router rows E..E+Z-1)
    null_experts: int = 0                  # Z where the class fixes it (no config key)
    null_output: Literal["identity", "zero", "gate"] = "identity"   # what a null pick adds: x·w, or nothing;
                                                                    # gate: rows gating shared experts (no picks)
    router_weights_at: int = 1             # position of the top-k weights in the router's output tuple
    load_in_place: bool = True   # False: the class rewrites stored values on load (ZAYA's skip bias), so only
                                 # from_pretrained gives the model transformers users get
    refuse: str = ""             # why this family's routing cannot be masked/pruned exactly ("" = supported)
    notes: str = ""

    @property
    def null_routable(self) -> bool:
        """Whether the null rows are experts top-k may pick (not the gates of always-on shared experts)."""
        return self.null_output != "gate"


