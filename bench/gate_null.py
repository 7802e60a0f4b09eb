"""The gate's expert-head-start rows at the physical limit: how often do they fail a pruned copy that
is, by construction, no better a start than the `shared` reference?

A weight-level defense has done all it can when the pruned copy is no better a starting point than
the release's shared weights with fresh experts (docs/attacks-and-defenses.md §5.1). This bench
puts the gate's ``expert_head_start`` rows at exactly that point, on a real release: it runs only
`shared`-reference curves of the release (the verify's plan, pruned shape and keep-set), with many
seeds, and forms *null trials*: in each, a group of `shared` curves plays the ``pruned`` copy — with
every label strategy of the plan and the plan's seed count, as the attacker gets — and a disjoint
group plays ``shared`` (the plan's seeds, the first strategy), and the row is computed by the same
code as verify (:func:`moeharden.attack.realign.headstart.summarize`, the gate's thresholds from
``--gate`` or the default gate file). Every way of splitting the curves into disjoint groups is a
trial; the printed failure rate is the mean over trials (an unbiased estimate of the chance that
the row fails a defense at the limit; trials share curves, so it is not a binomial count).
Nothing in the gate or the attacker is changed: this measures the rows as they are. The computation
is the library's (:mod:`moeharden.audit.gate_null`), which `moeharden verify --null-seeds N` runs
within a verify; this bench runs it afterwards on an existing verify output.

Run: .venv/bin/python bench/gate_null.py CKPT VERIFY_DIR [--seeds 9] [--workers 2] [--json OUT]
(CKPT: the released checkpoint that VERIFY_DIR/verify.json attacked; ~72 curves on the demo.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from moeharden.attack.realign.ladder_suite import plan_from_dict, run_curve_jobs
    from moeharden.audit.documents import ScanDocument, load_document
    from moeharden.audit.gate import load_gate
    from moeharden.audit.gate_null import null_jobs, null_rows
    from moeharden.audit.ladder import strongest_keepset
    from moeharden.audit.verdict import VerifyDocument
    from moeharden.audit.verify import baseline_tasks
    from moeharden.model.checkpoint import load_model, load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("verify", type=Path, help="a verify output directory (verify.json) of CKPT")
    ap.add_argument("--seeds", type=int, default=9, help="shared curves per task, attack and first strategy")
    ap.add_argument("--gate", type=Path, default=None, help="a gate file (default: the one the verify applied)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    doc = load_document(args.verify / "verify.json", VerifyDocument)
    base = load_document(Path(doc.baseline.path), ScanDocument)
    gate = load_gate(args.gate) if args.gate else doc.gate_settings     # the gate that verify applied
    lad = doc.attack.ladder
    plan = plan_from_dict(lad.settings, workers=args.workers)
    n, strategies = len(plan.seeds), tuple(plan.strategies)
    if args.seeds < 2 * n:
        raise SystemExit(f"--seeds must be at least {2 * n} (two disjoint groups of the plan's {n} seeds)")
    keeps = dict(lad.settings["keeps"])
    tasks = baseline_tasks(args.ckpt, base)
    keepsets = {t.name: strongest_keepset(doc.attack, t.name, keeps[t.name]) for t in tasks}
    frac = float(lad.settings["target_fraction"])
    full = {t.name: (lad.summary[t.name].target / frac if t.higher_is_better else lad.summary[t.name].target * frac)
            for t in tasks}
    higher = {t.name: t.higher_is_better for t in tasks}
    measured = {(name, attack): a.expert_head_start.area for name, sm in lad.summary.items()
                for attack, a in sm.attacks.items() if a.expert_head_start is not None}
    jobs = null_jobs([t.name for t in tasks], plan, args.seeds)
    model, tok = load_model(args.ckpt), load_tokenizer(args.ckpt)
    t0 = time.perf_counter()
    ran = run_curve_jobs(model, tok, tasks, keepsets, plan, jobs, checkpoint=args.ckpt)
    print(f"{len(ran)} shared curves in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = null_rows(ran, plan=plan, gate=gate, full=full, higher=higher, target_fraction=frac, measured=measured)
    print(f"\nexpert_head_start at the physical limit (pruned ≡ shared): {args.seeds} seeds per curve kind, "
          f"plan of {n} seeds, strategies {list(strategies)}; thresholds: labels ratio ≥ "
          f"{gate.expert_head_start_min_labels_ratio}, area ≤ {gate.expert_head_start_max_area}")
    print("| task | attack | trials | row fails | area: median / max | labels ratio: median / share below |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        rm = "—" if r["ratio_median"] is None else f"{r['ratio_median']:.2f}"
        print(f"| {r['task']} | {r['attack']} | {r['trials']} | {r['fail_rate']:.0%} | {r['area_median']:+.3f} / "
              f"{r['area_max']:+.3f} | {rm} / {r['ratio_below']:.0%} |")
    p_all = 1.0
    for r in rows:
        p_all *= 1 - r["fail_rate"]
    print(f"\nall {len(rows)} rows pass together, if the rows were independent: {p_all:.0%}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "curves": ran, "seeds": args.seeds}, indent=2) + "\n")


if __name__ == "__main__":
    main()
