"""The demo defense at several recipe seeds, judged by the honest gate: seed × task × row, pass/fail.

The original demo model is scanned once (the demo's plan and split sizes); then for each seed the
shipped demo recipe (or ``--recipe``) entangles it with that seed on the owner's data (as the demo
does: :func:`moeharden.demo.build.write_owner_tasks`), the result is locked and
`verify` re-attacks it against the scan. Prints one table row per gate row (value, interval,
threshold, status) and a per-seed verdict, and writes the whole table as JSON (``--json``).

Run: .venv/bin/python bench/defense_seeds.py [--seeds 0 1 2 3 4] [--quick] [--recipe R.yaml]
     [--baseline SCAN_DIR] [--workers 2] [--json out.json] [--work DIR]
``--baseline`` reuses a scan of the demo model made with the same plan (e.g. ``demo-out/scan``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from importlib import resources
from pathlib import Path


def _row_key(r) -> str:
    parts = [r.check, r.task or "—"]
    if r.keep is not None:
        parts.append(f"K={r.keep}")
    if r.attack:
        parts.append(str(r.attack))
    return " ".join(parts)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v)
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def main() -> None:
    from moeharden.audit.scan import ScanSettings, scan
    from moeharden.audit.verify import VerifySettings, verify_attacks
    from moeharden.defend.entangle.command import EntangleSettings, entangle
    from moeharden.defend.lock import LockSettings, lock_checkpoint
    from moeharden.defend.signing import keygen
    from moeharden.demo.build import build_demo_model, write_owner_tasks
    from moeharden.demo.pipeline import DEMO_LIMIT, DEMO_QUICK_LIMIT, demo_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--quick", action="store_true", help="the quick plan (a smoke run, not a verdict)")
    ap.add_argument("--recipe", type=Path, default=None, help="entangle recipe (default: the demo's)")
    ap.add_argument("--baseline", type=Path, default=None, help="a scan directory of the demo model, same plan")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep every model and report here (default: a temp dir)")
    args = ap.parse_args()
    limit = DEMO_QUICK_LIMIT if args.quick else DEMO_LIMIT
    recipe = args.recipe or Path(str(resources.files("moeharden").joinpath("data/demo_entangle.yaml")))
    table: list[dict] = []
    verdicts: dict[int, bool] = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) if args.work is None else args.work
        root.mkdir(parents=True, exist_ok=True)
        model = root / "model" if (root / "model").is_dir() else build_demo_model(root / "model")
        base = args.baseline
        if base is None:
            t0 = time.perf_counter()
            scan(str(model), root / "scan", settings=ScanSettings(ladder=True, limit=limit, workers=args.workers,
                                                                   plan=demo_plan(args.quick)))
            print(f"baseline scan: {time.perf_counter() - t0:.0f} s", flush=True)
            base = root / "scan"
        if not (root / "keys").is_dir():
            keygen(out=root / "keys")
        for seed in args.seeds:
            t0 = time.perf_counter()
            ent, locked = root / f"ent-{seed}", root / f"locked-{seed}"
            owner = root / "owner-data" / "moeharden-tasks.yaml"
            if not owner.is_file():
                write_owner_tasks(owner.parent)
            entangle(ckpt=str(model), settings=EntangleSettings(out=ent, recipe_path=recipe, seed=seed,
                                                                tasks=(str(owner),)))
            t_ent = time.perf_counter() - t0
            policy = resources.files("moeharden").joinpath("data/policy-example.yaml")
            with resources.as_file(policy) as policy_path:
                lock_checkpoint(ckpt=str(ent), settings=LockSettings(out=locked, policy=policy_path,
                                                                     key=root / "keys" / "moeharden.key"))
            res = verify_attacks(ckpt=str(locked), baseline=base / "scan.json", out=root / f"verify-{seed}",
                                 settings=VerifySettings(pubkey=root / "keys" / "moeharden.pub",
                                                         workers=args.workers))
            verdicts[seed] = res.passed
            for r in res.data.gate:
                table.append({"seed": seed, "row": _row_key(r), "value": r.value, "lo": r.lo, "hi": r.hi,
                              "op": r.op, "threshold": r.threshold, "area": r.area, "status": r.status})
            print(f"seed {seed}: entangle {t_ent:.0f} s, total {time.perf_counter() - t0:.0f} s, "
                  f"gate {'PASSED' if res.passed else 'FAILED'}", flush=True)
    print(f"\nplan: {'quick' if args.quick else 'demo'}; recipe {recipe}; seeds {args.seeds}")
    print(f"{'seed':>4}  {'row':<46} {'value':>7} {'interval':>17} {'threshold':>14} {'area':>7}  status")
    for t in table:
        iv = "" if t["lo"] is None else f"[{_fmt(t['lo'])}, {_fmt(t['hi'])}]"
        print(f"{t['seed']:>4}  {t['row']:<46} {_fmt(t['value']):>7} {iv:>17} {t['op'] + ' ' + _fmt(t['threshold']):>14} "
              f"{_fmt(t['area']):>7}  {t['status']}")
    n_pass = sum(verdicts.values())
    print(f"\ngate passed at {n_pass} of {len(verdicts)} seeds: " +
          ", ".join(f"{s} {'pass' if v else 'FAIL'}" for s, v in verdicts.items()))
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "quick": args.quick, "recipe": str(recipe),
                                         "verdicts": verdicts, "rows": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
