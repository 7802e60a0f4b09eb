"""The adaptive re-alignment attack on a budget ladder: one learning curve per starting point.

A curve is the attacker's best metric at each rung of a geometric ladder of budgets — labels it
buys (``labels`` attack) or unlabelled prompts it distils from the released full model (``distill``
attack). At every rung the attacker *chooses* its learning rate, schedule and step count from a
small grid by a validation split that is disjoint from the evaluation split; the evaluation split
is scored once per rung and trajectory, on the state the validation choice picked, and never
drives a choice.

Design (cheap enough to run on CPU, documented in docs/attacks-and-defenses.md):

* one *trajectory* per (learning rate, schedule): labels arrive rung by rung (chosen by the
  selection strategy), the model keeps training from where the previous rung left it (a
  curriculum any attacker may use), and within each rung the validation metric is measured at
  each step checkpoint of the grid;
* within a trajectory and rung the best checkpoint by validation is kept (early stopping; the
  trajectory continues from it) and scored on the evaluation split;
* across trajectories, the rung's point is the trajectory with the best validation metric.

The loss only ever reads the examples bought so far: at rung ``n`` at most ``n`` labels.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch

from moeharden.attack.realign.run import attach_lora, restored, trainable_params
from moeharden.attack.realign.selection import select
from moeharden.errors import UsageError

SCHEDULES = ("constant", "cosine")
ATTACKS = ("labels", "distill")
WARMUP_STEPS = 10


@dataclass(frozen=True)
class LadderSettings:
    """The attacker's grid and the ladder.

    Attributes:
        rungs: label budgets (``labels`` attack), starting at 0, increasing.
        prompt_rungs: unlabelled-prompt budgets (``distill`` attack), starting at 0.
        lrs: learning rates the attacker tries (AdamW, no weight decay).
        schedules: per-rung learning-rate schedules tried (``constant`` after a 10-step warm-up,
            ``cosine`` decay to 0 over the rung).
        steps: step checkpoints within a rung (the largest is the rung's length); the attacker
            picks one by validation.
        batch_size: examples per optimizer step.
        lora_rank: LoRA rank in ``lora`` mode.
        halving_every: successive halving — after every this many rungs only the better half of
            the (learning rate, schedule) trajectories, by validation, trains on (0: every
            trajectory runs every rung; ``lora`` mode never halves).
    """

    rungs: tuple[int, ...] = (0, 16, 32, 64, 128, 256, 512)
    prompt_rungs: tuple[int, ...] = (0, 64, 256, 1024, 4096)
    lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    schedules: tuple[str, ...] = ("constant",)
    steps: tuple[int, ...] = (50, 100, 200)
    batch_size: int = 16
    lora_rank: int = 8
    halving_every: int = 2

    def __post_init__(self) -> None:
        for name in ("rungs", "prompt_rungs"):
            r = getattr(self, name)
            if not r or r[0] != 0 or any(b <= a for a, b in zip(r, r[1:], strict=False)):
                raise UsageError(f"Ladder {name} must start at 0 and increase, got {list(r)}.")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise UsageError("The attacker's learning-rate grid must hold positive values.")
        if any(s not in SCHEDULES for s in self.schedules) or not self.schedules:
            raise UsageError(f"Unknown schedule in {list(self.schedules)}.", hint=f"Choose from {', '.join(SCHEDULES)}.")
        if not self.steps or any(s < 1 for s in self.steps) or list(self.steps) != sorted(self.steps):
            raise UsageError("The step checkpoints must be positive and increasing.")
        if self.batch_size < 1:
            raise UsageError("The attack's batch size must be at least 1.")
        if self.halving_every < 0:
            raise UsageError("halving_every must be 0 (off) or a positive number of rungs.")


@dataclass
class LadderPoint:
    """The attacker's chosen state at one rung.

    Attributes:
        x: labels bought (``labels``) or prompts used (``distill``).
        metric, lo, hi: evaluation-split metric and its 95% interval.
        val_metric: the validation metric the choice was made on.
        lr, schedule, steps: the chosen hyper-parameters (``steps``: optimizer steps in this rung;
            ``total_steps``: since the start of the trajectory).
        labels_read: distinct training examples the loss has read so far (≤ ``x``).
    """

    x: int
    metric: float
    lo: float
    hi: float
    val_metric: float | None = None
    lr: float | None = None
    schedule: str | None = None
    steps: int = 0
    total_steps: int = 0
    labels_read: int = 0


@dataclass
class LadderCurve:
    """One learning curve of one attack on one starting point, at one seed."""

    task: str
    reference: str
    attack: str
    mode: str
    strategy: str
    seed: int
    keep: int
    points: list[LadderPoint] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "points"},
                "points": [asdict(p) for p in self.points]}


@dataclass
class _RungResult:
    val: float
    steps: int
    total_steps: int
    metric: tuple[float, float, float]
    labels_read: int


def _lr_at(schedule: str, base: float, step: int, rung_len: int, total: int) -> float:
    """Learning rate of step ``step`` (1-based) of a rung of ``rung_len`` steps; ``total`` steps so far."""
    warm = min(1.0, (total + 1) / WARMUP_STEPS)
    if schedule == "cosine":
        return base * warm * 0.5 * (1 + math.cos(math.pi * (step - 1) / rung_len))
    return base * warm


def _better(a: float, b: float | None, higher: bool) -> bool:
    if b is None:
        return True
    return a > b if higher else a < b


class _Trajectory:
    """One (learning rate, schedule) trajectory over the rungs; the model is trained in place."""

    def __init__(self, target, params, ops, pool, s: LadderSettings, lr: float, schedule: str, seed: int,
                 attack: str, strategy: str, teacher: Sequence | None, score: Callable, val_score: Callable):
        self.target, self.params, self.ops, self.pool, self.s = target, params, ops, pool, s
        self.lr, self.schedule, self.attack, self.strategy = lr, schedule, attack, strategy
        self.teacher, self.score, self.val_score = teacher, score, val_score
        self.rng = random.Random(seed)
        self.order = list(range(len(pool)))
        random.Random(seed).shuffle(self.order)          # distill: a seeded random draw of prompts
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
        self.selected: list[int] = []
        self.read: set[int] = set()
        self.total = 0

    def _buy(self, n: int) -> None:
        if self.attack == "distill":
            self.selected = self.order[:n]
            return
        new = select(self.strategy, self.target, self.ops, self.pool, self.selected, n - len(self.selected), self.rng)
        self.selected = self.selected + new

    def _step(self, step: int, rung_len: int) -> None:
        batch = self.rng.sample(self.selected, min(self.s.batch_size, len(self.selected)))
        self.read.update(batch)
        exs = [self.pool[i] for i in batch]
        if self.attack == "distill":
            loss = self.ops.distill_loss(self.target, exs, [self.teacher[i] for i in batch])
        else:
            loss = self.ops.loss(self.target, exs)
        for g in self.opt.param_groups:
            g["lr"] = _lr_at(self.schedule, self.lr, step, rung_len, self.total)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.total += 1

    def rung(self, n: int, higher: bool, best_possible: float | None = None) -> _RungResult:
        """Buy up to ``n`` examples, train one rung, keep the best checkpoint by validation, score it.

        The rung stops early once validation reaches ``best_possible`` (no later checkpoint can be
        chosen over it: ties keep the earliest), so the chosen state is the one the full rung
        would choose.
        """
        self._buy(n)
        rung_len = max(self.s.steps)
        best_val, best_step, best_total, snap = None, 0, self.total, None
        self.target.train()
        for step in range(1, rung_len + 1):
            self._step(step, rung_len)
            if step in self.s.steps:
                self.target.eval()
                v = self.val_score(self.target)
                if _better(v, best_val, higher):
                    best_val, best_step, best_total = v, step, self.total
                    snap = [p.detach().clone() for p in self.params] if step != rung_len else None
                if best_possible is not None and v == best_possible:
                    snap = None           # the model is at the chosen state
                    break
                self.target.train()
        self.target.eval()
        if snap is not None:          # continue from the early-stopped state
            with torch.no_grad():
                for p, v in zip(self.params, snap, strict=True):
                    p.copy_(v)
        return _RungResult(best_val, best_step, best_total, self.score(self.target), len(self.read))


def run_ladder(model, ops, pool: Sequence, s: LadderSettings, *, attack: str = "labels", mode: str = "full",
               strategy: str = "random", seed: int = 0, score: Callable, val_score: Callable,
               higher_is_better: bool = True, mask: Callable | None = None,
               router_params: Sequence[torch.nn.Parameter] = (), teacher: Sequence | None = None,
               rungs: Sequence[int] | None = None, meta: dict | None = None,
               best_possible: float | None = None, val_loss: Callable | None = None) -> LadderCurve:
    """Run the adaptive attack over the ladder from ``model``'s current weights; restore them after.

    Args:
        model: the starting point (the pruned copy, or a reference), trained in place and restored.
        ops: the task's operations (:class:`moeharden.attack.realign.taskops.TaskOps`).
        pool: the attacker's examples (labels are read only for those bought).
        s: the grid and ladder.
        attack: ``labels`` or ``distill`` (then ``teacher`` holds the released full model's cached
            answers for every pool example, :meth:`TaskOps.teacher`).
        mode: ``full``, ``router`` or ``lora`` (what the attacker trains).
        strategy: selection strategy for ``labels``.
        score: ``score(model) -> (metric, lo, hi)`` on the evaluation split.
        val_score: ``val_score(model) -> metric`` on the validation split (drives every choice).
        mask: context-manager factory applying the pruning mask.
        rungs: budgets (default: ``s.rungs`` or ``s.prompt_rungs``), capped by the pool size.
        meta: task, reference, keep for the curve's record.
        best_possible: the metric's best value (:func:`moeharden.tasks.examples.best_possible`):
            a rung stops once validation reaches it.
        val_loss: ``val_loss(model) -> float`` on the validation split (lower is better): breaks
            ties between trajectories when successive halving drops some (``s.halving_every``).
    Returns:
        the :class:`LadderCurve`; ``points[0]`` is the untrained starting point.
    Raises:
        UsageError: unknown attack or mode, or ``distill`` without a teacher.
    """
    if attack not in ATTACKS:
        raise UsageError(f"Unknown attack {attack!r}.", hint=f"Choose from {', '.join(ATTACKS)}.")
    if mode not in ("full", "router", "lora"):
        raise UsageError(f"Unknown mode {mode!r} for the ladder.", hint="Choose from full, router, lora.")
    if attack == "distill" and teacher is None:
        raise UsageError("The distillation attack needs the full model's answers (teacher).")
    t0 = time.perf_counter()
    ladder = [r for r in (rungs or (s.rungs if attack == "labels" else s.prompt_rungs)) if r <= len(pool)]
    meta = meta or {}
    curve = LadderCurve(meta.get("task", ""), meta.get("reference", "pruned"), attack, mode,
                        strategy if attack == "labels" else "random", seed, int(meta.get("keep", 0)))
    mask_ctx = mask or nullcontext
    all_params = list(model.parameters())
    per_rung: dict[int, list[tuple[_RungResult, float, str]]] = {}
    with mask_ctx():
        m, lo, hi = score(model)
        curve.points.append(LadderPoint(0, m, lo, hi, val_metric=val_score(model)))
        if mode == "lora":
            _sequential(model, ops, pool, s, ladder, per_rung, all_params, router_params, seed, attack, strategy,
                        teacher, score, val_score, higher_is_better, best_possible)
        else:
            _halving(model, ops, pool, s, ladder, per_rung, all_params, router_params, mode, seed, attack, strategy,
                     teacher, score, val_score, val_loss, higher_is_better, best_possible)
    for n in ladder[1:]:
        best = None
        for res, lr, schedule in per_rung[n]:
            if best is None or _better(res.val, best[0].val, higher_is_better):
                best = (res, lr, schedule)
        res, lr, schedule = best
        m, lo, hi = res.metric
        curve.points.append(LadderPoint(n, m, lo, hi, val_metric=res.val, lr=lr, schedule=schedule, steps=res.steps,
                                        total_steps=res.total_steps, labels_read=res.labels_read))
    curve.seconds = round(time.perf_counter() - t0, 3)
    return curve


def _sequential(model, ops, pool, s: LadderSettings, ladder, per_rung, all_params, router_params, seed, attack,
                strategy, teacher, score, val_score, higher, best_possible) -> None:
    """``lora`` mode: each (learning rate, schedule) trajectory runs every rung, one after another
    (a fresh adapter each); no halving."""
    from moeharden.attack.realign.run import RecoverySettings

    for lr in s.lrs:
        for schedule in s.schedules:
            with restored(all_params):
                for p in all_params:
                    p.requires_grad_(False)
                peft_model, params = attach_lora(model, RecoverySettings(lora_rank=s.lora_rank), None)
                for p in params:
                    p.requires_grad_(True)
                torch.manual_seed(seed)
                traj = _Trajectory(peft_model, params, ops, pool, s, lr, schedule, seed, attack, strategy, teacher,
                                   score, val_score)
                for n in ladder[1:]:
                    per_rung.setdefault(n, []).append((traj.rung(n, higher, best_possible), lr, schedule))
                peft_model.unload()
            for p in all_params:
                p.grad = None


def _halving(model, ops, pool, s: LadderSettings, ladder, per_rung, all_params, router_params, mode, seed, attack,
             strategy, teacher, score, val_score, val_loss, higher, best_possible) -> None:
    """``full``/``router`` mode: the trajectories advance rung by rung together (each keeps its own
    weights and optimizer state, swapped into the model for its turn); after every
    ``s.halving_every`` rungs the better half by validation (ties: lower ``val_loss``) goes on —
    successive halving, so the ladder's later, costlier rungs train fewer trajectories."""
    with restored(all_params if mode != "router" else list(router_params)):
        for p in all_params:
            p.requires_grad_(False)
        params = trainable_params(model, mode, router_params)
        for p in params:
            p.requires_grad_(True)
        start = [p.detach().clone() for p in params]
        torch.manual_seed(seed)
        alive = [(lr, sch) for lr in s.lrs for sch in s.schedules]
        trajs = {g: _Trajectory(model, params, ops, pool, s, g[0], g[1], seed, attack, strategy, teacher, score,
                                val_score) for g in alive}
        state = {g: start for g in alive}
        for i, n in enumerate(ladder[1:], start=1):
            results = {}
            for g in alive:
                with torch.no_grad():
                    for p, v in zip(params, state[g], strict=True):
                        p.copy_(v)
                results[g] = trajs[g].rung(n, higher, best_possible)
                per_rung.setdefault(n, []).append((results[g], g[0], g[1]))
                tie = val_loss(model) if val_loss is not None and s.halving_every else 0.0
                results[g] = (results[g], tie)
                state[g] = [p.detach().clone() for p in params]
            if s.halving_every and i % s.halving_every == 0 and len(alive) > 1:
                sign = -1.0 if higher else 1.0
                ranked = sorted(alive, key=lambda g: (sign * results[g][0].val, results[g][1]))
                alive = [g for g in alive if g in ranked[:math.ceil(len(alive) / 2)]]
                for g in list(state):
                    if g not in alive:
                        del state[g], trajs[g]
        for p in all_params:
            p.grad = None
