"""Hiding experts on a loaded model, without copying weights (:func:`mask_experts`).

Inside each router's forward the router-logit projection gets ``-inf`` on masked experts, masked
entries of a selection bias become ``-inf``, and top-k is capped at the kept count (plus the null
experts, which stay routable). A masked expert is never selected, and the masked model computes
exactly what the physically pruned checkpoint computes (tests/test_prune.py, tests/test_discovery.py).
How tokens were routed is :mod:`moeharden.model.routing`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from moeharden.model.registry import MoELayer, get_path, moe_layers


class _MaskLogits(TorchFunctionMode):
    """Adds a ``[E]`` mask to the output of the router's logit projection (any F.linear to E outputs)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and isinstance(out, torch.Tensor) and out.shape[-1] == self.mask.numel():
            out = out + self.mask.to(device=out.device, dtype=out.dtype)
        return out


def _check_keep(layers: Sequence[MoELayer], keep: Mapping[int, Sequence[int]]) -> None:
    from moeharden.errors import KeepSetError

    by = {li.layer: li for li in layers}
    for layer, ids in keep.items():
        if layer not in by:
            raise KeepSetError(f"Layer {layer} is not an MoE layer (MoE layers: {sorted(by)}).")
        E = by[layer].num_experts
        if not ids or any(not 0 <= e < E for e in ids) or len(set(ids)) != len(ids):
            raise KeepSetError(f"Layer {layer}: keep-set {list(ids)} must be distinct ids in 0..{E - 1}, at least one.")


@contextmanager
def mask_experts(model, keep: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Hide every expert not in ``keep[layer]`` (layers absent from ``keep`` are untouched).

    Raises:
        KeepSetError: a layer that is not an MoE layer, or an invalid keep-set.
    """
    from moeharden.model.keepset import check_keep_counts

    layers = moe_layers(model)
    _check_keep(layers, keep)
    if layers:
        check_keep_counts(layers[0].spec, model.config, {int(k): list(v) for k, v in keep.items()}, balanced=False)
    restore: list = []
    try:
        for li in layers:
            if li.layer not in keep:
                continue
            kept = sorted(int(e) for e in keep[li.layer])
            m = torch.full((li.router_rows,), float("-inf"))
            m[kept] = 0.0
            m[li.num_experts:] = 0.0                                  # null experts (and shared gates) stay
            router = li.router
            orig_fwd = router.__dict__.get("forward")

            def fwd(*args, _orig=router.forward, _m=m, **kwargs):
                with _MaskLogits(_m):
                    return _orig(*args, **kwargs)

            router.forward = fwd
            restore.append(("forward", router, orig_fwd))
            if li.selection_bias is not None:
                sb = li.selection_bias
                saved = sb.detach().clone()
                with torch.no_grad():
                    sb.view(-1)[[e for e in range(li.num_experts) if e not in kept]] = float("-inf")
                restore.append(("bias", sb, saved))
            for path in li.spec.top_k_attrs:
                owner_path, _, attr = path.rpartition(".")
                owner = get_path(li.block, owner_path) if owner_path else li.block
                cur = getattr(owner, attr, None) if owner is not None else None
                if isinstance(cur, int) and cur > len(kept) + li.routable_null:
                    setattr(owner, attr, len(kept) + li.routable_null)
                    restore.append(("attr", (owner, attr), cur))
        yield
    finally:
        for kind, obj, val in reversed(restore):
            if kind == "forward":
                if val is None:
                    obj.__dict__.pop("forward", None)
                else:
                    obj.forward = val
            elif kind == "bias":
                with torch.no_grad():
                    obj.copy_(val)
            else:
                setattr(obj[0], obj[1], val)
