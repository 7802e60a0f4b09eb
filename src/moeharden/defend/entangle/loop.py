"""The entangled training loop: retrain a MoE so that pruning its experts fails sharply.

Objective per step, on one single-task batch of every task (terms in :mod:`.losses`):

    L = λ_T · L_task(full) + λ_R · KL(p_orig ‖ p_θ) + λ_P · mean_S ℓ(θ_S) + λ_U · L_spread
        [+ λ_D · mean_S D(θ_S)] [+ λ_rec · ℓ(θ'_S)]

* ``L_task``: cross-entropy of the answers under the full model.
* ``KL``: keeps the released model's output distribution close to the original's (all positions).
* ``ℓ(θ_S)`` is **bounded**, never raw negative cross-entropy (cheap to undo): multiple choice:
  ``ln C − H(p_S over the choices)`` (0 when the pruned model is at chance; no reward for
  answering wrongly, which would leak the task by inversion); generation / LM: per-token
  ``relu(τ − CE_S)`` with τ = tau_token. The pruned sub-model is never trained to do the task.
* S is drawn from the pools of :mod:`.pools`: attribution-picked keep-sets (recomputed every
  ``recompute_every`` steps as routing moves), random subsets at keep-ratios 1/8..3/4, and
  adversarially searched keep-sets (the attacker's best choice on a batch).
* ``D(θ_S)`` (optional, ``lambda_diverge``): the bounded push of the pruned sub-model's MoE-block
  outputs away from the full model's, relu(ρ − ‖y_S − y_full‖² / mean ‖y_full‖²) per token and
  layer (ρ = ``diverge_ratio``): an expert is made harmful on the tokens its router does not send
  it, so a strict subset corrupts the residual stream (same masked forward as ℓ, no extra pass).
* ``C`` (optional, ``lambda_cancel``): on the full forward, each routed expert's own output is
  pushed away from the routed combination, relu(ρ − ‖E_s − y‖² / mean ‖y‖²) (ρ = ``cancel_ratio``):
  a token's experts disagree strongly and only their weighted sum is right (:func:`pair_cancellation`).
* ``P`` (optional, ``lambda_partition``): every router is pulled toward a fixed, keyed partition
  of the vocabulary, −(1/k) Σ_j log p(e_j(v)) per token of id v (:func:`partition_routing`):
  experts specialise by token, not by task, so every task needs every expert.
* ``L_spread``: per-task load balance, on single-task batches: Σ_layers (E·Σ_e p̄_e² − 1), where p̄
  is the task's mean routing distribution (softmax of the routed experts' logits, as each router
  returns them); 0 when uniform. Every pruned sub-model (and training keep-count) is one the
  family's routing can run with: with routing groups, the same count from every group.
* optional TAR-style first-order simulated recovery: ``recovery_steps`` attacker steps on the
  pruned sub-model (on labels — cross-entropy — or, like the ``distill`` attack, on the full
  model's outputs; plain SGD or sign steps, which is what Adam's early steps are), then ℓ of
  the updated sub-model on a *different* batch after every step; the mean of those gradients
  is added at θ (first order). Keep-sets for it come from the attribution and adversarial
  pools at keep ≤ ``recovery_keep_max`` · E — the attacker's choices.

The last ``polish_steps`` steps train the full model only (task, retain, spread terms).
``init: scratch`` trains the release from freshly initialised weights (the model class's own
initialiser under ``seed``) with the original as the KL teacher — entangled from its first step.
``expert_lr_scale`` scales the routed experts' learning rate; at 0 they stay as they start (with
``init: scratch``: the class's fresh initialisation, so a pruned copy's experts are a draw of what
the ``shared`` reference starts from — the limit of a weight-level defense, docs §4.1); everything
else trains at ``lr``.

Checkpoints every ``checkpoint_every`` steps (:mod:`.resume`) allow ``--resume``, and so does a
Ctrl-C: it is held until the step in progress ends, which is then checkpointed
(:class:`~moeharden.io.interrupt.HeldInterrupt`; one process only); per-step
randomness is derived from (seed, step), so a resumed run gives the same weights as an
uninterrupted one. The loop is split as setup (:func:`_setup`) / one task's micro-batch
(:func:`_task_unit`) / one optimizer step (:func:`_train_step`) / the loop (:func:`entangle_model`).
"""

from __future__ import annotations

import copy
import random
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from moeharden.defend.entangle.losses import (
    BlockTap,
    ExpertsTap,
    RouterTap,
    kl_retain,
    pair_cancellation,
    partition_routing,
    pruned_divergence,
    pruned_hinge,
    simulated_recovery,
    spread_loss,
)
from moeharden.defend.entangle.pools import refresh_pools, sample_keepset, train_keeps
from moeharden.defend.entangle.recipe import EntangleRecipe
from moeharden.defend.entangle.resume import (
    checkpoint_run,
    claim_checkpoint_dir,
    has_checkpoint,
    load_checkpoint,
    read_state,
    run_fingerprint,
    save_checkpoint,
)
from moeharden.errors import CheckpointError, InputError, UsageError
from moeharden.io.interrupt import HeldInterrupt
from moeharden.io.ranks import barrier, current, sum_
from moeharden.model.keepset import valid_keep
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers, routing_groups
from moeharden.tasks.encoding import answer_logits, encode


@dataclass
class _Trainer:
    """Everything one entangle run holds: the models, optimizer, pools and loss history."""

    recipe: EntangleRecipe
    tokenizer: Any
    tasks: list
    accel: Any
    model: Any               # accelerate-prepared (what forward and backward go through)
    base: Any                # the unwrapped module (what masks and checkpoints act on)
    teacher: Any             # frozen copy of the original: the KL target
    opt: Any
    sched: Any
    info: list               # moe_layers(base)
    layers: list[int]
    num_experts: int
    keeps: list[int]
    groups: int              # routing groups (keep-sets take the same count from each)
    attr_pool: dict = field(default_factory=dict)
    adv_pool: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def _step_rng(seed: int, step: int) -> random.Random:
    return random.Random(seed * 1_000_003 + step)


def _setup(model, tokenizer, tasks, recipe: EntangleRecipe) -> _Trainer:
    """Freeze a teacher copy, make every float parameter trainable, build optimizer and schedule."""
    from accelerate import Accelerator

    accel = Accelerator(mixed_precision=recipe.mixed_precision, cpu=not torch.cuda.is_available())
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if recipe.init == "scratch":            # entangle from the first step: fresh weights, the original as teacher
        from moeharden.attack.references import fresh_model

        with torch.no_grad():
            model.load_state_dict(fresh_model(model, recipe.seed).state_dict())
    model.train()
    experts = {id(p) for li in moe_layers(model) for p in li.experts.parameters()}
    scale = recipe.expert_lr_scale
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point() and not (scale == 0 and id(p) in experts))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups: list = trainable
    if scale not in (0, 1):          # the routed experts at a scaled learning rate (one group otherwise)
        groups = [{"params": [p for p in trainable if id(p) not in experts]},
                  {"params": [p for p in trainable if id(p) in experts], "lr": recipe.lr * scale}]
    opt = torch.optim.AdamW(groups, lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: max(0.0, 1.0 - s / recipe.steps)) if recipe.lr_schedule == "linear" else (lambda s: 1.0))
    if current().size > 1:
        # several processes share each step's micro-batches and sum their gradients (_train_step):
        # no DDP wrapper, whose per-backward all-reduce needs the same backward count everywhere
        model.to(accel.device)
        opt = accel.prepare(opt)            # the fp16 loss scaler lives in the prepared optimizer
    else:
        model, opt = accel.prepare(model, opt)
    base = accel.unwrap_model(model)
    teacher.to(accel.device)
    info = moe_layers(base)
    E, spec = info[0].num_experts, info[0].spec
    keeps = train_keeps(E, recipe.keep_ratios, lambda k: valid_keep(spec, base.config, k))
    if not keeps:
        raise InputError(f"None of the recipe's keep_ratios {list(recipe.keep_ratios)} gives a number of experts "
                         f"below {E} that {spec.name} routing can run with (routing groups, minimum kept).",
                         hint="Add larger keep_ratios to the recipe.")
    return _Trainer(recipe, tokenizer, list(tasks), accel, model, base, teacher, opt, sched, info,
                    [li.layer for li in info], E, keeps, routing_groups(spec, base.config))


def _resume(tr: _Trainer, latest: Path) -> int:
    """Load the latest checkpoint into ``tr``; returns the step to continue from.

    Raises:
        CheckpointError: a damaged or foreign checkpoint (:func:`~.resume.load_checkpoint`; ``tr``
            is then untouched).
    """
    state = load_checkpoint(latest, tr.base, tr.opt, steps=tr.recipe.steps, layers=tr.layers,
                            num_experts=tr.num_experts, tasks=[t.name for t in tr.tasks])
    with warnings.catch_warnings():   # replaying the schedule before any optimizer step is intended
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(state["step"]):   # the schedule is a pure function of the step
            tr.sched.step()
    tr.history, tr.attr_pool, tr.adv_pool = state["history"], state["attr_pool"], state["adv_pool"]
    return state["step"]


@dataclass
class _Draws:
    """One micro-batch's random choices: its examples, pruned sub-models and simulated attack."""

    examples: list
    subsets: list                      # keep-sets of the pruned terms
    recovery: tuple | None = None      # (keep-set, held-out examples, inner steps) of the recovery term


def _unit_draws(tr: _Trainer, t, step: int, rng: random.Random) -> _Draws:
    """Every random draw of one micro-batch of task ``t``, in the order one process always made them.

    Every process makes the draws of every micro-batch (cheap, no model call), so the stream of
    choices is the single-process one whichever process computes the micro-batch.
    """
    r = tr.recipe
    ex = rng.sample(t.train, min(r.batch_size, len(t.train)))
    attr, adv = tr.attr_pool.get(t.name, []), tr.adv_pool.get(t.name, [])
    polish = step >= r.steps - r.polish_steps          # the last steps: the full model only
    subsets = [sample_keepset(rng, r, attr, adv, tr.layers, tr.num_experts, tr.keeps, tr.groups)[1]
               for _ in range(0 if polish else r.subsets_per_step)]
    draws = _Draws(ex, subsets)
    if (r.recovery_term and not polish and step % r.recovery_every == 0
            and (r.recovery_tasks is None or t.name in r.recovery_tasks)):
        pool = [ks for ks in attr + adv if len(ks[tr.layers[0]]) <= r.recovery_keep_max * tr.num_experts]
        if pool:
            keep = rng.choice(pool)
            held = rng.sample(t.train, min(r.batch_size, len(t.train)))
            draws.recovery = (keep, held, r.recovery_inner[step // r.recovery_every % len(r.recovery_inner)])
    return draws


def _task_unit(tr: _Trainer, draws: _Draws, logs: dict[str, float], n_units: int) -> None:
    """Forward/backward every term on one micro-batch; gradients accumulate, ``logs`` add up."""
    r, accel, model, device = tr.recipe, tr.accel, tr.model, tr.accel.device
    batch = encode(tr.tokenizer, draws.examples).to(device)
    with torch.no_grad():
        t_logits = tr.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with RouterTap(tr.info) as tap, BlockTap(tr.info) as blocks, accel.autocast(), \
            (ExpertsTap(tr.info) if r.lambda_cancel else nullcontext()) as etap:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits   # [B, T, V]
        al, at = answer_logits(logits, batch.labels)
        l_task = F.cross_entropy(al.float(), at)
        l_ret = kl_retain(logits, t_logits, batch.attention_mask)
        l_spr = spread_loss(tap.logits, batch.attention_mask)
        loss = r.lambda_task * l_task + r.lambda_retain * l_ret + r.lambda_spread * l_spr
        if r.lambda_partition:
            l_par = partition_routing(tap.logits, batch.input_ids, batch.attention_mask, r.seed)
            loss = loss + r.lambda_partition * l_par
            logs["partition"] = logs.get("partition", 0.0) + float(l_par.detach()) / n_units
    if r.lambda_cancel:
        with accel.autocast():
            l_can = pair_cancellation(etap.taps, batch.attention_mask, r.cancel_ratio)
        loss = loss + r.lambda_cancel * l_can
        logs["cancel"] = logs.get("cancel", 0.0) + float(l_can.detach()) / n_units
    accel.backward(loss / n_units)
    full_blocks = [y.detach() for y in blocks.outputs]
    l_prune = l_div = 0.0
    for keep in draws.subsets:
        with mask_experts(tr.base, keep), BlockTap(tr.info) as pblocks, accel.autocast():
            lp = pruned_hinge(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                              batch, r)
            ld = (pruned_divergence(pblocks.outputs, full_blocks, batch.attention_mask, r.diverge_ratio)
                  if r.lambda_diverge else torch.zeros(()))
        accel.backward((r.lambda_prune * lp + r.lambda_diverge * ld) / (r.subsets_per_step * n_units))
        l_prune += float(lp.detach()) / r.subsets_per_step
        l_div += float(ld.detach()) / r.subsets_per_step
    if draws.recovery is not None:
        keep, held_ex, inner = draws.recovery
        held = encode(tr.tokenizer, held_ex).to(device)
        logs["recovery"] += simulated_recovery(model, tr.base, batch, held, keep, r, accel, n_units, inner,
                                               logits.detach()) / n_units
    logs["task"] += float(l_task.detach()) / n_units
    logs["retain"] += float(l_ret.detach()) / n_units
    logs["spread"] += float(l_spr.detach()) / n_units
    logs["prune"] += l_prune / n_units
    if r.lambda_diverge:
        logs["diverge"] = logs.get("diverge", 0.0) + l_div / n_units


def _train_step(tr: _Trainer, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` batches of every task; returns the mean losses."""
    r, accel, ranks = tr.recipe, tr.accel, current()
    rng = _step_rng(r.seed, step)
    torch.manual_seed(r.seed * 1_000_003 + step)
    if step % r.recompute_every == 0 or not tr.attr_pool:
        tr.base.eval()
        tr.attr_pool, tr.adv_pool = refresh_pools(tr.base, tr.tokenizer, tr.tasks, tr.layers, tr.num_experts,
                                                  tr.keeps, r, rng, accel.device, tr.groups)
        tr.model.train()
    logs = {"task": 0.0, "retain": 0.0, "spread": 0.0, "prune": 0.0}
    if r.recovery_term:
        logs["recovery"] = 0.0
    if ranks.size > 1:      # the same keys in every process, computed a micro-batch or not
        logs.update({k: 0.0 for k, on in (("cancel", r.lambda_cancel), ("diverge", r.lambda_diverge),
                                          ("partition", r.lambda_partition)) if on})
    n_units = len(tr.tasks) * r.grad_accum      # micro-batches whose gradients one step sums
    units = [_unit_draws(tr, t, step, rng) for _ in range(r.grad_accum) for t in tr.tasks]
    for i, draws in enumerate(units):      # process p computes micro-batches p, p + N, ...
        if i % ranks.size == ranks.rank:
            _task_unit(tr, draws, logs, n_units)
    if ranks.size > 1:                     # the step's gradient and losses: sums over all micro-batches
        params = [p for p in tr.base.parameters() if p.requires_grad]
        seen = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float64)
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        sum_([p.grad for p in params] + [seen])
        for p, n in zip(params, seen.tolist(), strict=True):
            if n == 0:              # no process touched it: no gradient, as in one process (no decay step)
                p.grad = None
        keys = sorted(logs)
        totals = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        sum_([totals])
        logs = {k: float(v) for k, v in zip(keys, totals, strict=True)}
    if r.grad_clip:
        accel.clip_grad_norm_(tr.model.parameters(), r.grad_clip)
    tr.opt.step()
    tr.sched.step()
    tr.opt.zero_grad(set_to_none=True)
    return logs


def entangle_model(model, tokenizer, tasks, recipe: EntangleRecipe, *, ckpt_dir: Path | None = None,
                   resume: bool = False, resume_if_same: bool = False, stop_after: int | None = None,
                   progress=None) -> tuple[list[dict], int]:
    """Train ``model`` in place with the entanglement objective; returns (loss history, steps done).

    Args:
        model: a loaded model of a supported MoE family.
        tokenizer: its tokenizer.
        tasks: loaded tasks (their ``train`` split is the training data, ``attribution`` the
            calibration for keep-set pools).
        recipe: the training knobs.
        ckpt_dir: where resumable checkpoints go (``None`` = no checkpoints).
        resume: continue from the checkpoint in ``ckpt_dir`` when there is one; it must have been
            written by a run of the same weights, tokenizer, tasks, recipe and process count
            (:func:`~moeharden.defend.entangle.resume.run_fingerprint`).
        resume_if_same: continue from the checkpoint only if it was written by such a run, and
            start again otherwise (the demo: an interrupted demo picks up where it stopped).
        stop_after: stop (with a checkpoint) after this many steps in total, as an interruption would.
        progress: called as ``progress(1, **losses)`` after every step.
    Returns:
        ``(history, steps done)``; history holds one ``{"step", loss terms...}`` row per step.
    Raises:
        InputError: a task without training examples, or a ``ckpt_dir`` holding data moeharden did
            not write. UsageError: ``resume`` and the checkpoint was written by another run.
            CheckpointError: ``resume`` and the checkpoint is damaged, or its files are links
            (with ``resume_if_same`` such a checkpoint is started again). UnsupportedModelError.
    """
    empty = [t.name for t in tasks if not t.train]
    if empty:
        raise InputError(f"Task(s) {', '.join(empty)} have no training examples; entangle needs a train split.")
    if ckpt_dir is not None:        # before any work: never write into (and later delete) a foreign directory
        if current().main:
            claim_checkpoint_dir(ckpt_dir)
        barrier()
    latest = ckpt_dir / "latest" if ckpt_dir is not None else None
    run = run_fingerprint(model, tokenizer, tasks, recipe, current().size) if latest is not None else None
    same = latest is not None and has_checkpoint(latest) and checkpoint_run(latest) == run
    if resume and latest is not None and has_checkpoint(latest) and not same:
        read_state(latest)          # one that cannot be read says why (a link, a missing file, not JSON)
        raise UsageError(f"--resume: the checkpoint in {ckpt_dir} was written by another run (other weights, "
                         "tasks, recipe, process count or versions), or before runs were fingerprinted.",
                         hint="Run without --resume to start again, or pass the --checkpoint-dir of this run.")
    tr = _setup(model, tokenizer, tasks, recipe)
    start = 0
    if (resume or resume_if_same) and same:
        try:
            start = _resume(tr, latest)
        except CheckpointError as err:      # checked before anything was loaded: tr is as _setup left it
            if resume:
                raise
            from rich.markup import escape

            from moeharden.console import info

            info(f"Starting again: {escape(err.message)}")     # resume_if_same (the demo): its own, damaged
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    # one process with checkpoints: a Ctrl-C ends the step in progress and checkpoints it (a second
    # one stops at once); several processes stop where they are (they would each stop at another step)
    with HeldInterrupt(enabled=latest is not None and current().size == 1) as stop:
        for step in range(start, end):
            logs = _train_step(tr, step)
            tr.history.append({"step": step + 1, **{k: round(v, 5) for k, v in logs.items()}})
            if progress is not None:
                progress(1, **logs)
            done = step + 1
            if latest is not None and tr.accel.is_main_process and (
                    done % recipe.checkpoint_every == 0 or done == end or stop.requested):
                save_checkpoint(latest, tr.base, tr.opt, {"step": done, "history": tr.history, "run": run,
                                                          "attr_pool": tr.attr_pool, "adv_pool": tr.adv_pool})
            stop.raise_if_requested()
    tr.model.eval()
    return tr.history, max(end, start)
