"""The demo pipeline: embedded model → scan → entangle → lock → verify → before/after report.

This is what ``moeharden demo --out DIR`` runs on a fresh machine (:func:`run_demo`; the model
comes from :func:`moeharden.demo.build.build_demo_model`). Layout of ``DIR``::

    DIR/model/        the embedded demo MoE (cached; copied here)
    DIR/scan/         scan.json, report.md, report.html of the original
    DIR/owner-data/   the owner's training data entangle trains on (a task file: 4,096 rows per task
                      of the demo model's training pool; the checkpoint's own train split stands for
                      what an attacker buys)
    DIR/entangled/    the entangled checkpoint (+ entangle.json)
    DIR/keys/         a signing key pair (demo only): generated once, reused after, never deleted
    DIR/locked/       the entangled checkpoint with policy, manifest and signature
    DIR/verify/       verify.json and its report
    DIR/report.html   the before/after report (also report.md)

A demo stopped part-way (Ctrl-C, a crash, a closed laptop) and run again with the same ``DIR`` picks
up where it stopped: the scan's and verify's finished learning curves are journaled beside their
outputs (``DIR/.scan.ladder-journal``, ``DIR/.verify.ladder-journal``; :mod:`moeharden.io.journal`)
and entangle's training checkpoint (``DIR/.entangled.entangle-ckpt``) is resumed when the same run
wrote it. Each is kept until the whole pipeline is done, then removed; each is reused only for
the same weights, tasks, recipe and plan, so the result is the one an uninterrupted demo gives.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from moeharden import __version__
from moeharden.demo.build import build_demo_model, cache_root, read_stamp, write_owner_tasks
from moeharden.demo.synthetic import TASKS
from moeharden.demo.train import load_recipe
from moeharden.io.beside import Beside
from moeharden.io.threads import compute_threads


@dataclass
class PipelineResult:
    """Where everything went, the gate verdict, and how long each stage took (``seconds``: per stage;
    scan and entangle run at once, so ``scan_and_entangle`` is their joint wall time and ``total``
    the pipeline's)."""

    out: Path
    report: Path
    passed: bool
    failing: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "report": str(self.report), "passed": self.passed, "failing": self.failing,
                "seconds": self.seconds}


DEMO_LIMIT = 256     # attribution and evaluation examples per task in scan/verify: the task file's
                     # 256 evaluation rows (a 98% utility row cannot be certified on fewer; §5.3 of
                     # docs/attacks-and-defenses.md); the train split (the attacker's pool) is whole
DEMO_QUICK_LIMIT = 128
# ``--quick``: the shipped entangle recipe cut to this many steps (every term of it still runs), so the
# smoke run takes minutes; its release is not the demo's hardened one and its gate is no verdict.
DEMO_QUICK_ENTANGLE = {"steps": 200}
DEMO_WORKERS = 2     # the ladder's curves run in two processes (2 CPU cores)
ENTANGLE_THREADS = 1  # entangle's compute threads while it runs beside the scan (the demo model's tensors
                      # are a few KB: a second thread changes neither its speed nor its result)


def demo_plan(quick: bool = False):
    """The ladder plan of the demo: the library's default attacker (every learning rate, step count
    and rung of :class:`~moeharden.attack.realign.ladder.LadderSettings`, three seeds, all three
    references, label and distillation attacks) with the ``random`` strategy only (``kcenter``
    doubles the pruned copy's curves); ``quick``: a small ladder that exercises the whole pipeline
    in minutes — a smoke run, not a security verdict (the report says which plan ran)."""
    from moeharden.attack.realign.ladder import LadderSettings
    from moeharden.attack.realign.ladder_suite import AttackPlan

    if quick:
        return AttackPlan(strategies=("random",), validation_size=32,
                          ladder=LadderSettings(rungs=(0, 16, 64), prompt_rungs=(0, 64), steps=(10, 20)))
    return AttackPlan(strategies=("random",))


def run_pipeline(out: Path, model_dir: Path, *, entangle_overrides: dict | None = None,
                 limit: int | None = DEMO_LIMIT, workers: int = DEMO_WORKERS, plan=None) -> PipelineResult:
    """Run scan → entangle → lock → verify on ``model_dir``, writing into ``out`` (see module doc).

    ``limit`` caps the attribution and evaluation splits (seeded) in scan and verify; verify
    re-attacks with the baseline's settings and plan, so both see the same splits. ``plan``: the
    ladder's :class:`moeharden.attack.realign.ladder_suite.AttackPlan` (default: :func:`demo_plan`).
    """
    from moeharden.audit.report import render_verify
    from moeharden.audit.scan import ScanSettings, scan
    from moeharden.audit.verify import VerifySettings, describe_row, verify_attacks
    from moeharden.defend.entangle.command import EntangleSettings, entangle
    from moeharden.defend.entangle.resume import remove_checkpoint_dir
    from moeharden.defend.lock import LockSettings, lock_checkpoint
    from moeharden.defend.signing import keygen
    from moeharden.io.journal import journal_dir, remove_journal

    out = Path(out)
    secs: dict[str, float] = {}

    t_start = time.perf_counter()

    def stage(name, fn, **kw):
        t0 = time.perf_counter()
        r = fn(**kw)
        secs[name] = round(time.perf_counter() - t0, 1)
        return r

    # The release is trained beside the baseline scan: entangle reads only the original and the
    # owner's data, and on the demo model it runs as fast on one thread as on two, so the scan gets
    # the other core (measured: README, "Quick start"). Both run on one thread each meanwhile: with
    # more threads than free cores, OpenMP's threads wait on each other (with two, the scan's work
    # before its ladder took about 9 minutes beside entangle, against half a minute alone). The
    # ladder's workers run on one thread anyway.
    recipe = resources.files("moeharden").joinpath("data/demo_entangle.yaml")
    owner = write_owner_tasks(out / "owner-data")     # the owner's own training data (not the attacker's split)
    t_both = time.perf_counter()
    with resources.as_file(recipe) as recipe_path, Beside(
            entangle, threads=ENTANGLE_THREADS, ckpt=str(model_dir), settings=EntangleSettings(
                out=out / "entangled", tasks=(str(owner),), recipe_path=recipe_path, resume_if_same=True,
                keep_checkpoint=True, **(entangle_overrides or {}))) as beside, compute_threads(1):
        scan_res = stage("scan", scan, ckpt=str(model_dir), out=out / "scan", keep_journal=True,
                         settings=ScanSettings(ladder=True, limit=limit, workers=workers, plan=plan or demo_plan()))
        beside.result()
    secs["entangle"] = round(beside.seconds, 1)
    secs["scan_and_entangle"] = round(time.perf_counter() - t_both, 1)     # the two ran at once
    keys = out / "keys"
    if signing_keys_state(keys) == "none":
        stage("keygen", keygen, out=keys)
    policy = resources.files("moeharden").joinpath("data/policy-example.yaml")
    with resources.as_file(policy) as policy_path:
        stage("lock", lock_checkpoint, ckpt=str(out / "entangled"), settings=LockSettings(
            out=out / "locked", policy=policy_path, key=keys / "moeharden.key"))
    ver = stage("verify", verify_attacks, ckpt=str(out / "locked"), baseline=out / "scan" / "scan.json",
                out=out / "verify", keep_journal=True,
                settings=VerifySettings(pubkey=keys / "moeharden.pub", workers=workers))
    md, html_path = render_verify(scan_res.data, ver.data, out)
    for journal in (journal_dir(out / "scan", "ladder"), journal_dir(out / "verify", "ladder")):
        remove_journal(journal)           # every stage's output is in place: nothing left to resume
    remove_checkpoint_dir(out / ".entangled.entangle-ckpt")
    secs["total"] = round(time.perf_counter() - t_start, 1)
    return PipelineResult(out, html_path, ver.passed, [describe_row(r) for r in ver.failing()], secs)


def signing_keys_state(keys: Path) -> str:
    """Whether ``keys`` holds the demo's key pair: ``"pair"`` (reused: keys are never deleted) or
    ``"none"`` (generate one).

    Raises:
        InputError: ``keys`` is a file, or holds only one half of a pair.
    """
    from moeharden.defend.signing import PRIVATE_NAME, PUBLIC_NAME
    from moeharden.errors import InputError

    keys = Path(keys)
    if keys.exists() and not keys.is_dir():
        raise InputError(f"{keys} exists and is not a directory of signing keys.", hint="Choose another --out.")
    have = [(keys / n).is_file() for n in (PRIVATE_NAME, PUBLIC_NAME)]
    if all(have):
        return "pair"
    if any(have):
        raise InputError(f"{keys} holds only half of a key pair; refusing to replace it (keys are never deleted).",
                         hint="Restore the missing key, or choose another --out.")
    return "none"


@dataclass(frozen=True)
class DemoResult:
    """What ``moeharden demo`` did. ``to_dict()`` is the JSON form (the CLI renders it for people)."""

    out: Path
    model_dir: Path
    reused_cache: bool
    recipe_hash: str
    training: dict[str, Any]
    tasks: list[str] = field(default_factory=list)
    pipeline: PipelineResult | None = None          # unless model_only

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "moeharden.demo/1",
            "moeharden_version": __version__,
            "out": str(self.out),
            "model_dir": str(self.model_dir),
            "reused_cache": self.reused_cache,
            "recipe_hash": self.recipe_hash,
            "training": self.training,
            "tasks": self.tasks,
            "pipeline": None if self.pipeline is None else self.pipeline.to_dict(),
        }


def _check_resume_paths(out: Path) -> None:
    """Before any work: what the pipeline keeps beside its stages' outputs (the ladder journals and
    entangle's checkpoints) must be moeharden's, not a user's file, directory or link (otherwise
    the run would stop there, many minutes in).

    Raises:
        InputError: one of them is not moeharden's to use.
    """
    from moeharden.defend.entangle.resume import check_checkpoint_dir
    from moeharden.io.journal import check_journal_dir, journal_dir

    for stage in ("scan", "verify"):
        check_journal_dir(journal_dir(out / stage, "ladder"))
    check_checkpoint_dir(out / ".entangled.entangle-ckpt")


def run_demo(out: Path, retrain: bool = False, model_only: bool = False, quick: bool = False) -> DemoResult:
    """Build or reuse the demo model into ``out/model``, then run scan → entangle → lock → verify
    and write the before/after report to ``out/report.html`` (:func:`run_pipeline`).

    Args:
        out: output directory of the demo run.
        retrain: train the demo model again even if cached.
        model_only: stop after the model (no pipeline).
        quick: a small attack ladder (:func:`demo_plan`) and the entangle recipe cut to
            :data:`DEMO_QUICK_ENTANGLE`: the pipeline in minutes, not a verdict.

    Returns:
        A :class:`DemoResult`.

    Raises:
        InputError: ``out`` holds files, a ``model`` directory or half a key pair moeharden did not write.
        ConfigFileError, CheckpointError: see :func:`build_demo_model`.
    """
    from moeharden.io.outputs import check_output_dir, prepare_files_dir

    out = Path(out)
    # before any work: a user's DIR/model is never replaced, DIR/keys never deleted, and files
    # moeharden did not write (DIR/report.html, ...) never overwritten
    prepare_files_dir(out, ("report.md", "report.html"))
    check_output_dir(out / "model", kind="demo-model")
    if not model_only:
        signing_keys_state(out / "keys")
        _check_resume_paths(out)
    recipe = load_recipe()
    cached = not retrain and read_stamp(cache_root() / f"demo-{recipe.hash()}") is not None
    model_dir = build_demo_model(Path(out) / "model", retrain=retrain, recipe=recipe)
    stamp = read_stamp(model_dir) or {}
    pipeline = None if model_only else run_pipeline(
        Path(out), model_dir, plan=demo_plan(quick), limit=DEMO_QUICK_LIMIT if quick else DEMO_LIMIT,
        entangle_overrides=DEMO_QUICK_ENTANGLE if quick else None)
    return DemoResult(out=Path(out), model_dir=model_dir, reused_cache=cached, recipe_hash=recipe.hash(),
                      training=stamp.get("training", {}), tasks=list(TASKS), pipeline=pipeline)
