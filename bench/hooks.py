"""Forward time with the routing record (with norms) and with an expert mask, ÷ the plain forward.

Goal: ≤ 1.10 for both. Measured on a demo-like Mixtral (hidden 96, 3 layers, 8 experts, top-2)
and on a wider one (hidden 512), batch 8 × 128 tokens, fp32 on CPU, one thread, median of
interleaved repeated runs (interleaving keeps load from other processes from biasing one variant).
Run: .venv/bin/python bench/hooks.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers
from moeharden.model.routing import record_routing


def _times(fns, reps=30):
    """Median seconds of each function, runs interleaved round-robin."""
    for fn in fns:
        fn()
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            ts[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in ts]


def bench(hidden: int, inter: int, layers: int, label: str) -> None:
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=256)
    model = MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 512, (8, 128))
    keep = {li.layer: [0, 2, 4, 6] for li in moe_layers(model)}

    @torch.no_grad()
    def plain():
        model(input_ids=ids)

    @torch.no_grad()
    def recorded():
        with record_routing(model, norms=True):
            model(input_ids=ids)

    @torch.no_grad()
    def recorded_no_probs():
        with record_routing(model, norms=True, probs=False):
            model(input_ids=ids)

    @torch.no_grad()
    def masked():
        with mask_experts(model, keep):
            model(input_ids=ids)

    t_plain, t_rec, t_rec_np, t_mask = _times([plain, recorded, recorded_no_probs, masked])
    print(f"{label}: plain {t_plain * 1e3:.1f} ms | record+norms+probs / plain = {t_rec / t_plain:.3f} "
          f"| record+norms / plain = {t_rec_np / t_plain:.3f} | mask / plain = {t_mask / t_plain:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(1)   # shared CPUs: more threads measure contention, not the hooks
    bench(96, 192, 3, "demo-like Mixtral (hidden 96, 3 layers)")
    bench(512, 1024, 2, "wider Mixtral (hidden 512, 2 layers)")
