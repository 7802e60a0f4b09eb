"""Which model types of the installed transformers have routed-expert layers.

Found by inspecting the modeling classes, not from a hand-written list: a causal-LM model type
whose modeling module defines a routed-experts module class (a ``torch.nn.Module`` subclass named
``...Experts``, shared-expert MLPs aside). Model types that share one causal-LM class
(``llama4`` / ``llama4_text``) are one family, keyed by the class's own config type. A newer
transformers that adds a family shows up here, and in ``tests/test_discovery.py``, unlisted.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True)
class DiscoveredFamily:
    """One causal-LM class with routed experts: its config's model type and every alias."""

    model_type: str          # the causal-LM class's own config model type (the tiny config's class)
    aliases: tuple[str, ...]  # every model type mapping to this class (wrappers included)
    model_class: str
    experts_classes: tuple[str, ...]


def _experts_classes(module, prefix: str = "") -> tuple[str, ...]:
    """Routed-experts classes of a modeling module: ``...Experts`` modules, shared experts aside.
    ``Shared`` is read after the family's own class prefix (GraniteMoeShared's routed experts are
    ``GraniteMoeSharedExperts``; Inkling's shared ones ``InklingSharedExperts``)."""
    import torch

    def shared(n: str) -> bool:
        return "Shared" in (n[len(prefix):] if prefix and n.startswith(prefix) else n)

    return tuple(sorted(n for n, c in vars(module).items()
                        if inspect.isclass(c) and issubclass(c, torch.nn.Module) and c.__module__ == module.__name__
                        and n.endswith("Experts") and not shared(n)))


def discover_moe_families() -> list[DiscoveredFamily]:
    """Every causal-LM family of the installed transformers with routed-expert layers, by model type."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    aliases: dict[str, list[str]] = {}         # family key (the class's config type) -> model types
    experts: dict[str, tuple[str, ...]] = {}
    causal_lm: dict[str, str] = {}             # family key -> its causal-LM class name
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        mod_name = model_type_to_module_name(model_type)
        try:
            module = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
            cls = getattr(transformers, class_name)
        except (ImportError, AttributeError):     # optional dependencies missing: not loadable here
            continue
        found = _experts_classes(module, class_name.removesuffix("ForCausalLM").removesuffix("ForConditionalGeneration"))
        if not found:
            continue
        config_class = getattr(cls, "config_class", None)
        key = getattr(config_class, "model_type", None) or model_type
        wrapper = "ForConditionalGeneration" in class_name
        if wrapper and config_class is not None:  # a multimodal wrapper: the family is its text model
            key = _text_type(config_class) or key
        aliases.setdefault(key, []).append(model_type)
        experts[key] = found
        if not wrapper or key not in causal_lm:
            causal_lm[key] = class_name
    return [DiscoveredFamily(key, tuple(sorted(set(types) | {key})), causal_lm[key], experts[key])
            for key, types in sorted(aliases.items())]


def _text_type(config_class) -> str | None:
    """The text sub-config's model type of a multimodal config class (``gemma4`` -> ``gemma4_text``)."""
    sub = getattr(config_class, "sub_configs", {}) or {}
    text = sub.get("text_config")
    return getattr(text, "model_type", None) if text is not None else None
