"""Scan costs on the demo model: the attribution pass ÷ a plain forward over the same tokens
(goal ≤ 1.15), and peak RSS ÷ the model's weight bytes (goal ≤ 1.5; reported raw and above the
interpreter + torch + transformers import baseline, both measured in child processes).
Run: .venv/bin/python bench/scan.py [DEMO_MODEL_DIR]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_SCAN = """
import resource, sys
from pathlib import Path
from moeharden.audit.scan import ScanSettings, scan
scan(sys.argv[1], Path(sys.argv[2]), settings=ScanSettings(recover=False))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHILD_BASE = """
import resource
import torch, transformers, moeharden.audit.scan, moeharden.tasks.metrics, moeharden.tasks.resolve, matplotlib.pyplot
from transformers import MixtralForCausalLM
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def attribution_ratio(model_dir: Path) -> None:
    import torch

    from moeharden.attack.attribution import routing_stats
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.resolve import load_tasks

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    tasks = load_tasks(None, checkpoint_dir=model_dir)
    texts = [x for t in tasks for x in t.calibration_texts()]
    info = moe_layers(model)
    layers, E = [li.layer for li in info], info[0].num_experts

    @torch.no_grad()
    def plain():
        for i in range(0, len(texts), 32):
            enc = tok(texts[i:i + 32], return_tensors="pt", padding=True)
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])

    def attributed():
        routing_stats(model, tok, texts, layers, E, batch_size=32)

    def med(fn, reps=5):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    tp, ta = med(plain), med(attributed)
    print(f"attribution pass ÷ plain forward over the same {len(texts)} texts: {ta / tp:.3f} "
          f"({ta * 1e3:.0f} ms vs {tp * 1e3:.0f} ms)  (goal ≤ 1.15)")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    import torch

    torch.set_num_threads(2)
    if len(sys.argv) > 1:
        model_dir = Path(sys.argv[1])
    else:
        from moeharden.demo.build import build_demo_model

        model_dir = build_demo_model(Path(tempfile.mkdtemp(prefix="moeharden-bench-")) / "model")
    weight_bytes = attribution_ratio(model_dir)
    base_kb = int(subprocess.run([sys.executable, "-c", CHILD_BASE], capture_output=True, text=True).stdout.split()[-1])
    out = Path(tempfile.mkdtemp(prefix="moeharden-scan-")) / "scan"
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", CHILD_SCAN, str(model_dir), str(out)], capture_output=True, text=True,
                         check=True)
    secs = time.perf_counter() - t0
    peak_kb = int(res.stdout.split()[-1])
    print(f"whole scan (no recovery) {secs:.1f} s; weights {weight_bytes / 1e6:.2f} MB; peak RSS {peak_kb / 1024:.0f} MB, "
          f"import baseline {base_kb / 1024:.0f} MB")
    print(f"peak RSS ÷ weight bytes: raw {peak_kb * 1024 / weight_bytes:.1f}; above the import baseline "
          f"{(peak_kb - base_kb) * 1024 / weight_bytes:.2f}  (goal ≤ 1.5)")


if __name__ == "__main__":
    main()
