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
    lr: float = 3e-4
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
    ``uncertainty(model, examples)`` → ``(entropy [N], margin [N])``, higher = more uncertain
    (multiple choice: over the choices; generation: over the model's own greedy answer tokens,
    mean entropy and the negative smallest top-1/top-2 gap); None falls back to random;
    ``embed(model, examples)`` → ``[N, H]``; ``metric(model)`` → evaluation-split metric;
    ``distill_loss(model, examples, teacher)`` KL to the teacher's cached distributions and
    ``teacher(model, examples)`` computing that cache with the current (full) model.
    """

    loss: Callable
    metric: Callable
    embed: Callable
    uncertainty: Callable | None = None
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
           rng: random.Random, candidates: int | None = 96) -> list[int]:
    """Pick ``n`` new pool indices to label (never one already labeled).

    Uncertainty strategies score a seeded random subset of ``candidates`` unlabeled examples
    (at least 4n); ``None`` scores the whole pool.
    """
    free = [i for i in range(len(pool)) if i not in set(labeled)]
    n = min(n, len(free))
    if n <= 0:
        return []
    if strategy == "random" or (strategy in ("entropy", "margin") and ops.uncertainty is None):
        return rng.sample(free, n)
    model.eval()
    with torch.no_grad():
        if strategy == "kcenter":
            # core-set over the labeled points and a seeded candidate subset of the pool
            cand = free if candidates is None or len(free) <= 2 * candidates else sorted(rng.sample(free, 2 * candidates))
            idx = list(labeled) + cand
            emb = ops.embed(model, [pool[i] for i in idx])
            picked = kcenter_greedy(emb, list(range(len(labeled))), n, rng)
            return [idx[j] for j in picked]
        # score a seeded candidate subset (≥ 4× what is needed), as pool-based active learning
        # usually does on large pools: keeps selection cheap next to training
        if candidates is not None and len(free) > max(candidates, 4 * n):
            free = sorted(rng.sample(free, max(candidates, 4 * n)))
        ent, mar = ops.uncertainty(model, [pool[i] for i in free])
    s = ent if strategy == "entropy" else mar
    order = sorted(range(len(free)), key=lambda j: (-float(s[j]), free[j]))
    return [free[j] for j in order[:n]]


def run_recovery(model, ops: TaskOps, pool: Sequence, settings: RecoverySettings, *,
                 router_params: Sequence[torch.nn.Parameter] = (), mask: Callable | None = None,
                 lora_targets: tuple[Sequence[str], Sequence[str]] = ((), ()),
                 keep_trained: bool = False) -> RecoveryRun:
    """Run one seeded recovery attack and restore the model afterwards.

    Args:
        pool: the task's training split (the attacker's unlabeled pool); labels are "bought" only
            for selected examples, at most ``settings.budget`` of them.
        router_params: the router weights (``router`` mode).
        mask: a context-manager factory applying the pruning mask (``None`` for a physically
            pruned model).
        lora_targets: (module-name suffixes, parameter names) for LoRA (``lora`` mode).
        keep_trained: keep the trained weights (``prune --recover``; LoRA adapters are merged)
            instead of restoring the model.
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
    with (nullcontext() if keep_trained else restored(all_params if s.mode != "router" else list(router_params))):
        for p in all_params:
            p.requires_grad_(False)
        target = model
        if s.mode == "lora":
            from peft import LoraConfig, get_peft_model

            modules, tparams = lora_targets
            cfg = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, target_modules=list(modules),
                             target_parameters=list(tparams) or None, lora_dropout=0.0)
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
            peft_model.merge_and_unload() if keep_trained else peft_model.unload()
    for p in all_params:
        p.grad = None
    return run


def labels_to_recover(points: Sequence[tuple[int, float]], target: float) -> int | None:
    """The smallest label count at which the curve reaches ``target``; ``None`` if never."""
    for labels, metric in points:
        if metric >= target:
            return labels
    return None


# --------------------------------------------------------------------------- tasks → ops
def task_ops(tokenizer, task, *, batch_size: int = 32) -> TaskOps:
    """Build the callables recovery needs from a loaded task (see :class:`TaskOps`)."""
    from moeharden import batching
    from moeharden.tasks.metrics import choice_logprobs, evaluate, generate_greedy

    def loss(model, examples):
        b = batching.encode(tokenizer, examples).to(next(model.parameters()).device)
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        al, at = batching.answer_logits(logits, b.labels)
        return torch.nn.functional.cross_entropy(al.float(), at)

    def metric(model):
        return evaluate(model, tokenizer, task, batch_size=batch_size).value

    @torch.no_grad()
    def embed(model, examples):
        out = []
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            enc = tokenizer([ex.prompt for ex in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()
                   if k in ("input_ids", "attention_mask")}
            h = model(**enc, output_hidden_states=True).hidden_states[-1]          # [B, T, H]
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())   # [B, H] mean-pooled
        return torch.cat(out)

    def uncertainty(model, examples):
        if task.kind == "multiple_choice":
            lp = choice_logprobs(model, tokenizer, examples, batch_size=batch_size)
            return entropy_scores(lp), margin_scores(lp)
        # generation: score the model's own greedy answer (no label needed), token by token
        from dataclasses import replace

        spec = task.spec
        preds = generate_greedy(model, tokenizer, [ex.prompt for ex in examples],
                                max_new_tokens=spec.max_new_tokens if spec else 32,
                                stop=tuple(spec.stop) if spec else ("\n",), batch_size=batch_size)
        ent, mar = [], []
        for i in range(0, len(examples), batch_size):
            chunk = [replace(ex, target=p) for ex, p in zip(examples[i:i + batch_size], preds[i:i + batch_size],
                                                            strict=True)]
            b = batching.encode(tokenizer, chunk).to(next(model.parameters()).device)
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
            sel = (b.labels[:, 1:] != -100).float()                               # [B, T-1] answer positions
            lp = torch.log_softmax(logits, -1)
            h = -(lp.exp() * lp).sum(-1)                                          # [B, T-1] token entropy
            top2 = lp.exp().topk(2, -1).values
            gap = (top2[..., 0] - top2[..., 1]).masked_fill(sel == 0, float("inf"))
            ent.append(((h * sel).sum(1) / sel.sum(1).clamp(min=1)).cpu())
            mar.append((-gap.min(1).values).cpu())
        return torch.cat(ent), torch.cat(mar)

    @torch.no_grad()
    def teacher(model, examples):
        """The full model's own answers (pseudo-labels) and its answer-position distributions."""
        from dataclasses import replace

        if task.kind == "multiple_choice":
            pick = choice_logprobs(model, tokenizer, examples, batch_size=batch_size).argmax(-1).tolist()
            pseudo = [replace(ex, target=ex.choices[j], label=j) for ex, j in zip(examples, pick, strict=True)]
        elif task.kind == "generation":
            spec = task.spec
            preds = generate_greedy(model, tokenizer, [ex.prompt for ex in examples],
                                    max_new_tokens=spec.max_new_tokens if spec else 32,
                                    stop=tuple(spec.stop) if spec else ("\n",), batch_size=batch_size)
            pseudo = [replace(ex, target=p) for ex, p in zip(examples, preds, strict=True)]
        else:
            pseudo = list(examples)
        cache = []
        for ex in pseudo:
            b = batching.encode(tokenizer, [ex]).to(next(model.parameters()).device)
            al, _ = batching.answer_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
                                           b.labels)
            cache.append((ex, torch.log_softmax(al.float(), -1).cpu()))
        return cache

    def distill_loss(model, examples, teachers):
        pseudo = [t[0] for t in teachers]
        b = batching.encode(tokenizer, pseudo).to(next(model.parameters()).device)
        al, _ = batching.answer_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits,
                                       b.labels)
        lt = torch.cat([t[1] for t in teachers]).to(al.device)          # [N, V] teacher log-probs
        ls = torch.log_softmax(al.float(), -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()

    return TaskOps(loss=loss, metric=metric, embed=embed,
                   uncertainty=uncertainty if task.kind in ("multiple_choice", "generation") else None,
                   teacher=teacher, distill_loss=distill_loss)


# --------------------------------------------------------------------------- in scan / verify
DEFAULT_SMALL_BUDGET = 64


def recovery_keeps(data: dict, task: str, target_fraction: float, max_keeps: int = 1) -> list[int]:
    """Keep-counts ≤ E/2 at which the best attacker lost accuracy (retained < target), largest first.

    Falls back to the smallest swept keep-count when pruning lost nothing, so curves always exist.
    """
    E = data["model"]["num_experts"]
    rows = [r for r in data["sweep"] if r["task"] == task and r["method"] != "random" and r["keep"] < E]
    best: dict[int, float] = {}
    for r in rows:
        best[r["keep"]] = max(best.get(r["keep"], float("-inf")), r["retained"])
    lost = sorted((k for k, v in best.items() if v < target_fraction and k <= E // 2), reverse=True)
    if lost:
        return lost[:max_keeps]
    return [min(best)] if best else []


def best_keepset(data: dict, task: str, keep: int) -> tuple[str, dict[int, list[int]]]:
    """The strongest attacker's keep-set at ``keep`` (highest retained), from a scan's keep_sets."""
    rows = [r for r in data["sweep"] if r["task"] == task and r["keep"] == keep and r["method"] != "random"]
    method = max(rows, key=lambda r: r["retained"])["method"]
    ks = data["keep_sets"][method][task][str(keep)]
    return method, {int(layer): ids for layer, ids in ks.items()}


def recovery_suite(model, tokenizer, tasks, data: dict, *, modes: Sequence[str] = ("full",),
                   strategies: Sequence[str] = STRATEGIES, seeds: Sequence[int] = (0, 1, 2),
                   budget: int = DEFAULT_SMALL_BUDGET, rounds: int = 4, steps_per_round: int = 30,
                   lr: float = 3e-4, target_fraction: float = 0.95,
                   keeps: dict[str, list[int]] | None = None) -> dict:
    """Run the re-alignment attack on the strongest pruned models of a scan; returns JSON sections.

    Returns:
        ``{"recovery": rows, "labels_to_recover": {task: {strategy: mean labels or None}},
        "recovery_settings": {...}, "recovery_saving": {task: {...}}}``; a strategy's entry is
        ``None`` unless every seed reached the target within the budget.
    """
    from moeharden.console import progress_bar
    from moeharden.model.registry import moe_layers
    from moeharden.model.routing import mask_experts

    info = moe_layers(model)
    router_params = [li.router_weight for li in info] + [li.router_bias for li in info if li.router_bias is not None]
    full = {t["name"]: t["full"] for t in data["tasks"]}
    metric_of = {t["name"]: t["metric"] for t in data["tasks"]}
    rows, ltr, used_keeps, saving, timing = [], {}, {}, {}, {"select": 0.0, "train": 0.0}
    plan = []
    for t in tasks:
        ks = (keeps or {}).get(t.name) or recovery_keeps(data, t.name, target_fraction)
        used_keeps[t.name] = ks
        for k in ks:
            for mode in modes:
                for strat in (strategies if mode != "distill" else ("random",)):
                    for seed in seeds:
                        plan.append((t, k, mode, strat, seed))
    with progress_bar("re-alignment attack", total=len(plan)) as advance:
        per_task: dict[str, dict[str, list]] = {}
        for t, k, mode, strat, seed in plan:
            _, keep = best_keepset(data, t.name, k)
            ops = task_ops(tokenizer, t)
            s = RecoverySettings(mode=mode, strategy=strat, budget=budget, rounds=rounds,
                                 steps_per_round=steps_per_round, lr=lr, seed=seed)
            run = run_recovery(model, ops, t.train, s, router_params=router_params,
                               mask=lambda keep=keep: mask_experts(model, keep), lora_targets=_lora_targets(info))
            timing["select"] += run.select_seconds
            timing["train"] += run.train_seconds
            name = "distill" if mode == "distill" else strat
            for labels, metric in run.points:
                row = {"task": t.name, "keep": k, "mode": mode, "strategy": name, "seed": seed,
                       "labels": 0 if mode == "distill" else labels, "metric": round(metric, 6)}
                if mode == "distill":
                    row["unlabeled"] = labels
                rows.append(row)
            hib = metric_of[t.name] != "perplexity"
            target = target_fraction * full[t.name] if hib else full[t.name] / target_fraction
            pts = [(lab if mode != "distill" else 0, m if hib else -m) for lab, m in run.points]
            need = labels_to_recover(pts, target if hib else -target)
            if k == used_keeps[t.name][0] and (mode == modes[0] or mode == "distill"):
                per_task.setdefault(t.name, {}).setdefault(name, []).append(need)
            advance()
    for task, by_strat in per_task.items():
        ltr[task] = {s: (round(sum(v) / len(v), 2) if v and all(x is not None for x in v) else None)
                     for s, v in by_strat.items()}
        rnd = ltr[task].get("random")
        active = {s: v for s, v in ltr[task].items() if s not in ("random", "distill") and v is not None}
        if active:
            best = min(active, key=active.get)
            saving[task] = {"best_active": best, "labels": active[best], "random": rnd,
                            "saving_vs_random": None if not rnd else round(1 - active[best] / rnd, 4)}
    return {
        "recovery": rows, "labels_to_recover": ltr, "recovery_saving": saving,
        "recovery_settings": {"modes": list(modes), "strategies": list(strategies), "seeds": list(seeds),
                              "budget": budget, "rounds": rounds, "steps_per_round": steps_per_round, "lr": lr,
                              "target_fraction": target_fraction, "keeps": used_keeps,
                              "labels_axis": "labels used (distill: 0; its examples are in 'unlabeled')"},
        "recovery_timing": {k: round(v, 3) for k, v in timing.items()},
    }


def _lora_targets(info) -> tuple[list[str], list[str]]:
    """LoRA targets: attention projections (module-name suffixes) and the fused 3-D expert tensors
    (peft's ``target_parameters``; only kept experts are ever routed to, so only they matter)."""
    li = info[0]
    params = sorted({f"{li.spec.experts_attr}.{n}" for n, p in li.experts.named_parameters(recurse=False)
                     if p.dim() == 3})
    return ["q_proj", "k_proj", "v_proj", "o_proj"], params


def recovery_for_scan(model, tokenizer, tasks, data: dict, settings) -> dict:
    """`scan --recover`: the attack with mode ``full`` and every strategy, ≥ 3 seeds."""
    return recovery_suite(model, tokenizer, tasks, data, modes=("full",),
                          seeds=tuple(range(settings.seed, settings.seed + settings.recover_seeds)),
                          budget=settings.recover_budget or DEFAULT_SMALL_BUDGET)
