"""One seeded re-alignment run: settings, the select → train → re-score loop, and its learning curve.

After pruning, the attacker (who also holds the full model) cheaply re-aligns what is left. The
loop is in rounds — select → train → re-score — and records the metric after every round, so
each run gives a learning curve of metric against labels actually used.

Modes (what the attacker trains):
  ``router``   router weights only;
  ``lora``     LoRA adapters (peft) on the family's attention projections and the fused expert
               tensors (targets from :func:`moeharden.model.registry.lora_targets`);
  ``full``     every parameter (masked experts get no gradient: they are never selected);
  ``distill``  like ``full`` but on unlabeled task prompts, matching the full model's next-token
               distribution (KL) — uses no labels at all.
Strategies (which examples to label next) are :mod:`moeharden.attack.realign.selection`'s.

The model is trained in place and restored afterwards (trainable tensors are saved and put
back; LoRA adapters are unloaded), so a scan can run many attacks on one loaded model.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from moeharden.attack.realign.selection import STRATEGIES, select
from moeharden.attack.realign.taskops import TaskOps
from moeharden.errors import UsageError

MODES = ("router", "lora", "full", "distill")


@dataclass(frozen=True)
class RecoverySettings:
    """Knobs of one recovery run; the label budget is a hard cap on labels used.

    Raises:
        UsageError: unknown mode or strategy, or a budget / round count below 1.
    """

    mode: str = "full"
    strategy: str = "random"
    budget: int = 64
    rounds: int = 4
    steps_per_round: int = 30
    batch_size: int = 16
    lr: float = 3e-4
    seed: int = 0
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"Unknown recovery mode {self.mode!r}.", hint=f"Choose from {', '.join(MODES)}.")
        if self.strategy not in STRATEGIES:
            raise UsageError(f"Unknown selection strategy {self.strategy!r}.",
                             hint=f"Choose from {', '.join(STRATEGIES)}.")
        if self.budget < 1 or self.rounds < 1:
            raise UsageError("The recovery budget and rounds must be at least 1.")

    def per_round(self) -> list[int]:
        """Labels bought in each round: the budget split as evenly as possible, earlier rounds first."""
        return [self.budget // self.rounds + (1 if r < self.budget % self.rounds else 0) for r in range(self.rounds)]


@dataclass
class RecoveryRun:
    """One learning curve: ``points`` are ``(labels_used, metric)`` after each round."""

    settings: RecoverySettings
    points: list[tuple[int, float]] = field(default_factory=list)
    labels_used: int = 0
    selected: list[int] = field(default_factory=list)
    select_seconds: float = 0.0
    train_seconds: float = 0.0


@contextmanager
def restored(params: Sequence[torch.nn.Parameter]):
    """Save ``params`` (to CPU) and put their values and requires_grad back on exit."""
    saved = [(p, p.detach().to("cpu", copy=True), p.requires_grad) for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v, rg in saved:
                p.copy_(v.to(p.device))
                p.requires_grad_(rg)


def trainable_params(model, mode: str, router_params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """What a re-alignment of ``mode`` updates: the routers (``router``) or every floating-point
    parameter (``full``, ``distill``)."""
    if mode == "router":
        return list(router_params)
    return [p for p in model.parameters() if p.is_floating_point()]    # full, distill


def attach_lora(model, s: RecoverySettings, targets: tuple[Sequence[str], Sequence[str]] | None):
    """Wrap ``model`` in peft LoRA adapters; returns (peft model, its LoRA parameters)."""
    from peft import LoraConfig, get_peft_model

    if targets is None:
        from moeharden.model.registry import lora_targets

        targets = lora_targets(model)
    modules, tparams = targets
    cfg = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, target_modules=list(modules),
                     target_parameters=list(tparams) or None, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    return peft_model, [p for n, p in peft_model.named_parameters() if "lora_" in n]


def _pick(target, ops: TaskOps, pool: Sequence, run: RecoveryRun, n: int, rng: random.Random) -> list[int]:
    """The round's new examples: actively selected, or (distill, label-free) a random draw."""
    s = run.settings
    if s.mode == "distill":
        return rng.sample([i for i in range(len(pool)) if i not in set(run.selected)],
                          min(n, len(pool) - len(run.selected)))
    return select(s.strategy, target, ops, pool, run.selected, n, rng)


def _train_round(target, ops: TaskOps, pool: Sequence, run: RecoveryRun, opt, rng: random.Random,
                 teacher: list | None) -> None:
    """``steps_per_round`` optimizer steps on random batches of the examples selected so far."""
    s = run.settings
    target.train()
    for _ in range(s.steps_per_round):
        batch = rng.sample(run.selected, min(s.batch_size, len(run.selected)))
        if s.mode == "distill":
            loss = ops.distill_loss(target, [pool[i] for i in batch], [teacher[i] for i in batch])
        else:
            loss = ops.loss(target, [pool[i] for i in batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    target.eval()


def run_recovery(model, ops: TaskOps, pool: Sequence, settings: RecoverySettings, *,
                 router_params: Sequence[torch.nn.Parameter] = (), mask: Callable | None = None,
                 lora_targets: tuple[Sequence[str], Sequence[str]] | None = None,
                 keep_trained: bool = False) -> RecoveryRun:
    """Run one seeded recovery attack and restore the model afterwards.

    Args:
        model: the loaded (full or physically pruned) model, trained in place.
        ops: what the loop needs from the task (:func:`moeharden.attack.realign.taskops.task_ops`).
        pool: the task's training split (the attacker's unlabeled pool); labels are "bought" only
            for selected examples, at most ``settings.budget`` of them.
        settings: mode, strategy, budget, rounds, optimizer knobs and seed.
        router_params: the router weights (``router`` mode).
        mask: a context-manager factory applying the pruning mask (``None`` for a physically
            pruned model).
        lora_targets: (module-name suffixes, parameter names) for LoRA (``lora`` mode); ``None``
            asks the registry (:func:`moeharden.model.registry.lora_targets`).
        keep_trained: keep the trained weights (``prune --recover``; LoRA adapters are merged)
            instead of restoring the model.
    Returns:
        the learning curve; ``points[0]`` is the pruned model before any training (0 labels).
    Raises:
        UnsupportedModelError: ``lora`` mode on a model the registry does not know.
    """
    s = settings
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    run = RecoveryRun(s)
    mask_ctx = mask or nullcontext
    per_round = s.per_round()
    teacher = None
    if s.mode == "distill":
        with torch.no_grad():  # the teacher is the full (unmasked) model, before any training
            teacher = ops.teacher(model, list(pool))
    all_params = list(model.parameters())
    peft_model = None
    with (nullcontext() if keep_trained else restored(all_params if s.mode != "router" else list(router_params))):
        for p in all_params:
            p.requires_grad_(False)
        target = model
        if s.mode == "lora":
            peft_model, params = attach_lora(model, s, lora_targets)
            target = peft_model
        else:
            params = trainable_params(model, s.mode, router_params)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        with mask_ctx():
            run.points.append((0, float(ops.metric(target))))
            for r in range(s.rounds):
                t0 = time.perf_counter()
                new = _pick(target, ops, pool, run, per_round[r], rng)
                run.select_seconds += time.perf_counter() - t0
                run.selected += new
                if s.mode != "distill":
                    run.labels_used = len(run.selected)   # labels bought so far (distill buys none)
                t0 = time.perf_counter()
                _train_round(target, ops, pool, run, opt, rng, teacher)
                run.train_seconds += time.perf_counter() - t0
                x = len(run.selected) if s.mode == "distill" else run.labels_used
                run.points.append((x, float(ops.metric(target))))
        if peft_model is not None:
            peft_model.merge_and_unload() if keep_trained else peft_model.unload()
    for p in all_params:
        p.grad = None
    return run


def labels_to_recover(points: Sequence[tuple[int, float]], target: float) -> int | None:
    """The smallest label count at which the curve reaches ``target``; ``None`` if never.

    Args:
        points: ``(labels, metric)`` pairs in the order measured, metric higher-is-better.
        target: the metric to reach.
    """
    for labels, metric in points:
        if metric >= target:
            return labels
    return None
