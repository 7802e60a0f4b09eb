"""A driver the two-process tests start with ``accelerate launch`` (and, for the reference, alone).

    python dist_driver.py spread OUT.json [fail]       every process: the spread of 10 jobs
    python dist_driver.py entangle CKPT OUT.safetensors CKPT_DIR STEPS [STOP_AFTER] [resume]
    python dist_driver.py scan CKPT OUT_DIR
    python dist_driver.py verify CKPT BASELINE OUT_DIR

Each mode calls the library the way the CLI does; the first process writes the outputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ENTANGLE = dict(batch_size=8, recompute_every=8, adversarial_swaps=2, checkpoint_every=1, subsets_per_step=1,
                lr=1e-3, recovery_term=True, recovery_steps=2, recovery_update="sgd", recovery_every=2)


def small_plan():
    from moeharden.attack.realign.ladder import LadderSettings
    from moeharden.attack.realign.ladder_suite import AttackPlan

    return AttackPlan(strategies=("random",), seeds=(0, 1), validation_size=16,
                      ladder=LadderSettings(rungs=(0, 16), prompt_rungs=(0, 32), lrs=(1e-3,), steps=(4, 8),
                                            batch_size=8, halving_every=0))


def _spread(out: Path, fail: bool) -> None:
    from moeharden.io.ranks import current, spread

    def job(i: int) -> dict:
        if fail and i == 3:
            raise ValueError("job 3 failed")
        return {"job": i, "square": i * i, "rank": current().rank}

    res = spread(list(range(10)), job)
    Path(f"{out}.{current().rank}").write_text(json.dumps(res))


def _entangle(ckpt: Path, out: Path, ckpt_dir: Path, steps: int, stop_after: int | None, resume: bool) -> None:
    from safetensors.torch import save_file

    from moeharden.defend.entangle.loop import entangle_model
    from moeharden.defend.entangle.recipe import EntangleRecipe
    from moeharden.io.ranks import current
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    model, tok = load_model(ckpt, device_map="cpu"), load_tokenizer(ckpt)
    tasks = load_tasks(None, checkpoint_dir=ckpt, limit=32)
    hist, _ = entangle_model(model, tok, tasks, EntangleRecipe(steps=steps, **ENTANGLE), ckpt_dir=ckpt_dir,
                             resume=resume, stop_after=stop_after)
    if current().main:
        save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out))
        out.with_suffix(".history.json").write_text(json.dumps(hist))


def _scan(ckpt: Path, out: Path) -> None:
    from moeharden.audit.scan import ScanSettings, scan

    scan(str(ckpt), out, settings=ScanSettings(limit=32, train_limit=96, keeps=(4, 2), random_seeds=2,
                                               recover=True, recover_budget=16, recover_seeds=2, ladder=True,
                                               plan=small_plan(), search=False,
                                               methods=("frequency", "reap", "gate")))


def _verify(ckpt: Path, baseline: Path, out: Path) -> None:
    from moeharden.audit.verify import VerifySettings, verify

    verify(str(ckpt), VerifySettings(baseline=baseline, out=out, modes=("full", "distill"), recover_steps=4))


if __name__ == "__main__":
    mode, *a = sys.argv[1:]
    if mode == "spread":
        _spread(Path(a[0]), fail=len(a) > 1)
    elif mode == "entangle":
        _entangle(Path(a[0]), Path(a[1]), Path(a[2]), int(a[3]), int(a[4]) if len(a) > 4 and a[4] != "-" else None,
                  resume=len(a) > 5)
    elif mode == "scan":
        _scan(Path(a[0]), Path(a[1]))
    elif mode == "verify":
        _verify(Path(a[0]), Path(a[1]), Path(a[2]))
    else:
        sys.exit(f"unknown mode {mode}")
    from moeharden.io.ranks import close

    close()                 # what the CLI does before exiting (see moeharden.cli.main)
