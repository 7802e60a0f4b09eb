"""Forward time with the routing record (with norms) and with an expert mask, ÷ the plain forward.

Goal: ≤ 1.10 for both. Measured on the demo-sized Mixtral (hidden 64... as shipped) and on a
wider Mixtral (hidden 512), batch 8 × 128 tokens, fp32 on CPU, median of repeated runs.
Run: .venv/bin/python bench/hooks.py
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeharden.registry import moe_layers
from moeharden.routing import mask_experts, record_routing


def _time(fn, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


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
    def masked():
        with mask_experts(model, keep):
            model(input_ids=ids)

    t_plain = _time(plain)
    print(f"{label}: plain {t_plain * 1e3:.1f} ms | record+norms / plain = {_time(recorded) / t_plain:.3f} "
          f"| mask / plain = {_time(masked) / t_plain:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    bench(64, 128, 3, "demo-sized Mixtral (hidden 64, 3 layers)")
    bench(512, 1024, 2, "wider Mixtral (hidden 512, 2 layers)")
