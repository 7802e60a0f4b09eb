"""The routing record's expert pass at real width: one expert layer of Qwen3-30B-A3B (128 experts,
hidden 2048, expert width 768, top-8) and of OLMoE-1B-7B (64 experts, hidden 2048, width 1024,
top-8), bf16, on 2,048 tokens (scan's smallest token budget per forward) by default.

Times, interleaved (median of 5): the model's own ``grouped_mm`` experts forward; the record's
pass that reads each pair's norm inside it (:func:`moeharden.model.routing._grouped_with_norms`),
weighting and summing the k slots 64 tokens at a time; the same pass 256 tokens at a time (before
stop 29: a [256·k, H] float32 product, 16 MB at hidden 2048, streams through memory); and the
general path it replaced for grouped_mm models (every (token, slot) pair repeated as its own row
through the experts module, then weighted and summed). Prints each ÷ the model's pass (goal of the
whole attribution pass ÷ a plain forward: ≤ 1.10, bench/scale.py) and checks that the record's
output equals the model's bit for bit.
Run: .venv/bin/python bench/expert_pass.py [TOKENS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import transformers
from transformers.models.olmoe import modeling_olmoe as mo
from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

from moeharden.model import routing

LAYERS = {
    "Qwen3-30B-A3B": lambda: mq.Qwen3MoeExperts(transformers.Qwen3MoeConfig(
        hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8)),
    "OLMoE-1B-7B": lambda: mo.OlmoeExperts(transformers.OlmoeConfig(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8)),
}


def _time(name: str, build, T: int) -> None:
    torch.manual_seed(0)
    ex = build().to(torch.bfloat16)
    ex.config._experts_implementation = "grouped_mm"
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    k, E, H = ex.config.num_experts_per_tok, ex.num_experts, ex.config.hidden_size
    h = torch.randn(T, H, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
    w = torch.rand(T, k).softmax(-1)

    def chunks_of_256():
        now = routing._TOKENS_PER_SUM
        routing._TOKENS_PER_SUM = 256
        try:
            return routing._grouped_with_norms(ex, h, idx, w)
        finally:
            routing._TOKENS_PER_SUM = now

    def general():
        pairs = h.repeat_interleave(k, dim=0)
        y = ex(pairs, idx.reshape(-1, 1), torch.ones((T * k, 1), dtype=w.dtype)).reshape(T * k, -1)
        n = routing._row_norms(y).reshape(T, k)
        y3, ww = y.view(T, k, -1), w.unsqueeze(-1)
        out = y3[:, 0] * ww[:, 0]
        for s in range(1, k):
            out = out + y3[:, s] * ww[:, s]
        return out, n

    fns = {"model's grouped_mm pass": lambda: ex(h, idx, w),
           f"record, {routing._TOKENS_PER_SUM} tokens per sum (now)": lambda: routing._grouped_with_norms(ex, h, idx, w),
           "record, 256 tokens per sum (before)": chunks_of_256,
           "record, general path (pairs again)": general}
    ts: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(5):
            for n, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[n].append(time.perf_counter() - t0)
        plain = ex(h, idx, w)
        same = torch.equal(plain, routing._grouped_with_norms(ex, h, idx, w)[0].to(torch.bfloat16))
        same_before = torch.equal(plain, chunks_of_256()[0].to(torch.bfloat16))
    base = statistics.median(ts["model's grouped_mm pass"])
    print(f"{name} expert layer, {T} tokens x top-{k}")
    for n, t in ts.items():
        m = statistics.median(t)
        print(f"  {n:36s} {m:7.3f} s   ÷ model's pass {m / base:5.3f}")
    print(f"  record output equals the model's bit for bit: now {same}, before {same_before}")


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    T = int(argv[0]) if argv else 2048
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    for name, build in LAYERS.items():
        _time(name, build, T)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
