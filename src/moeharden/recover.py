"""The re-alignment attack: fine-tune a pruned model on a label budget, choosing labels actively.

After pruning, the attacker (who also holds the full model) cheaply re-aligns what is left. The
loop is in rounds — select → train → re-score — and records the metric after every round, so
each run gives a learning curve of metric against labels actually used.

Modes (what the attacker trains):
  ``router``   router weights only;
  ``lora``     LoRA adapters (peft) on attention projections and the fused expert tensors;
  ``full``     every parameter (masked experts get no gradient: they are never selected);
  ``distill``  like ``full`` but on unlabeled task prompts, matching the full model's next-token
               distribution (KL) — uses no labels at all.
Strategies (which examples to label next): ``random``, ``entropy`` (highest predictive entropy
over the choices), ``margin`` (smallest gap between the two most likely choices) and ``kcenter``
(greedy core-set on mean-pooled last hidden states).

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

MODES = ("router", "lora", "full", "distill")
STRATEGIES = ("random", "entropy", "margin", "kcenter")


@dataclass(frozen=True)
class RecoverySettings:
    """Knobs of one recovery run; the label budget is a hard cap on labels used."""

    mode: str = "full"
    strategy: str = "random"
    budget: int = 64
    rounds: int = 4
    steps_per_round: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    lora_rank: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown recovery mode {self.mode!r}; choose from {MODES}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown selection strategy {self.strategy!r}; choose from {STRATEGIES}")
        if self.budget < 1 or self.rounds < 1:
            raise ValueError("budget and rounds must be at least 1")


@dataclass
class TaskOps:
    """What recovery needs from a task, as plain callables over example lists.

    ``loss(model, examples)`` differentiable mean loss of the correct answers;
    ``choice_logprobs(model, examples)`` → ``[N, C]`` (None for tasks without choices);
    ``embed(model, examples)`` → ``[N, H]``; ``metric(model)`` → evaluation-split metric;
    ``distill_loss(model, examples, teacher)`` KL to the teacher's cached distributions and
    ``teacher(model, examples)`` computing that cache with the current (full) model.
    """

    loss: Callable
    metric: Callable
    embed: Callable
    choice_logprobs: Callable | None = None
    teacher: Callable | None = None
    distill_loss: Callable | None = None


@dataclass
class RecoveryRun:
    """One learning curve: ``points`` are ``(labels_used, metric)`` after each round."""

    settings: RecoverySettings
    points: list[tuple[int, float]] = field(default_factory=list)
    labels_used: int = 0
    selected: list[int] = field(default_factory=list)
    select_seconds: float = 0.0
    train_seconds: float = 0.0


def _trainable(model, mode: str, router_params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    if mode == "router":
        return list(router_params)
    if mode in ("full", "distill"):
        return [p for p in model.parameters() if p.is_floating_point()]
    return [p for p in model.parameters() if p.requires_grad]


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


def entropy_scores(logprobs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy over choices, ``[N]`` (renormalised over the choices)."""
    lp = torch.log_softmax(logprobs.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def margin_scores(logprobs: torch.Tensor) -> torch.Tensor:
    """Negative gap between the two most likely choices, ``[N]`` (higher = more uncertain)."""
    p = torch.softmax(logprobs.float(), dim=-1)
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    gap = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    return -gap


def kcenter_greedy(emb: torch.Tensor, labeled: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """Greedy core-set: repeatedly take the pool point farthest from everything chosen so far.

    Args:
        emb: ``[N, H]`` pool embeddings; labeled: indices already chosen; n: how many to add.
    """
    N = emb.shape[0]
    if not labeled:
        first = rng.randrange(N)
        chosen, n = [first], n - 1
    else:
        chosen = []
    centers = list(labeled) + chosen
    d = torch.cdist(emb.float(), emb[centers].float()).min(1).values  # [N] distance to nearest center
    for _ in range(max(n, 0)):
        d[centers] = -1.0
        nxt = int(d.argmax())
        chosen.append(nxt)
        centers.append(nxt)
        d = torch.minimum(d, torch.cdist(emb.float(), emb[nxt:nxt + 1].float()).squeeze(1))
    return chosen


def select(strategy: str, model, ops: TaskOps, pool: Sequence, labeled: list[int], n: int,
           rng: random.Random) -> list[int]:
    """Pick ``n`` new pool indices to label (never one already labeled)."""
    free = [i for i in range(len(pool)) if i not in set(labeled)]
    n = min(n, len(free))
    if n <= 0:
        return []
    if strategy == "random" or (strategy in ("entropy", "margin") and ops.choice_logprobs is None):
        return rng.sample(free, n)
    model.eval()
    with torch.no_grad():
        if strategy == "kcenter":
            emb = ops.embed(model, list(pool))
            return kcenter_greedy(emb, labeled, n, rng)
        lp = ops.choice_logprobs(model, [pool[i] for i in free])
    s = entropy_scores(lp) if strategy == "entropy" else margin_scores(lp)
    order = sorted(range(len(free)), key=lambda j: (-float(s[j]), free[j]))
    return [free[j] for j in order[:n]]


def run_recovery(model, ops: TaskOps, pool: Sequence, settings: RecoverySettings, *,
                 router_params: Sequence[torch.nn.Parameter] = (), mask: Callable | None = None,
                 lora_targets: Sequence[str] = ()) -> RecoveryRun:
    """Run one seeded recovery attack and restore the model afterwards.

    Args:
        pool: the task's training split (the attacker's unlabeled pool); labels are "bought" only
            for selected examples, at most ``settings.budget`` of them.
        router_params: the router weights (``router`` mode).
        mask: a context-manager factory applying the pruning mask (``None`` for a physically
            pruned model).
        lora_targets: module-name suffixes for LoRA (``lora`` mode).
    Returns:
        the learning curve; ``points[0]`` is the pruned model before any training (0 labels).
    """
    s = settings
    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    run = RecoveryRun(s)
    mask_ctx = mask or nullcontext
    per_round = [s.budget // s.rounds + (1 if r < s.budget % s.rounds else 0) for r in range(s.rounds)]
    teacher = None
    if s.mode == "distill":
        with torch.no_grad():  # the teacher is the full (unmasked) model, before any training
            teacher = ops.teacher(model, list(pool))
    all_params = [p for p in model.parameters()]
    peft_model = None
    with restored(all_params if s.mode != "router" else list(router_params)):
        for p in all_params:
            p.requires_grad_(False)
        target = model
        if s.mode == "lora":
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, target_modules=list(lora_targets),
                             lora_dropout=0.0)
            peft_model = target = get_peft_model(model, cfg)
            params = [p for n, p in target.named_parameters() if "lora_" in n]
        else:
            params = _trainable(model, s.mode, router_params)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
        with mask_ctx():
            run.points.append((0, float(ops.metric(target))))
            for r in range(s.rounds):
                t0 = time.perf_counter()
                if s.mode == "distill":
                    new = rng.sample([i for i in range(len(pool)) if i not in set(run.selected)],
                                     min(per_round[r], len(pool) - len(run.selected)))
                else:
                    new = select(s.strategy, target, ops, pool, run.selected, per_round[r], rng)
                run.select_seconds += time.perf_counter() - t0
                run.selected += new
                if s.mode != "distill":
                    run.labels_used = len(run.selected)   # labels bought so far (distill buys none)
                t0 = time.perf_counter()
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
                run.train_seconds += time.perf_counter() - t0
                x = len(run.selected) if s.mode == "distill" else run.labels_used
                run.points.append((x, float(ops.metric(target))))
        if peft_model is not None:
            peft_model.unload()
    for p in all_params:
        p.grad = None
    return run


def labels_to_recover(points: Sequence[tuple[int, float]], target: float) -> int | None:
    """The smallest label count at which the curve reaches ``target``; ``None`` if never."""
    for labels, metric in points:
        if metric >= target:
            return labels
    return None
