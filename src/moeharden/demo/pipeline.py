"""The demo pipeline: embedded model → scan → entangle → lock → verify → before/after report.

This is what ``moeharden demo --out DIR`` runs on a fresh machine. Layout of ``DIR``::

    DIR/model/        the embedded demo MoE (cached; copied here)
    DIR/scan/         scan.json, report.md, report.html of the original
    DIR/entangled/    the entangled checkpoint (+ entangle.json)
    DIR/keys/         a freshly generated signing key pair (demo only)
    DIR/locked/       the entangled checkpoint with policy, manifest and signature
    DIR/verify/       verify.json and its report
    DIR/report.html   the before/after report (also report.md)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass
class PipelineResult:
    """Where everything went, the gate verdict, and how long each stage took."""

    out: Path
    report: Path
    passed: bool
    failing: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "report": str(self.report), "passed": self.passed, "failing": self.failing,
                "seconds": self.seconds}

    def summary(self) -> str:
        verdict = "[green]PASSED[/]" if self.passed else "[red]FAILED[/]"
        lines = [f"Demo pipeline finished in {sum(self.seconds.values()):.0f} s; release gate {verdict}."]
        lines += [f"  [red]FAIL[/] {r}" for r in self.failing]
        lines.append(f"Before/after report: {self.report}")
        return "\n".join(lines)


DEMO_LIMIT = 128   # examples per split in scan/verify: keeps the 15-minute budget on 2 CPU cores


def run_pipeline(out: Path, model_dir: Path, *, entangle_overrides: dict | None = None,
                 recover_budget: int | None = None, limit: int | None = DEMO_LIMIT) -> PipelineResult:
    """Run scan → entangle → lock → verify on ``model_dir``, writing into ``out`` (see module doc).

    ``limit`` caps each task split (seeded) in scan and verify; verify re-attacks with the
    baseline's settings, so both see the same splits.
    """
    from moeharden.audit.report import render_verify
    from moeharden.audit.scan import ScanSettings, scan
    from moeharden.audit.verify import describe_row, verify_attacks
    from moeharden.defend.entangle import entangle
    from moeharden.defend.lock import lock_checkpoint
    from moeharden.defend.signing import keygen

    out = Path(out)
    secs: dict[str, float] = {}

    def stage(name, fn, **kw):
        t0 = time.perf_counter()
        r = fn(**kw)
        secs[name] = round(time.perf_counter() - t0, 1)
        return r

    scan_res = stage("scan", scan, ckpt=str(model_dir), out=out / "scan",
                     settings=ScanSettings(recover=True, recover_budget=recover_budget, limit=limit))
    recipe = resources.files("moeharden").joinpath("data/demo_entangle.yaml")
    with resources.as_file(recipe) as recipe_path:
        stage("entangle", entangle, ckpt=str(model_dir), out=out / "entangled", recipe_path=recipe_path,
              overrides=entangle_overrides or {})
    keys = out / "keys"
    if (keys / "moeharden.key").exists():
        shutil.rmtree(keys)
    stage("keygen", keygen, out=keys)
    policy = resources.files("moeharden").joinpath("data/policy-example.yaml")
    with resources.as_file(policy) as policy_path:
        stage("lock", lock_checkpoint, ckpt=str(out / "entangled"), policy=policy_path,
              key=keys / "moeharden.key", out=out / "locked")
    ver = stage("verify", verify_attacks, ckpt=str(out / "locked"), baseline=out / "scan" / "scan.json",
                out=out / "verify", pubkey=keys / "moeharden.pub", raise_on_fail=False)
    md, html_path = render_verify(scan_res.data, ver.data, out)
    return PipelineResult(out, html_path, ver.passed, [describe_row(r) for r in ver.failing()], secs)
