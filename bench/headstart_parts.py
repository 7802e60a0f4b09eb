"""Where does a release's expert head start live: in the routed experts' weights, or in the router?

The gate's ``expert_head_start`` compares the pruned copy (stolen experts and router) with the
``shared`` reference (both fresh) — docs/attacks-and-defenses.md §5.1. This bench splits that gap
on a real release and its verify: it runs the verify's label and distillation curves (its plan,
pruned shape, keep-set and seeds) from two more starting points,

* ``fresh_router``  — the stolen copy with only the router freshly initialised (the experts kept),
* ``fresh_experts`` — the stolen copy with only the routed experts freshly initialised (the router kept),

built by the model class's own initialiser (:func:`moeharden.attack.references.reinitialised_copy`),
and prints, per task and attack, every starting point's curve area (mean metric over the rungs)
over the seeds, with each one's head start over ``shared`` computed as the gate does it (the
strongest seed against the ``shared`` seeds' mean). The ``pruned`` and ``shared`` curves are the
verify's own. If the head start survives ``fresh_router`` and vanishes with ``fresh_experts``, it is
in the experts' weights (a defense must change what they compute); the other way round, it is in
the routing. Nothing in the attacker or the gate changes.

Run: .venv/bin/python bench/headstart_parts.py CKPT VERIFY_OR_SCAN_DIR [--workers 2] [--tasks ...] [--json OUT]
(CKPT: the released checkpoint VERIFY_DIR/verify.json attacked; 36 curves on the demo, ~10 min on 2 cores.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

PARTS = {"fresh_router": ("router",), "fresh_experts": ("experts",)}
_CTX = None


def _context(model, tok, tasks, keepsets, plan):
    from moeharden.attack.realign.ladder_suite import SuiteContext
    from moeharden.attack.references import reinitialised_copy

    class PartsContext(SuiteContext):
        """The verify's curve context, with the two partial references as starting points."""

        def start(self, reference: str, seed: int):
            if reference not in PARTS:
                return super().start(reference, seed)
            key = (reference, seed)
            if key not in self._refs:
                self._refs[key] = reinitialised_copy(self.model, PARTS[reference], seed=seed)[0]
            return self._refs[key]

    return PartsContext(model, tok, tasks, keepsets, plan)


def _init(ckpt: str, tasks, keepsets, plan) -> None:
    global _CTX
    import torch

    from moeharden.model.checkpoint import load_model, load_tokenizer

    torch.set_num_threads(1)
    _CTX = _context(load_model(Path(ckpt)), load_tokenizer(Path(ckpt)), tasks, keepsets, plan)


def _job(job):
    from moeharden.attack.realign.ladder_suite import run_job

    return run_job(_CTX, job)


def _table(curves: list[dict], tasks: list[str], full: dict, higher: dict) -> list[dict]:
    """Print and return, per task, attack and start, the curve areas and the head start over ``shared``."""
    from moeharden.attack.realign.headstart import curve_area

    rows = []
    print("\n| task | attack | start | area per seed | mean | head start over shared (gate: strongest seed − shared mean) |")
    print("|---|---|---|---|---|---|")
    for t in tasks:
        for attack in ("labels", "distill"):
            areas = {}
            for start in ("pruned", "fresh_router", "fresh_experts", "shared"):
                got = sorted((c["seed"], curve_area(c["points"], full[t], higher[t])) for c in curves
                             if c["task"] == t and c["attack"] == attack and c["reference"] == start)
                areas[start] = [a for _, a in got]
            ref = statistics.mean(areas["shared"])
            for start, vals in areas.items():
                hs = max(vals) - ref
                rows.append({"task": t, "attack": attack, "start": start, "areas": vals,
                             "mean": statistics.mean(vals), "head_start": hs})
                print(f"| {t} | {attack} | {start} | {' / '.join(f'{a:.3f}' for a in vals)} | "
                      f"{statistics.mean(vals):.3f} | {'—' if start == 'shared' else f'{hs:+.3f}'} |")
    return rows


def main() -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from moeharden.attack.realign.ladder_suite import CurveJob, plan_from_dict
    from moeharden.audit.documents import ScanDocument, load_document
    from moeharden.audit.ladder import strongest_keepset
    from moeharden.audit.verdict import VerifyDocument
    from moeharden.audit.verify import baseline_tasks

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("report", type=Path, help="a verify output directory (verify.json) of CKPT, or a scan "
                    "directory (scan.json) of CKPT (e.g. the undefended baseline)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", nargs="*", default=None, help="default: every task of the verify")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    if (args.report / "verify.json").exists():
        doc = load_document(args.report / "verify.json", VerifyDocument)
        attacked, base = doc.attack, load_document(Path(doc.baseline.path), ScanDocument)
    else:
        attacked = base = load_document(args.report / "scan.json", ScanDocument)
    lad = attacked.ladder
    plan = plan_from_dict(lad.settings)
    keeps = dict(lad.settings["keeps"])
    tasks = [t for t in baseline_tasks(args.ckpt, base) if args.tasks is None or t.name in args.tasks]
    keepsets = {t.name: strongest_keepset(attacked, t.name, keeps[t.name]) for t in tasks}
    frac = float(lad.settings["target_fraction"])
    full = {t.name: (lad.summary[t.name].target / frac if t.higher_is_better else lad.summary[t.name].target * frac)
            for t in tasks}
    higher = {t.name: t.higher_is_better for t in tasks}
    first = plan.strategies[0]
    jobs = [CurveJob(t.name, part, attack, first if attack == "labels" else "random", seed)
            for t in tasks for part in PARTS for attack in ("labels", "distill") for seed in plan.seeds]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn"), initializer=_init,
                             initargs=(str(args.ckpt), tasks, keepsets, plan)) as ex:
        ran = list(ex.map(_job, jobs))
    print(f"{len(ran)} curves in {time.perf_counter() - t0:.0f} s (verify's own pruned and shared curves reused)",
          flush=True)
    if args.json:                                      # the curves first: the table is cheap to redo from them
        args.json.write_text(json.dumps({"curves": ran}, indent=2) + "\n")

    # the verify's pruned curves of the first strategy only, so every start has the same seeds and strategy
    curves = [c for c in (r.to_json() for r in lad.curves) if c["reference"] in ("pruned", "shared")
              and (c["attack"] == "distill" or c["strategy"] == first)] + ran
    rows = _table(curves, [t.name for t in tasks], full, higher)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "curves": ran}, indent=2) + "\n")


if __name__ == "__main__":
    main()
