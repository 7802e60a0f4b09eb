"""`moeharden scan`: how much of each task survives when a thief keeps only the experts it uses?

Pipeline on one loaded model (never copied): evaluate the full model per task; one attribution
pass per task over its calibration split records the real routing (with expert output norms)
and yields every observation-based score; the loss-based ``ablation`` score masks one expert at
a time; then the pruning sweep evaluates each method's keep-set at every keep-count against a
seeded random control. ``scan.json`` (schema ``moeharden.scan/1``) is the source of truth;
``report.md`` and ``report.html`` are rendered from it. The document is a
:class:`~moeharden.audit.documents.ScanDocument`; the recovery sections come from the attack layer's
re-alignment suite and are validated into typed sections here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeharden.attack.attribution import (
    ALL_METHODS,
    OBSERVED_METHODS,
    ablation_scores,
    contrastive_scores,
    observed_scores,
    routing_stats,
)
from moeharden.attack.realign.ladder_suite import AttackPlan
from moeharden.attack.sweep import default_keeps, headline, run_sweep
from moeharden.audit.documents import (
    ModelIdentity,
    RecoverySections,
    ScanDocument,
    ScanSettingsRecord,
    SweepRecord,
    TaskHeadline,
    TaskRecord,
    stamp,
)
from moeharden.console import progress_bar
from moeharden.errors import UsageError

SMALL_MODEL_PARAMS = 100_000_000


@dataclass(frozen=True)
class ScanSettings:
    """Knobs of a scan. ``None`` means "the default" (decided here, not by truthiness)."""

    methods: tuple[str, ...] = ALL_METHODS
    keeps: tuple[int, ...] | None = None
    ranking: str = "per_layer"
    limit: int | None = None             # cap on the attribution and evaluation splits
    train_limit: int | None = None       # cap on the train split (the attacker's pool); None: all of it
    seed: int = 0
    random_seeds: int = 3
    batch_size: int = 32
    max_batch_tokens: int | None = None   # padded tokens per forward of the attribution pass; None: token_budget
    recover: bool | None = False         # the fixed-hyper-parameter suite of every mode × strategy (opt-in)
    recover_budget: int | None = None
    recover_seeds: int = 3
    ladder: bool | None = None           # the adaptive attack on the ladder; None: on for small models
    plan: AttackPlan | None = None       # None: AttackPlan() defaults
    search: bool = True                  # the attacker's searched keep-set in the sweep
    workers: int = 1                     # processes for the ladder's curves

    def validate(self) -> None:
        bad = [m for m in self.methods if m not in ALL_METHODS]
        if bad:
            raise UsageError(f"Unknown attribution method(s): {', '.join(bad)}.",
                             hint=f"Choose from: {', '.join(ALL_METHODS)}.")
        if self.ranking not in ("per_layer", "global"):
            raise UsageError(f"Unknown ranking {self.ranking!r}.", hint="Use per_layer or global.")
        if self.random_seeds < 1:
            raise UsageError("--random-seeds must be at least 1.")
        if self.workers < 1:
            raise UsageError("--workers must be at least 1.")
        if self.limit is not None and self.limit < 1:
            raise UsageError("--limit must be at least 1.")
        if self.batch_size < 1:
            raise UsageError("--batch-size must be at least 1.")
        if self.max_batch_tokens is not None and self.max_batch_tokens < 1:
            raise UsageError("--max-batch-tokens must be at least 1.")

    def attack_plan(self) -> AttackPlan:
        """The ladder's plan, with this scan's worker count."""
        from dataclasses import replace

        return replace(self.plan or AttackPlan(), workers=self.workers)


@dataclass
class ScanResult:
    """What `scan` returns: the scan document and where it was written."""

    data: ScanDocument
    out: Path | None = None
    paths: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out) if self.out else None,
                "headline": {k: v.to_json() for k, v in self.data.headline.items()}, "paths": self.paths}


def model_identity(path: Path, model, layer_info) -> ModelIdentity:
    """Family, expert count, top-k, config hash and weights digest of a loaded checkpoint."""
    from moeharden.model.checkpoint import checkpoint_digest, config_hash
    from moeharden.model.registry import spec_for_config

    spec = spec_for_config(model.config)
    return ModelIdentity(
        path=str(path), name=Path(path).name, family=spec.name, model_type=model.config.model_type,
        num_experts=layer_info[0].num_experts, top_k=layer_info[0].top_k,
        moe_layers=[li.layer for li in layer_info], config_sha256=config_hash(path),
        safetensors_digest=checkpoint_digest(path))


def scan_model(model, tokenizer, tasks, settings: ScanSettings, *, identity: ModelIdentity) -> ScanDocument:
    """Run attribution and the pruning sweep on a loaded model (no recovery sections).

    Args:
        model, tokenizer: the loaded checkpoint (masked, never copied).
        tasks: loaded task objects.
        settings: the scan's knobs.
        identity: the checkpoint's identity (:func:`model_identity`).
    Returns:
        the scan document.
    Raises:
        UsageError: unknown methods or ranking, or keep-counts this model cannot be pruned to.
    """
    from moeharden.attack.attribution import keep_sets
    from moeharden.attack.keepsearch import search_keepsets
    from moeharden.model.keepset import valid_keep
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers, routing_groups
    from moeharden.tasks.intervals import metric_interval
    from moeharden.tasks.metrics import evaluate, task_loss

    settings.validate()
    info = moe_layers(model)
    layers = [li.layer for li in info]
    E, top_k, spec = info[0].num_experts, info[0].top_k, info[0].spec
    groups = routing_groups(spec, model.config)
    if settings.keeps is not None:
        keeps = list(settings.keeps)
        bad = [k for k in keeps if k != E and not valid_keep(spec, model.config, k)]
        if bad:
            raise UsageError(f"Keep-counts {bad} cannot be pruned to on this {spec.name} model ({E} experts per layer"
                             + (f", {groups} routing groups" if groups > 1 else "") + ").",
                             hint=f"Use counts from {spec.min_keep} to {E}" + (f", multiples of {groups}." if groups > 1 else "."))
    else:
        keeps = [k for k in default_keeps(E, top_k) if k == E or valid_keep(spec, model.config, k)]
    timings: dict[str, float] = {}
    model.eval()

    t0 = time.perf_counter()
    full_iv = {t.name: metric_interval(evaluate(model, tokenizer, t)) for t in tasks}   # (value, lo, hi)
    full = {name: v[0] for name, v in full_iv.items()}
    timings["full_eval"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    stats = {t.name: routing_stats(model, tokenizer, t.calibration_texts(), layers, E, settings.batch_size,
                                   max_tokens=settings.max_batch_tokens or "auto") for t in tasks}
    timings["attribution_pass"] = time.perf_counter() - t0

    scores: dict[str, dict[str, torch.Tensor]] = {}
    for t in tasks:
        obs = observed_scores(stats[t.name])
        s = {m: obs[m] for m in OBSERVED_METHODS if m in settings.methods}
        if "contrastive" in settings.methods:
            s["contrastive"] = contrastive_scores(stats[t.name], [stats[o.name] for o in tasks if o.name != t.name])
        scores[t.name] = s

    if "ablation" in settings.methods:
        t0 = time.perf_counter()
        with progress_bar("ablation attribution", total=len(tasks) * len(layers) * E) as advance:
            for t in tasks:
                calib = t.attribution

                @torch.no_grad()
                def loss_with_mask(keep, calib=calib):
                    if keep is None:
                        return float(task_loss(model, tokenizer, calib))
                    with mask_experts(model, keep):
                        return float(task_loss(model, tokenizer, calib))

                scores[t.name]["ablation"] = ablation_scores(layers, E, loss_with_mask, progress=advance,
                                                             skip_invalid=True)
        timings["ablation"] = time.perf_counter() - t0

    searched: dict[str, dict] = {}
    if settings.search:
        t0 = time.perf_counter()
        for t in tasks:
            if not t.train:
                continue
            cands = {m: {k: keep_sets(scores[t.name][m], layers, k, ranking=settings.ranking, groups=groups)
                         for k in keeps if k < E} for m in scores[t.name]}
            best, _ = search_keepsets(model, tokenizer, t, layers, E, [k for k in keeps if k < E], cands,
                                      seed=settings.seed, groups=groups, spec=spec, config=model.config)
            searched[t.name] = {"search": best}
        timings["keep_search"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep_rows, keep_sets_used, heads = [], {}, {}
    n_cells = len(tasks) * len(keeps) * (len(settings.methods) + settings.random_seeds + int(bool(searched)))
    with progress_bar("pruning sweep", total=n_cells) as advance:
        for t in tasks:
            def evaluate_masked(keep, t=t):
                if keep is None:
                    return full_iv[t.name]
                with mask_experts(model, keep):
                    return metric_interval(evaluate(model, tokenizer, t))

            rows, used = run_sweep(
                task=t.name, metric=t.metric, full=full[t.name], chance=t.chance, layers=layers, num_experts=E,
                scores=scores[t.name], keeps=keeps, evaluate_masked=evaluate_masked, ranking=settings.ranking,
                random_seeds=tuple(range(settings.seed, settings.seed + settings.random_seeds)), groups=groups,
                progress=advance, full_interval=full_iv[t.name][1:], extra_keepsets=searched.get(t.name))
            sweep_rows += rows
            heads[t.name] = headline(rows, E)
            for m, per_k in used.items():
                keep_sets_used.setdefault(m, {})[t.name] = {
                    str(k): {str(layer): ids for layer, ids in ks.items()} for k, ks in per_k.items()}
    timings["sweep"] = time.perf_counter() - t0

    return ScanDocument(
        **stamp(), model=identity,
        settings=ScanSettingsRecord(methods=list(settings.methods), keeps=keeps, ranking=settings.ranking,
                                    limit=settings.limit, train_limit=settings.train_limit, seed=settings.seed,
                                    random_seeds=settings.random_seeds),
        tasks=[TaskRecord(name=t.name, kind=t.kind, metric=t.metric, full=round(full[t.name], 6),
                          full_lo=_round(full_iv[t.name][1]), full_hi=_round(full_iv[t.name][2]), chance=t.chance,
                          n_attribution=len(t.attribution), n_evaluation=len(t.evaluation),
                          option=t.option or None, examples_sha256=t.examples_sha256()) for t in tasks],
        # [L, E] score matrix per (method, task), rounded for the JSON
        attribution={m: {t.name: [[round(float(v), 6) for v in row] for row in scores[t.name][m].tolist()]
                         for t in tasks if m in scores[t.name]} for m in settings.methods},
        keep_sets=keep_sets_used,
        sweep=[SweepRecord.model_validate(r.to_dict()) for r in sweep_rows],
        headline={name: TaskHeadline.model_validate(h) for name, h in heads.items()},
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def limit_tasks(tasks, limit: int | None, train_limit: int | None) -> list:
    """Cap the attribution and evaluation splits at ``limit`` and the train split at ``train_limit``.

    A limit keeps a prefix of each seeded split, exactly as ``load_tasks(limit=...)`` does, so a
    limited split is a subset of the unlimited one; the attacker's pool keeps its own cap.
    """
    from dataclasses import replace

    cap = (lambda xs, n: list(xs) if n is None else list(xs)[:n])   # noqa: E731
    return [replace(t, attribution=cap(t.attribution, limit), evaluation=cap(t.evaluation, limit),
                    train=cap(t.train, train_limit)) for t in tasks]


def _round(v: float | None) -> float | None:
    return None if v is None or v != v else round(float(v), 6)      # NaN (no interval) → null


def recovery_sections(model, tokenizer, tasks, doc: ScanDocument, settings: ScanSettings) -> RecoverySections:
    """`scan --recover`: the attack layer's re-alignment suite on ``doc``, validated into typed sections."""
    from moeharden.attack.realign.suite import recovery_for_scan

    return RecoverySections.model_validate(recovery_for_scan(model, tokenizer, tasks, doc.to_json(), settings))


def ladder_journal(out: Path) -> Path | None:
    """Where a scan or verify writing ``out`` keeps its finished learning curves until ``out`` is
    written (``.<out>.ladder-journal`` beside it; :mod:`moeharden.io.journal`), checked now, before
    minutes of work; ``None`` under ``accelerate launch`` (its processes share the curves instead).

    Raises:
        InputError: something moeharden did not write is at that path.
    """
    from moeharden.io.journal import check_journal_dir, journal_dir
    from moeharden.io.ranks import current

    if current().size > 1:
        return None
    d = journal_dir(Path(out), "ladder")
    check_journal_dir(d)
    return d


def scan(ckpt: str, out: Path, *, tasks: Sequence[str] | None = None, settings: ScanSettings | None = None,
         lm_eval_include: Sequence[Path] | None = None, trust_remote_code: bool = False,
         keep_journal: bool = False) -> ScanResult:
    """Load a checkpoint, scan it, and write ``scan.json``, ``report.md`` and ``report.html`` to ``out``.

    The ladder's finished curves are journaled beside ``out`` (:func:`ladder_journal`): a scan
    interrupted and run again with the same inputs and ``out`` runs only the curves it had not
    finished, and writes what an uninterrupted scan writes.

    Args:
        ckpt: local directory or Hub repo id.
        tasks: task specs (preset names, task-file paths, ``lm-eval:NAME``); ``None`` = the
            checkpoint's own ``moeharden-tasks.yaml``.
        keep_journal: leave the journal after writing ``out`` (the demo removes it when the whole
            pipeline is done, so a demo stopped in a later stage does not run the scan's curves again).
    Raises:
        CheckpointError, UnsupportedModelError, TaskError, UsageError.
    """
    from moeharden.audit.report import render_scan
    from moeharden.io.journal import remove_journal
    from moeharden.io.outputs import atomic_output_dir
    from moeharden.io.ranks import current
    from moeharden.model.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.resolve import load_tasks

    settings = settings or ScanSettings()
    settings.validate()
    from moeharden.io.outputs import check_output_dir

    given = [t for t in (tasks or ()) if Path(t).exists()] + list(lm_eval_include or ())   # task files named
    check_output_dir(out, kind="scan", inputs=[ckpt, *given])  # fail now, not after minutes of work
    journal = ladder_journal(out)
    path = resolve_checkpoint(ckpt)
    # seed=None: each task file's own split seed stands (settings.seed drives the random controls)
    task_objs = limit_tasks(load_tasks(list(tasks) if tasks else None, checkpoint_dir=path, limit=None, seed=None,
                                       lm_eval_include=list(lm_eval_include) if lm_eval_include else None),
                            settings.limit, settings.train_limit)
    t0 = time.perf_counter()
    model = load_model(path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path)
    identity = model_identity(path, model, moe_layers(model))
    load_s = time.perf_counter() - t0
    doc = scan_model(model, tokenizer, task_objs, settings, identity=identity)
    doc.timings = {"load": round(load_s, 3), **doc.timings}
    n_params = sum(p.numel() for p in model.parameters())
    if settings.recover or (settings.recover is None and n_params <= SMALL_MODEL_PARAMS):
        doc = doc.with_recovery(recovery_sections(model, tokenizer, task_objs, doc, settings))
    if settings.ladder or (settings.ladder is None and n_params <= SMALL_MODEL_PARAMS):
        from moeharden.audit.ladder import ladder_for_document

        doc.ladder = ladder_for_document(model, tokenizer, task_objs, doc, settings.attack_plan(), checkpoint=path,
                                         trust_remote_code=trust_remote_code, journal_dir=journal)
    if not current().main:      # under `accelerate launch` the first process writes the (same) document
        return ScanResult(doc, None)
    with atomic_output_dir(out, kind="scan", inputs=[path]) as tmp:
        (tmp / "scan.json").write_text(json.dumps(doc.to_json(), indent=2) + "\n")
        render_scan(doc, tmp)
    if journal is not None and not keep_journal:
        remove_journal(journal)          # the output it served is in place
    return ScanResult(doc, Path(out), {"json": str(Path(out) / "scan.json"),
                                        "markdown": str(Path(out) / "report.md"),
                                        "html": str(Path(out) / "report.html")})
