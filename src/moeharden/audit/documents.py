"""The typed report documents: ``scan.json`` and ``verify.json`` (and the gate they are judged by).

Every report is a pydantic model with a versioned ``schema`` string; producers in :mod:`moeharden.audit`
build these models, consumers (gate, verify, report, the CLI) read their attributes, and reading one
from disk validates it (:func:`load_document`): a wrong or hostile JSON is an :class:`InputError`
(exit 3) with a one-paragraph message, never a ``KeyError``. The on-disk field names are those of the
JSON files; ``docs/report-fields.md`` is generated from these models (``moeharden schema --markdown``).
The side documents of other commands (prune record, entangle.json, manifest) are in
:mod:`moeharden.audit.records`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from pydantic import Field, ValidationError

from moeharden.audit.base import Record, ToolInfo, stamp  # noqa: F401  (re-exported for the documents' users)
from moeharden.audit.ladder_records import LadderSection
from moeharden.errors import InputError, IntegrityError, MoehardenError, validation_problems
from moeharden.io.files import MAX_DOCUMENT, parse_json, read_small_text

SCAN_SCHEMA = "moeharden.scan/1"
VERIFY_SCHEMA = "moeharden.verify/1"
MAX_PROBLEMS_SHOWN = 8


class ModelIdentity(Record):
    """Identity of a loaded checkpoint."""

    path: str = Field(description="The resolved local checkpoint directory.")
    name: str = Field(description="The directory's name.")
    family: str = Field(description="Registry family name (e.g. `Mixtral`, `Qwen3-MoE`).")
    model_type: str = Field(description="`config.json`'s `model_type`.")
    num_experts: int = Field(ge=1, description="Routed experts per MoE layer (E).")
    top_k: int = Field(ge=1, description="Experts selected per token (k).")
    moe_layers: list[int] = Field(description="Decoder-layer indices of the MoE layers (dense layers are absent).")
    config_sha256: str = Field(description="sha256 of `config.json` in canonical form (sorted keys).")
    safetensors_digest: str = Field(description="sha256 over each safetensors file's name, size and header "
                                                "(layout, not tensor data; the `lock` manifest hashes the data).")


class ScanSettingsRecord(Record):
    """How a scan ran."""

    methods: list[str] = Field(description="Attribution methods run.")
    keeps: list[int] = Field(description="Keep-counts swept, descending.")
    ranking: Literal["per_layer", "global"] = Field(description="Keep-set ranking: per layer or global.")
    limit: int | None = Field(description="Examples per attribution and evaluation split (a prefix of the seeded "
                                          "split), or null for all.")
    train_limit: int | None = Field(None, description="Examples of the train split (the attacker's pool), or null "
                                                      "for all.")
    seed: int = Field(description="First seed of the random-keep control.")
    random_seeds: int = Field(ge=1, description="How many random keep-sets per K.")


class TaskRecord(Record):
    """One task of a scan and the full model's score on it."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"full_lo", "full_hi", "option", "examples_sha256"})
    name: str = Field(description="Task name.")
    kind: str = Field(description="`multiple_choice`, `generation`, `perplexity` or `lm_eval`.")
    metric: str = Field(description="`accuracy`, `exact_match`, `rouge1`, `rouge2`, `rougeL`, `perplexity`, "
                                    "or lm-eval's.")
    full: float = Field(description="The full model's metric on the evaluation split.")
    full_lo: float | None = Field(None, description="Lower end of the full metric's 95% interval (Wilson for "
                                                    "accuracy and exact match; bootstrap for perplexity and ROUGE).")
    full_hi: float | None = Field(None, description="Upper end of the full metric's 95% interval.")
    chance: float | None = Field(description="Metric of a random guesser, or null.")
    n_attribution: int = Field(ge=0, description="Attribution (calibration) split size used.")
    n_evaluation: int = Field(ge=0, description="Evaluation split size used.")
    option: str | None = Field(None, description="The `--task` value that loads this task again (absolute paths; "
                                                 "absent for the checkpoint's own `moeharden-tasks.yaml`): what "
                                                 "`verify --task` needs when the hardened checkpoint does not carry it.")
    examples_sha256: str | None = Field(None, description="SHA-256 over the task's name, kind, metric and every "
                                                          "example of its three splits as scanned: `verify` refuses "
                                                          "to compare against a baseline whose task differs.")


class SweepRecord(Record):
    """One evaluated (task, method, K) cell of the pruning sweep."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset(
        {"seeds", "std", "pruned_lo", "pruned_hi", "retained_hi", "above_chance_hi"})
    task: str = Field(description="Task name.")
    method: str = Field(description="An attribution method, `search` (the attacker's searched keep-set: the best "
                                    "of the attribution sets and random ones on training rows, hill-climbed), "
                                    "or `random` (the control).")
    keep: int = Field(ge=1, description="Experts kept per MoE layer (K).")
    metric: float = Field(description="The masked model's metric (for `random`: the mean over the seeds).")
    retained: float = Field(description="Pruned ÷ full (perplexity: full ÷ pruned); 1.0 at K = E.")
    above_chance: float | None = Field(description="(pruned − chance) ÷ (full − chance), or null without a "
                                                   "chance level.")
    seeds: list[int] | None = Field(None, description="`random` rows only: the seeds of the random keep-sets.")
    std: float | None = Field(None, description="`random` rows only: sample standard deviation of the metric.")
    pruned_lo: float | None = Field(None, description="Lower end of the masked model's 95% interval (`random`: "
                                                      "mean of the seeds' bounds).")
    pruned_hi: float | None = Field(None, description="Upper end of the masked model's 95% interval.")
    retained_hi: float | None = Field(None, description="Conservative retained fraction: the pruned model's upper "
                                                        "bound over the full model's lower bound.")
    above_chance_hi: float | None = Field(None, description="Conservative above-chance retained: (pruned upper − "
                                                            "chance) ÷ (full lower − chance); what the gate compares.")


class HeadlinePoint(Record):
    """The best non-random attacker at one target keep fraction."""

    keep: int | None = Field(description="The largest swept K ≤ the target fraction of E, or null when none.")
    retained: float | None = Field(description="That attacker's retained fraction, or null.")
    method: str | None = Field(description="That attacker's method, or null.")
    above_chance: float | None = Field(None, description="That attacker's above-chance retained, or null.")


class TaskHeadline(Record):
    """The headline of one task: the best attacker at 25% and 50% of experts kept."""

    keep_25: HeadlinePoint = Field(description="At the largest swept K ≤ E/4.")
    keep_50: HeadlinePoint = Field(description="At the largest swept K ≤ E/2.")


class RecoveryRow(Record):
    """One point of a re-alignment learning curve."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"unlabeled"})
    task: str = Field(description="Task name.")
    keep: int = Field(ge=1, description="Experts kept per layer of the attacked pruned model.")
    mode: Literal["full", "router", "lora", "distill"] = Field(description="What the attacker trains.")
    strategy: str = Field(description="`random`, `entropy`, `margin`, `kcenter`; `distill` for that mode.")
    seed: int = Field(description="Seed of the run.")
    labels: int = Field(ge=0, description="Labels bought so far (0 for distill).")
    metric: float = Field(description="The metric after this round.")
    unlabeled: int | None = Field(None, description="Distill rows only: unlabeled prompts used.")


class RecoverySettingsRecord(Record):
    """How the re-alignment attack ran."""

    modes: list[str] = Field(description="Modes run (`full`, `router`, `lora`, `distill`).")
    strategies: list[str] = Field(description="Label-selection strategies run.")
    seeds: list[int] = Field(description="Seeds of every (mode, strategy).")
    budget: int = Field(ge=1, description="Label cap of each run.")
    rounds: int = Field(ge=1, description="Select → train rounds per run.")
    steps_per_round: int = Field(ge=0, description="Optimiser steps per round.")
    lr: float = Field(description="Learning rate.")
    target_fraction: float = Field(gt=0, description="Recovery target: this fraction of the full metric.")
    keeps: dict[str, list[int]] = Field(description="`{task: [K]}` keep-counts attacked.")
    labels_axis: str = Field(description="A note on the x-axis of the curves.")


class RecoverySaving(Record):
    """Labels an active strategy saves against random selection."""

    best_active: str = Field(description="The active strategy that needed the fewest labels.")
    labels: float = Field(description="Its labels to recover.")
    random: float | None = Field(description="Random selection's labels to recover, or null.")
    saving_vs_random: float | None = Field(description="1 − best ÷ random, or null.")


class RecoveryTiming(Record):
    """Seconds spent in the re-alignment attack."""

    select: float = Field(description="Seconds spent selecting labels.")
    train: float = Field(description="Seconds spent training.")


class RecoverySections(Record):
    """The recovery sections of a scan, as the attack layer's recovery suite returns them."""

    recovery: list[RecoveryRow] = Field(description="One row per learning-curve point.")
    labels_to_recover: dict[str, dict[str, float | None]] = Field(
        description="`{task: {strategy: labels}}`: labels needed to reach `target_fraction` of the full model "
                    "at the first keep-count in `recovery_settings.keeps`, mean over seeds; null unless every "
                    "seed got there within the budget. Counted for the first mode run and for `distill`.")
    recovery_saving: dict[str, RecoverySaving] = Field(
        description="`{task: saving}`, present for a task when an active strategy recovered.")
    recovery_settings: RecoverySettingsRecord = Field(description="How the attack ran.")
    recovery_timing: RecoveryTiming = Field(description="Seconds selecting and training.")


class ScanDocument(Record):
    """`scan.json`: how much of each task survives when a thief keeps only the experts it uses."""

    SCHEMA: ClassVar[str] = SCAN_SCHEMA
    omit_if_none: ClassVar[frozenset[str]] = frozenset(
        {"recovery", "labels_to_recover", "recovery_saving", "recovery_settings", "recovery_timing", "ladder"})
    schema_id: Literal["moeharden.scan/1"] = Field(SCAN_SCHEMA, alias="schema", description="`moeharden.scan/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    created: str = Field(description="UTC time, ISO 8601, seconds.")
    model: ModelIdentity = Field(description="The checkpoint's identity.")
    settings: ScanSettingsRecord = Field(description="How the scan ran.")
    tasks: list[TaskRecord] = Field(description="One entry per task.")
    attribution: dict[str, dict[str, list[list[float]]]] = Field(
        description="`{method: {task: [[score per expert] per MoE layer]}}`: the [L, E] score matrix of every "
                    "method, rows in the order of `model.moe_layers`.")
    keep_sets: dict[str, dict[str, dict[str, dict[str, list[int]]]]] = Field(
        description="`{method: {task: {\"<K>\": {\"<layer>\": [expert ids]}}}}`: the experts each method keeps "
                    "at each swept K < E (the inner object is a `KEEP.json`'s `keep` for `moeharden prune`).")
    sweep: list[SweepRecord] = Field(description="One row per (task, method, K).")
    headline: dict[str, TaskHeadline] = Field(description="`{task: headline}`.")
    timings: dict[str, float] = Field(description="Seconds per stage: `load`, `full_eval`, `attribution_pass`, "
                                                  "`ablation` (when that method ran), `sweep`.")
    recovery: list[RecoveryRow] | None = Field(None, description="Re-alignment attack (present when it ran): "
                                                                 "one row per learning-curve point.")
    labels_to_recover: dict[str, dict[str, float | None]] | None = Field(
        None, description="Present when the attack ran: see the recovery sections.")
    recovery_saving: dict[str, RecoverySaving] | None = Field(None, description="Present when the attack ran.")
    recovery_settings: RecoverySettingsRecord | None = Field(None, description="Present when the attack ran.")
    recovery_timing: RecoveryTiming | None = Field(None, description="Present when the attack ran.")
    ladder: LadderSection | None = Field(None, description="The adaptive attack on the budget ladder with its "
                                                           "references (present when it ran).")

    def with_recovery(self, sections: RecoverySections) -> ScanDocument:
        """This document with the recovery sections set (a copy, validated)."""
        return ScanDocument.model_validate({**self.to_json(), **sections.to_json()})

    def task(self, name: str) -> TaskRecord | None:
        """The task entry called ``name``, or None."""
        return next((t for t in self.tasks if t.name == name), None)


D = TypeVar("D", bound=Record)


def parse_document(raw: Any, kind: type[D], *, where: str, error: type[MoehardenError] = InputError) -> D:
    """Validate a decoded JSON value as a document of type ``kind`` (which has a ``SCHEMA``).

    Raises:
        InputError (or ``error``): not an object, a different schema, or invalid fields (listed).
    """
    expected = kind.SCHEMA  # type: ignore[attr-defined]
    if not isinstance(raw, dict):
        raise error(f"{where} holds a JSON {type(raw).__name__}, not a {expected} document.",
                    hint="Point at the JSON written by the matching moeharden command.")
    schema = raw.get("schema")
    if schema != expected:
        raise error(f"{where} has schema {str(schema)[:60]!r}, expected {expected!r}.",
                    hint="Point at the JSON written by the matching moeharden command.")
    try:
        return kind.model_validate(raw)
    except ValidationError as err:
        problems = validation_problems(err)
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + ("; …" if len(problems) > MAX_PROBLEMS_SHOWN else "")
        raise error(f"{where} is not a valid {expected} document ({len(problems)} problem(s)): {shown}.",
                    hint="Re-create it with the moeharden command that writes it; it may be damaged or edited.") \
            from None
    except RecursionError:
        raise error(f"{where} nests too deeply to be a {expected} document.") from None


def load_document(path: Path, kind: type[D], *, error: type[MoehardenError] = InputError,
                  file_error: type[MoehardenError] | None = None, follow_links: bool | None = None) -> D:
    """Read and validate a report JSON from disk (a bounded read of a regular file).

    Args:
        path: the JSON file.
        kind: the document model (e.g. :class:`ScanDocument`).
        error: the error type to raise for its contents (``IntegrityError`` for manifests).
        file_error: the error type when ``path`` cannot be read as a document file (missing, a
            directory, a FIFO or device, a refused symlink, over :data:`~moeharden.io.files.MAX_DOCUMENT`
            bytes); default ``error``. A file the user names (``verify --manifest``) passes
            ``InputError``: a wrong path is an input error even where bad contents are a tamper.
        follow_links: whether a symlink at ``path`` is followed. Default: yes, unless ``error`` is an
            :class:`IntegrityError` — such a document is trusted only with the signature of the
            directory it lies in, which never covers a link (model-signing refuses them), so a link
            could only lead verify to open a file outside the release.
    Returns:
        the validated document.
    Raises:
        InputError (or ``error`` / ``file_error``): missing file, a directory, FIFO, device or refused
        symlink, a file over the size cap, non-UTF-8 bytes, invalid or too deeply nested JSON, a key
        twice in one object, an integer too long to convert, a different schema, or fields of the
        wrong type.
    """
    path = Path(path)
    expected = kind.SCHEMA  # type: ignore[attr-defined]
    if follow_links is None:
        follow_links = not issubclass(error, IntegrityError)
    text = read_small_text(path, what=f"{expected} document", max_bytes=MAX_DOCUMENT,
                           error=file_error or error, follow_links=follow_links)
    raw = parse_json(text, where=str(path), error=error)
    return parse_document(raw, kind, where=str(path), error=error)
