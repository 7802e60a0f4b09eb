"""Self-check of a family adapter on a tiny random instance, before a checkpoint is rewritten.

``prune``, ``entangle`` and ``lock`` verify the family of the real checkpoint's config (through
:class:`moeharden.model.adapter_check.AdapterCheck`, which runs this check beside the command and
publishes nothing before it passes; :func:`ensure_adapter` runs it in place): a tiny model of the
same config class (:mod:`moeharden.model.tiny`) is built and the registry's adapter is verified
on it, so that an adapter a transformers upgrade silently broke refuses the checkpoint instead of
rewriting it wrongly:

1. **record vs the model's own output**: a forward under :func:`record_routing` (which recombines
   the experts from the recorded indices and weights) equals the plain forward, every MoE layer
   is recorded, and the recorded experts are the top-k of the recorded scores;
2. **masked ≡ pruned**: the tiny model is saved with ``save_pretrained``, pruned through the disk
   view (:func:`~moeharden.model.disk.classify_tensors`, :func:`~moeharden.model.disk.pruned_config`)
   and reloaded; its logits equal the masked model's (max-abs ≤ 1e-4).

Successful results are cached in memory and on disk (``$MOEHARDEN_CACHE/selfcheck/``, keyed by the
moeharden, transformers and torch versions, the registry entry, the tiny config and the family's
modeling file), so the check runs again after any of them changes and costs nothing otherwise;
a failure is never cached.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeharden.errors import UnsupportedModelError

TOL = 1e-4
_CACHE: dict[str, SelfCheckResult] = {}


@dataclass(frozen=True)
class SelfCheckResult:
    """Outcome of one self-check: ``ok``, the reason when not, and the largest differences seen."""

    family: str
    ok: bool
    reason: str = ""
    record_max_abs: float = 0.0
    prune_max_abs: float = 0.0
    seconds: float = 0.0


def ensure_adapter(config: Any) -> SelfCheckResult:
    """Run (or reuse) the self-check for ``config``'s family.

    Raises:
        UnsupportedModelError: unsupported or refused family, or the self-check failed (exit 3).
    """
    result = check_adapter(config)
    if not result.ok:
        raise failure_error(config, result)
    return result


def check_adapter(config: Any, *, seed: int = 0) -> SelfCheckResult:
    """Verify the registry adapter of ``config``'s family on a tiny random instance (cached).

    Raises:
        UnsupportedModelError: unsupported or refused family.
    """
    prepared = prepare_check(config, seed)
    if isinstance(prepared, SelfCheckResult):
        return prepared
    spec, tiny, key = prepared
    import time

    from moeharden.io.threads import compute_threads
    from moeharden.model.checkpoint import quiet_transformers

    t0 = time.perf_counter()
    try:
        with compute_threads(1), quiet_transformers():   # one thread: tensors of a few KB are ~10x faster than on several
            rec, pruned = _run_checks(tiny, seed)
        reason = ""
    except _CheckFailed as err:
        rec, pruned, reason = err.args[1], err.args[2], err.args[0]
    return remember(key, SelfCheckResult(spec.name, not reason, reason, rec, pruned, time.perf_counter() - t0))


def prepare_check(config: Any, seed: int):
    """``(spec, tiny config, cache key)`` of a check still to run, or the result (cached, or a tiny
    config the class refuses).

    Raises:
        UnsupportedModelError: unsupported or refused family.
    """
    from moeharden.model.registry import spec_for_config
    from moeharden.model.tiny import tiny_config

    spec = spec_for_config(config)
    text = getattr(config, "text_config", None)
    if text is not None and getattr(config, "model_type", None) != spec.model_types[0]:
        config = text                               # a multimodal wrapper: check its text model
    try:
        tiny = tiny_config(config, spec)
    except Exception as err:        # the config class refuses the shrunk values: nothing to run on
        return SelfCheckResult(spec.name, False, f"cannot build a tiny {type(config).__name__}: {err}")
    key = _cache_key(spec, tiny, seed)
    if key in _CACHE:
        return _CACHE[key]
    cached = _read_disk_cache(key)
    if cached is not None:
        _CACHE[key] = cached
        return cached
    return spec, tiny, key


def remember(key: str, result: SelfCheckResult) -> SelfCheckResult:
    """Cache a passed check (memory and disk); a failure is recomputed every time, also within one
    process, so that an environment fixed meanwhile (a patched modeling file) recovers."""
    if result.ok:
        _CACHE[key] = result
        _write_disk_cache(key, result)
    return result


def failure_error(config: Any, result: SelfCheckResult) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"Self-check of the {result.family} adapter failed on a tiny random {type(config).__name__} model: "
        f"{result.reason}. The real checkpoint was not touched.",
        hint="The installed transformers may route this family differently from moeharden's registry; "
             "pin the transformers version moeharden was tested with, or pass --skip-self-check if you "
             "know the adapter is right.")


def _cache_key(spec, tiny: Any, seed: int) -> str:
    """sha256 over what the outcome depends on: moeharden, transformers and torch versions, the
    registry entry, the tiny config, and the bytes of the family's modeling file (a patched or
    upgraded transformers is checked again) — found without importing it."""
    import hashlib
    import importlib.util

    import torch
    import transformers

    from moeharden import __version__

    h = hashlib.sha256()
    for part in (__version__, transformers.__version__, torch.__version__, repr(spec), str(seed),
                 f"{type(tiny).__module__}.{type(tiny).__name__}", json.dumps(tiny.to_dict(), sort_keys=True, default=str)):
        h.update(part.encode() + b"\0")
    try:
        origin = importlib.util.find_spec(type(tiny).__module__.replace(".configuration_", ".modeling_")).origin
        h.update(Path(origin).read_bytes())
    except (ImportError, AttributeError, TypeError, ValueError, OSError):
        h.update(b"no modeling file")
    return h.hexdigest()


def _cache_file(key: str) -> Path:
    """``selfcheck/<key>.json`` under :func:`moeharden.io.cache.cache_root`."""
    from moeharden.io.cache import cache_root

    return cache_root() / "selfcheck" / f"{key}.json"


def _read_disk_cache(key: str) -> SelfCheckResult | None:
    try:
        data = json.loads(_cache_file(key).read_text())
        return SelfCheckResult(str(data["family"]), True, "", float(data["record_max_abs"]),
                               float(data["prune_max_abs"]), float(data["seconds"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_disk_cache(key: str, result: SelfCheckResult) -> None:
    """Best effort and atomic (a temporary sibling renamed); a read-only cache is simply not used."""
    import os

    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"family": result.family, "record_max_abs": result.record_max_abs,
                                   "prune_max_abs": result.prune_max_abs, "seconds": result.seconds}))
        os.replace(tmp, path)
    except OSError:
        pass


class _CheckFailed(Exception):
    pass


def _inputs():
    import torch

    from moeharden.model.tiny import VOCAB

    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(11))


def _run_checks(config: Any, seed: int) -> tuple[float, float]:
    import torch

    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers
    from moeharden.model.routing import record_routing
    from moeharden.model.tiny import build_tiny_model

    try:
        model = build_tiny_model(config, seed=seed)
        layers = moe_layers(model)
    except UnsupportedModelError as err:
        raise _CheckFailed(err.message, 0.0, 0.0) from None
    except Exception as err:
        raise _CheckFailed(f"the tiny model does not build ({type(err).__name__}: {err})", 0.0, 0.0) from None
    ids = _inputs()
    try:
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with record_routing(model, norms=True) as rec:
                hooked = model(input_ids=ids).logits
    except Exception as err:
        raise _CheckFailed(f"a forward with the routing record fails ({type(err).__name__}: {err})", 0.0, 0.0) from None
    rec_diff = float((hooked - plain).abs().max())
    if rec_diff > TOL:
        raise _CheckFailed(f"recombining the experts from the recorded routing moves the logits by {rec_diff:.2e}",
                           rec_diff, 0.0)
    for li in layers:
        r = rec.layers.get(li.layer)
        if r is None or r.indices is None or r.indices.shape[1] != li.top_k:
            raise _CheckFailed(f"layer {li.layer}: the routing record is missing or has the wrong top-k", rec_diff, 0.0)
    keep = choose_keep(model, config, rec)
    with torch.no_grad(), mask_experts(model, keep), record_routing(model, norms=False) as masked_rec:
        masked = model(input_ids=ids).logits
    if float((masked - plain).abs().max()) <= 1e-3:
        raise _CheckFailed("hiding the most used experts does not change the logits (the mask is not applied)",
                           rec_diff, 0.0)
    for li in layers:
        hidden = set(range(li.num_experts)) - set(keep[li.layer])
        if set(masked_rec.layers[li.layer].indices.reshape(-1).tolist()) & hidden:
            raise _CheckFailed(f"layer {li.layer}: a masked expert was still selected", rec_diff, 0.0)
    with tempfile.TemporaryDirectory(prefix="moeharden-selfcheck-") as tmp:
        got = _pruned_logits(model, config, keep, Path(tmp), ids)
    diff = float((got - masked).abs().max())
    if diff > TOL:
        raise _CheckFailed(f"the physically pruned model differs from the masked one by {diff:.2e}", rec_diff, diff)
    return rec_diff, diff


def choose_keep(model, config, rec, kept: int = 4) -> dict[int, list[int]]:
    """Per MoE layer, ``kept`` experts (equally many per routing group), the least used in ``rec``, so
    that the mask removes experts the model was really using."""
    from moeharden.model.registry import moe_layers, routing_groups

    layers = moe_layers(model)
    G = routing_groups(layers[0].spec, config)
    keep = {}
    for li in layers:
        used = rec.layers[li.layer].indices.reshape(-1).bincount(minlength=li.num_experts)
        size = li.num_experts // G
        keep[li.layer] = sorted(e for g in range(G) for e in sorted(
            range(g * size, (g + 1) * size), key=lambda e: (int(used[e]), e))[: kept // G])
    return keep


def _pruned_logits(model, config, keep, tmp: Path, ids):
    """Save, prune through the disk view, reload; the pruned model's logits."""
    import torch
    from safetensors.torch import load_file, save_file

    from moeharden.model.disk import classify_tensors, pruned_config
    from moeharden.model.registry import spec_for_config

    spec = spec_for_config(config)
    model.save_pretrained(tmp / "src")
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted((tmp / "src").glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out: dict[str, torch.Tensor] = {}
    roles = classify_tensors(spec, config, {name: list(t.shape) for name, t in tensors.items()})
    for name, t in tensors.items():
        role = roles[name]
        if role is None or role.layer not in keep:
            out[name] = t
            continue
        ids_keep = keep[role.layer]
        if role.expert is not None:
            if role.expert in ids_keep:
                out[role.rename(name, ids_keep.index(role.expert))] = t
            continue
        out[name] = t.index_select(role.axis, torch.tensor(role.kept_rows(ids_keep, t.shape[role.axis]))).contiguous()
    (tmp / "out").mkdir()
    cfg = pruned_config(spec, json.loads((tmp / "src" / "config.json").read_text()), len(next(iter(keep.values()))))
    (tmp / "out" / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(tmp / "out" / "model.safetensors"), metadata={"format": "pt"})
    pruned = type(model).from_pretrained(tmp / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        return pruned(input_ids=ids).logits
