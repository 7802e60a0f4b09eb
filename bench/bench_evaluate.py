"""Batched task scoring vs a plain per-example loop (prints ratios measured in one run; not a test).

Multiple choice: ``choice_logprobs`` (left-padded batches, one forward per example when every
choice is a single token, only the answer positions' logits) against one unpadded forward per
(example, choice). Perplexity: batched sliding windows against one forward per window.
Run: ``.venv/bin/python bench/bench_evaluate.py [--data ../shared/data] [--n 128]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_lm import build_model, build_tokenizer  # noqa: E402

from moeharden.tasks.encoding import encode_pairs  # noqa: E402
from moeharden.tasks.metrics import choice_logprobs, perplexity, perplexity_windows  # noqa: E402
from moeharden.tasks.resolve import load_tasks  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


@torch.no_grad()
def _mc_loop(model, tok, exs):
    out = []
    for ex in exs:
        row = []
        for ctx, cont in encode_pairs(tok, [(ex.prompt, c) for c in ex.choices]):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont[:-1]])).logits[0].float(), -1)
            row.append(sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)))
        out.append(row)
    return torch.tensor(out)


@torch.no_grad()
def _ppl_loop(model, tok, texts, window, stride):
    nll, n = 0.0, 0
    for ids in tok(texts)["input_ids"]:
        for begin, end, k in perplexity_windows(len(ids), window, stride):
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids[begin:end - 1]])).logits[0].float(), -1)
            seq = ids[begin:end]
            nll -= sum(float(lp[p - 1, seq[p]]) for p in range(len(seq) - k, len(seq)))
            n += k
    return nll, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    model = build_model(tok, max_positions=512)
    (sst2,) = load_tasks([f"glue-sst2={args.data / 'glue/sst2_validation.jsonl'}"], limit=args.n)
    exs = sst2.evaluation
    batched, tb = _timed(lambda: choice_logprobs(model, tok, exs, batch_size=32))
    looped, tl = _timed(lambda: _mc_loop(model, tok, exs))
    assert torch.allclose(batched, looped, atol=1e-3)
    print(f"multiple choice, {len(exs)} SST-2 examples: batched {tb:.2f}s, loop {tl:.2f}s, speed-up {tl / tb:.1f}x")

    (wt,) = load_tasks([f"wikitext2={args.data / 'wikitext-2/test.txt'}"], limit=2)
    texts = [ex.target for ex in wt.evaluation]
    r, tb = _timed(lambda: perplexity(model, tok, texts, window=256, stride=128, batch_size=8))
    (nll, n), tl = _timed(lambda: _ppl_loop(model, tok, texts, 256, 128))
    assert n == r["tokens"] and abs(nll - r["nll"]) / nll < 1e-4
    print(f"perplexity, {r['tokens']} WikiText-2 tokens: batched {tb:.2f}s, loop {tl:.2f}s, speed-up {tl / tb:.1f}x")


if __name__ == "__main__":
    main()
