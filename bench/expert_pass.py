"""The routing record's expert pass at real width: one Qwen3-30B-A3B expert layer (128 experts,
hidden 2048, expert width 768, top-8, bf16) on 1,024 tokens.

Times, interleaved (median of 5): the model's own ``grouped_mm`` experts forward; the record's
pass that reads each pair's norm inside it (:func:`moeharden.model.routing._grouped_with_norms`);
and the general path it replaced for grouped_mm models (every (token, slot) pair repeated as its
own row through the experts module, then weighted and summed). Prints each ÷ the model's pass
(goal of the whole attribution pass ÷ a plain forward: ≤ 1.10, bench/scale.py) and checks that
the record's output equals the model's bit for bit.
Run: .venv/bin/python bench/expert_pass.py [TOKENS]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import transformers
from transformers.models.qwen3_moe import modeling_qwen3_moe as mq

from moeharden.model.routing import _grouped_with_norms, _row_norms


def main(argv: list[str]) -> int:
    torch.set_num_threads(2)
    T, k = (int(argv[0]) if argv else 1024), 8
    cfg = transformers.Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=128,
                                      num_experts_per_tok=k)
    cfg._experts_implementation = "grouped_mm"
    torch.manual_seed(0)
    ex = mq.Qwen3MoeExperts(cfg).to(torch.bfloat16)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.02)
    h = torch.randn(T, cfg.hidden_size, dtype=torch.bfloat16)
    idx = torch.stack([torch.randperm(cfg.num_experts)[:k] for _ in range(T)])
    w = torch.rand(T, k).softmax(-1)

    def general():
        pairs = h.repeat_interleave(k, dim=0)
        y = ex(pairs, idx.reshape(-1, 1), torch.ones((T * k, 1), dtype=w.dtype)).reshape(T * k, -1)
        n = _row_norms(y).reshape(T, k)
        y3, ww = y.view(T, k, -1), w.unsqueeze(-1)
        out = y3[:, 0] * ww[:, 0]
        for s in range(1, k):
            out = out + y3[:, s] * ww[:, s]
        return out, n

    fns = {"model's grouped_mm pass": lambda: ex(h, idx, w),
           "record, norms inside the pass": lambda: _grouped_with_norms(ex, h, idx, w),
           "record, general path (pairs again)": general}
    ts: dict[str, list[float]] = {n: [] for n in fns}
    with torch.no_grad():
        for f in fns.values():
            f()
        for _ in range(5):
            for name, f in fns.items():
                t0 = time.perf_counter()
                f()
                ts[name].append(time.perf_counter() - t0)
        same = torch.equal(ex(h, idx, w), _grouped_with_norms(ex, h, idx, w)[0].to(torch.bfloat16))
    base = statistics.median(ts["model's grouped_mm pass"])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {T} tokens x top-{k}")
    for name, t in ts.items():
        m = statistics.median(t)
        print(f"{name:38s} {m:7.3f} s   ÷ model's pass {m / base:5.3f}")
    print(f"record output equals the model's bit for bit: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
