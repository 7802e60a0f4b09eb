"""Cost of the honest verify on the demo model, as a ratio to the old one, measured in one run.

old: the sweep + the fixed-hyper-parameter re-alignment suite (every mode × strategy, budget 64,
3 seeds) — what `verify` ran before the ladder; new: the sweep + searched keep-sets + the adaptive
ladder with its references (the demo's plan, `demo.pipeline.demo_plan()`), with `--workers`.
Both verify the demo model against its own scan, at the demo's split sizes.

Run: .venv/bin/python bench/verify_cost.py [--quick] [--workers N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _timed(fn, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(**kw)
    return time.perf_counter() - t0, out


def main() -> None:
    from moeharden.audit.scan import ScanSettings, scan
    from moeharden.audit.verify import VerifySettings, verify_attacks
    from moeharden.demo.build import build_demo_model
    from moeharden.demo.pipeline import DEMO_LIMIT, DEMO_QUICK_LIMIT, demo_plan

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the quick plan (demo --quick)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    limit = DEMO_QUICK_LIMIT if args.quick else DEMO_LIMIT
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model = build_demo_model(root / "model")
        old_scan = ScanSettings(limit=limit, recover=True, ladder=False, search=False)
        new_scan = ScanSettings(limit=limit, ladder=True, plan=demo_plan(args.quick), workers=args.workers)
        s_old, _ = _timed(scan, ckpt=str(model), out=root / "scan-old", settings=old_scan)
        s_new, _ = _timed(scan, ckpt=str(model), out=root / "scan-new", settings=new_scan)
        v_old, _ = _timed(verify_attacks, ckpt=str(model), baseline=root / "scan-old" / "scan.json",
                          out=root / "verify-old", settings=VerifySettings())
        v_new, res = _timed(verify_attacks, ckpt=str(model), baseline=root / "scan-new" / "scan.json",
                            out=root / "verify-new", settings=VerifySettings(workers=args.workers))
    print(f"plan: {'quick' if args.quick else 'demo'}; workers {args.workers}; limit {limit}")
    print(f"{'stage':<8} {'old s':>8} {'new s':>8} {'new ÷ old':>10}")
    print(f"{'scan':<8} {s_old:8.1f} {s_new:8.1f} {s_new / s_old:10.2f}")
    print(f"{'verify':<8} {v_old:8.1f} {v_new:8.1f} {v_new / v_old:10.2f}")
    print(f"ladder curves in the new verify: {len(res.data.attack.ladder.curves)} "
          f"(scratch reused: {res.data.attack.ladder.reused_scratch})")


if __name__ == "__main__":
    main()
