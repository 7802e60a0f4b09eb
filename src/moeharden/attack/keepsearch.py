"""The attacker's keep-set choice for one checkpoint: which experts survive a prune of one task.

``moeharden prune --method M --task T --keep K`` asks :func:`attributed_keep`: load the model,
score every expert with one attribution method on the task's calibration split, keep the top K
per MoE layer. :func:`attack_tasks` resolves the task the attacker targets (and the others, the
contrastive reference); the re-alignment of a pruned checkpoint uses it too.

:func:`search_keepsets` is the attacker's own search, beyond attribution: the best of the
attribution keep-sets and seeded random ones, then hill-climbed by single-expert swaps, all scored
by the masked model's answer loss on a few rows of the task's ``train`` split (labels the
attacker holds; never the evaluation split).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from moeharden.attack.attribution import (
    ALL_METHODS,
    ablation_scores,
    contrastive_scores,
    keep_sets,
    observed_scores,
    routing_stats,
)
from moeharden.attack.sweep import random_keep_set
from moeharden.errors import KeepSetError, TaskError, UsageError


def attack_tasks(src: Path, task: str, limit: int | None):
    """The task the attacker targets, and the checkpoint's other tasks.

    Args:
        src: local checkpoint directory.
        task: a task of the checkpoint's own task file, or any ``--task`` spec (preset, file,
            ``file#name``).
        limit: cap on examples per split (``None``: all).
    Returns:
        ``(target task, other tasks)``; the others are the contrastive reference.
    Raises:
        TaskError: unknown or invalid task.
    """
    from moeharden.tasks.resolve import load_tasks
    from moeharden.tasks.spec import TASK_FILE_NAME, read_task_file

    own = Path(src) / TASK_FILE_NAME
    if own.is_file() and task in {t.name for t in read_task_file(own).tasks}:
        tasks = load_tasks(None, checkpoint_dir=src, limit=limit, seed=None)
        target = next(t for t in tasks if t.name == task)
        return target, [t for t in tasks if t.name != task]
    tasks = load_tasks([task], checkpoint_dir=src, limit=limit, seed=None)
    return tasks[0], tasks[1:]


def attributed_keep(src: Path, *, method: str, task: str, keep: int, limit: int | None = None,
                    batch_size: int = 32, trust_remote_code: bool = False) -> dict[int, list[int]]:
    """The attacker's keep-set: score experts with ``method`` on ``task``, keep the top ``keep`` per layer.

    Only the attribution pass runs (no pruning sweep). With group-limited routing the top experts
    are taken inside each group, ``keep / groups`` per group.

    Args:
        src: local checkpoint directory.
        method: one of :data:`moeharden.attack.attribution.ALL_METHODS`.
        task: a task of the checkpoint's own ``moeharden-tasks.yaml``, or a ``--task`` spec.
        keep: experts kept per MoE layer.
        limit: cap on examples per split; batch_size: texts per forward pass.
        trust_remote_code: let transformers run the checkpoint's own modeling code.
    Returns:
        ``{decoder layer: kept original expert ids}``.
    Raises:
        UsageError: unknown method. KeepSetError: ``keep`` not prunable on this model.
        TaskError, CheckpointError, UnsupportedModelError.
    """
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.model.keepset import valid_keep
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers, routing_groups
    from moeharden.tasks.metrics import task_loss

    if method not in ALL_METHODS:
        raise UsageError(f"Unknown method {method!r}.", hint=f"Choose from: {', '.join(ALL_METHODS)}.")
    target, others = attack_tasks(src, task, limit)
    model = load_model(src, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(src)
    info = moe_layers(model)
    layers, E, spec = [li.layer for li in info], info[0].num_experts, info[0].spec
    groups = routing_groups(spec, model.config)
    if not valid_keep(spec, model.config, keep):
        raise KeepSetError(f"--keep {keep} cannot be pruned to on this {spec.name} model ({E} experts per layer"
                           + (f", {groups} routing groups" if groups > 1 else "") + ").",
                           hint=f"Use a count from {spec.min_keep} to {E}" + (f", a multiple of {groups}." if groups > 1
                                                                                 else "."))
    if method == "ablation":
        @torch.no_grad()
        def loss_with_mask(mask):
            if mask is None:
                return float(task_loss(model, tok, target.attribution))
            with mask_experts(model, mask):
                return float(task_loss(model, tok, target.attribution))

        scores = ablation_scores(layers, E, loss_with_mask, skip_invalid=True)
    else:
        stats = routing_stats(model, tok, target.calibration_texts(), layers, E, batch_size)
        if method == "contrastive":
            scores = contrastive_scores(stats, [routing_stats(model, tok, o.calibration_texts(), layers, E, batch_size)
                                                for o in others])
        else:
            scores = observed_scores(stats)[method]
    return keep_sets(scores, layers, keep, groups=groups)


KeepSet = dict[int, list[int]]


def _key(keep: Mapping[int, Sequence[int]]) -> tuple:
    return tuple(sorted((int(layer), tuple(sorted(int(e) for e in ids))) for layer, ids in keep.items()))


def search_keepsets(model, tokenizer, task, layers: Sequence[int], num_experts: int, keeps: Sequence[int],
                    candidates: Mapping[str, Mapping[int, Mapping[int, Sequence[int]]]], *, n_random: int = 30,
                    hill_climb_swaps: int = 16, rows: int = 64, seed: int = 0, groups: int = 1,
                    spec: Any = None, config: Any = None,
                    batch_size: int = 16) -> tuple[dict[int, KeepSet], dict[int, dict[str, Any]]]:
    """The attacker's searched keep-set at every K: best candidate by train-row loss, then hill-climbed.

    For each K the candidates are ``candidates[method][K]`` (attribution's keep-sets) and
    ``n_random`` seeded random keep-sets (``K / groups`` experts from every routing group, like
    the sweep's random control); each is scored by :func:`moeharden.tasks.metrics.task_loss` of
    the masked model (:func:`moeharden.model.masking.mask_experts`) on the first ``rows`` examples
    of ``task.train``, lower is better. From the best, ``hill_climb_swaps`` seeded single-expert
    swaps (one layer, one kept expert out, one removed expert of the same routing group in) are
    tried, each kept when the loss drops. Identical keep-sets are scored once.

    Args:
        model, tokenizer: the loaded full model (masked in place, restored after).
        task: a :class:`moeharden.tasks.examples.Task`; only its ``train`` split is read.
        layers: the MoE decoder layers; num_experts: routed experts per layer (E).
        keeps: the Ks to search; K ≥ E (nothing pruned) and Ks the routing cannot run with are skipped.
        candidates: ``{method: {K: {layer: ids}}}``; a method may lack some K.
        n_random: random keep-sets per K; hill_climb_swaps: swaps tried per K.
        rows: train examples scored (the labels this search reads); seed: seeds every draw.
        groups: routing groups (when ``spec`` and ``config`` are given, the registry's count is used).
        spec, config: the model's family spec and config; when given, every keep-set is checked
            with :func:`moeharden.model.keepset.check_keep_counts` and invalid ones are skipped.
        batch_size: examples per forward pass.
    Returns:
        ``(best, scores)``: ``best`` is ``{K: {layer: ids}}``; ``scores[K]`` is
        ``{"rows", "candidates": [{"source", "loss"}], "start", "swaps": [{"layer", "out", "in",
        "loss", "accepted"}], "source", "loss"}`` (``loss`` None for an invalid candidate;
        ``source`` names where the best came from, ``+swaps`` when a swap improved it).
    Raises:
        TaskError: the task has no train examples, or none with an answer token.
    """
    from moeharden.model.keepset import check_keep_counts, valid_keep
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import routing_groups
    from moeharden.tasks.metrics import task_loss

    train = list(task.train[:rows])
    if not train:
        raise TaskError(f"Task {task.name!r} has no train examples to score keep-sets on.",
                        hint="The keep-set search reads the train split only; give the task a train split.")
    checked = spec is not None and config is not None
    if checked:
        groups = routing_groups(spec, config)
    size = num_experts // groups
    max_length = task.spec.max_length if getattr(task, "spec", None) is not None else None
    cache: dict[tuple, float | None] = {}

    def valid(keep: KeepSet) -> bool:
        if sorted(keep) != sorted(layers) or len({len(ids) for ids in keep.values()}) != 1:
            return False
        if any(len(set(ids)) != len(ids) or not all(0 <= e < num_experts for e in ids) for ids in keep.values()):
            return False
        if any(len({sum(1 for e in ids if e // size == g) for g in range(groups)}) != 1 for ids in keep.values()):
            return False  # physical pruning needs the same count kept in every routing group
        if checked:
            try:
                check_keep_counts(spec, config, keep)
            except KeepSetError:
                return False
        return True

    def loss(keep: KeepSet) -> float | None:
        key = _key(keep)
        if key not in cache:
            if not valid(keep):
                cache[key] = None
            else:
                with torch.no_grad(), mask_experts(model, keep):
                    cache[key] = float(task_loss(model, tokenizer, train, batch_size=batch_size,
                                                 max_length=max_length))
        return cache[key]

    best_sets: dict[int, KeepSet] = {}
    seen: dict[int, dict[str, Any]] = {}
    was_training = model.training
    model.eval()
    try:
        for k in keeps:
            if not 1 <= k < num_experts or k % groups or (checked and not valid_keep(spec, config, k)):
                continue
            rng = random.Random(seed * 1_000_003 + k * 7_919 + 1)
            pool: list[tuple[str, KeepSet]] = [
                (m, {int(layer): sorted(int(e) for e in ids) for layer, ids in per_k[k].items()})
                for m, per_k in candidates.items() if k in per_k]
            pool += [(f"random:{i}", random_keep_set(rng, layers, num_experts, k, groups)) for i in range(n_random)]
            scored = [{"source": src, "loss": loss(ks)} for src, ks in pool]
            live = [(c["loss"], i) for i, c in enumerate(scored) if c["loss"] is not None]
            if not live:
                continue
            best_loss, i = min(live)  # ties: the earliest candidate (attribution before random)
            start, current = pool[i][0], {layer: list(ids) for layer, ids in pool[i][1].items()}
            swaps = []
            for _ in range(hill_climb_swaps):
                layer = rng.choice(sorted(current))
                out = rng.choice(current[layer])
                g = out // size
                free = [e for e in range(g * size, (g + 1) * size) if e not in current[layer]]
                if not free:  # this group keeps all its experts: nothing to swap in
                    continue
                new = rng.choice(free)
                trial = {**current, layer: sorted([e for e in current[layer] if e != out] + [new])}
                trial_loss = loss(trial)
                accepted = trial_loss is not None and trial_loss < best_loss
                swaps.append({"layer": layer, "out": out, "in": new, "loss": trial_loss, "accepted": accepted})
                if accepted:
                    current, best_loss = trial, trial_loss
            best_sets[k] = current
            seen[k] = {"rows": len(train), "candidates": scored, "start": start, "swaps": swaps,
                       "source": start + ("+swaps" if any(s["accepted"] for s in swaps) else ""),
                       "loss": best_loss}
    finally:
        model.train(was_training)
    return best_sets, seen
