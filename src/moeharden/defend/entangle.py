"""`moeharden entangle`: retrain a MoE so that pruning its experts fails sharply.

Objective per step, on one single-task batch of every task:

    L = λ_T · L_task(full) + λ_R · KL(p_orig ‖ p_θ) + λ_P · mean_S ℓ(θ_S) + λ_U · L_spread [+ λ_rec · ℓ(θ'_S)]

* ``L_task``: cross-entropy of the answers under the full model.
* ``KL``: keeps the released model's output distribution close to the original's (all positions).
* ``ℓ(θ_S)`` is **bounded**, never raw negative cross-entropy (cheap to undo): multiple choice:
  ``ln C − H(p_S over the choices)`` (0 when the pruned model is at chance; no reward for
  answering wrongly, which would leak the task by inversion); generation / LM: per-token
  ``relu(τ − CE_S)`` with τ = tau_token. The pruned sub-model is never trained to do the task.
* S is drawn from (a) the keep-sets every attribution method of ``scan`` picks for that task,
  recomputed every ``recompute_every`` steps as routing moves; (b) random subsets at keep-ratios
  1/8..3/4; (c) an adversarially searched keep-set: a hill-climb over single-expert swaps that
  minimises the pruned model's task loss (the attacker's best choice on this batch).
* ``L_spread``: per-task load balance, on single-task batches: Σ_layers (E·Σ_e p̄_e² − 1), where p̄
  is the task's mean routing distribution (softmax of router logits); 0 when uniform.
* optional TAR-style first-order simulated recovery: ``recovery_steps`` attacker steps on the
  pruned sub-model (on labels — cross-entropy — or, like the ``distill`` attack, on the full
  model's outputs; plain SGD or sign steps, which is what Adam's early steps are), then ℓ of
  the updated sub-model on a *different* batch after every step; the mean of those gradients
  is added at θ (first order). Keep-sets for it come from the attribution and adversarial
  pools at keep ≤ ``recovery_keep_max`` · E — the attacker's choices.

Checkpoints every ``checkpoint_every`` steps (weights, optimizer state, keep-set pools, loss
history) allow ``--resume``; per-step randomness is derived from (seed, step), so a resumed run
gives the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeharden import __version__
from moeharden.errors import ConfigFileError, InputError, UsageError

SCHEMA = "moeharden.entangle/1"


class EntangleRecipe(BaseModel):
    """Knobs of entangled training (YAML, ``version: 1``). See the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    seed: int = 0
    steps: int = Field(400, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    lr_schedule: Literal["constant", "linear"] = "linear"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = 1.0
    grad_accum: int = Field(1, gt=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    lambda_task: float = Field(1.0, ge=0)
    lambda_retain: float = Field(1.0, ge=0)
    lambda_prune: float = Field(1.0, ge=0)
    lambda_spread: float = Field(0.5, ge=0)
    tau_token: float = Field(3.0, gt=0)
    subsets_per_step: int = Field(2, ge=1)
    keep_ratios: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    sources: dict[Literal["attribution", "random", "adversarial"], float] = {
        "attribution": 0.5, "random": 0.3, "adversarial": 0.2}
    attribution_methods: tuple[str, ...] = ("frequency", "gate", "reap", "ean", "soft", "contrastive")
    recompute_every: int = Field(50, gt=0)
    adversarial_swaps: int = Field(12, ge=1)
    recovery_term: bool = False
    recovery_lr: float = Field(0.01, gt=0)
    lambda_recovery: float = Field(0.5, ge=0)
    recovery_steps: int = Field(1, ge=1)
    recovery_update: Literal["sgd", "sign"] = "sgd"
    recovery_inner: tuple[Literal["labels", "distill"], ...] = ("labels",)
    recovery_tasks: tuple[str, ...] | None = None      # None: every task
    recovery_every: int = Field(1, ge=1)
    recovery_keep_max: float = Field(0.5, gt=0, le=1)
    checkpoint_every: int = Field(100, gt=0)


def load_recipe(path: Path | None = None, **overrides: Any) -> EntangleRecipe:
    """Default recipe < YAML file < overrides (``None`` overrides are ignored, falsy values are not).

    Raises:
        ConfigFileError: unreadable YAML or invalid values (all problems listed at once).
    """
    text = (Path(path).read_text() if path is not None
            else resources.files("moeharden").joinpath("data/entangle_recipe.yaml").read_text())
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigFileError(f"Recipe {path} is not valid YAML: {err}.") from None
    if not isinstance(raw, dict):
        raise ConfigFileError(f"Recipe {path} must be a mapping of settings.")
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return EntangleRecipe(**raw)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigFileError(f"Recipe {path or '(default)'} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint="Fix the listed fields; see src/moeharden/data/entangle_recipe.yaml.") from None


# --------------------------------------------------------------------------- loss pieces
def kl_retain(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-pad positions of KL(teacher ‖ student); logits ``[B, T, V]``, mask ``[B, T]``."""
    lt = torch.log_softmax(teacher.float(), -1)
    ls = torch.log_softmax(student.float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)            # [B, T]
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1)


def pruned_hinge(logits: torch.Tensor, batch, recipe: EntangleRecipe) -> torch.Tensor:
    """Bounded anti-task term ``relu(τ − CE_S)`` for a pruned sub-model's logits."""
    from moeharden.tasks.encoding import answer_logits, choice_logprobs

    if batch.choice_ids is not None:
        # multiple choice: push the distribution over the choices to uniform (maximum entropy).
        # Bounded (0 at uniform) and, unlike a hinge on the correct choice's CE, it gives no
        # incentive to answer *wrongly* — a below-chance model leaks the task by inversion.
        lp = torch.log_softmax(choice_logprobs(logits, batch), -1)      # [B, C]
        ent = -(lp.exp() * lp).sum(-1)
        return (math.log(lp.shape[1]) - ent).mean()
    al, at = answer_logits(logits, batch.labels)
    ce = F.cross_entropy(al.float(), at, reduction="none")       # [N] per answer token
    return F.relu(recipe.tau_token - ce).mean()


def spread_loss(router_inputs: Sequence[tuple[torch.Tensor, Any]], mask: torch.Tensor) -> torch.Tensor:
    """Σ_layers (E·Σ_e p̄_e² − 1) over one single-task batch (0 when routing is uniform).

    Args:
        router_inputs: per MoE layer, (router input ``[B·T, H]`` with grad, MoELayer).
        mask: ``[B, T]`` attention mask (padding excluded).
    """
    total = torch.zeros((), dtype=torch.float32)
    keep = mask.reshape(-1).bool()
    for x, li in router_inputs:
        logits = F.linear(x.reshape(-1, x.shape[-1])[keep], li.router_weight, li.router_bias)
        pbar = torch.softmax(logits.float(), -1).mean(0)          # [E]
        total = total + (pbar.numel() * (pbar ** 2).sum() - 1.0)
    return total


class _RouterTap:
    """Captures each router's input (with grad) during a forward pass."""

    def __init__(self, layers):
        self.layers = layers
        self.inputs: list[tuple[torch.Tensor, Any]] = []
        self.handles = []

    def __enter__(self):
        for li in self.layers:
            def pre(module, args, kwargs, li=li):
                x = args[0] if args else next(iter(kwargs.values()))
                self.inputs.append((x, li))
            self.handles.append(li.router.register_forward_pre_hook(pre, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


# --------------------------------------------------------------------------- keep-set pools
def train_keeps(num_experts: int, ratios: Sequence[float]) -> list[int]:
    """Keep-counts for training: round(r·E) for each ratio, within 1..E−1, deduplicated."""
    return sorted({min(max(round(r * num_experts), 1), num_experts - 1) for r in ratios})


@torch.no_grad()
def attribution_pool(model, tokenizer, tasks, layers: list[int], num_experts: int, keeps: Sequence[int],
                     methods: Sequence[str], batch_size: int = 32) -> dict[str, list[dict[int, list[int]]]]:
    """The keep-sets every observation-based attribution method picks, per task and keep-count."""
    from moeharden.attack.attribution import contrastive_scores, keep_sets, observed_scores, routing_stats

    stats = {t.name: routing_stats(model, tokenizer, t.calibration_texts(), layers, num_experts, batch_size)
             for t in tasks}
    pool: dict[str, list[dict[int, list[int]]]] = {}
    for t in tasks:
        scores = observed_scores(stats[t.name])
        scores["contrastive"] = contrastive_scores(stats[t.name], [stats[o.name] for o in tasks if o.name != t.name])
        sets = []
        for m in methods:
            for k in keeps:
                ks = keep_sets(scores[m], layers, k)
                if ks not in sets:
                    sets.append(ks)
        pool[t.name] = sets
    return pool


@torch.no_grad()
def adversarial_keepset(model, batch, start: dict[int, list[int]], num_experts: int, swaps: int,
                        rng: random.Random) -> dict[int, list[int]]:
    """Hill-climb over single-expert swaps to the keep-set whose pruned model has the lowest task CE.

    This is the attacker's best response on this batch among the neighbours of ``start``.
    """
    from moeharden.model.routing import mask_experts
    from moeharden.tasks.encoding import answer_logits

    def ce(keep):
        with mask_experts(model, keep):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        al, at = answer_logits(logits, batch.labels)
        return float(F.cross_entropy(al.float(), at))

    best, best_ce = {k: list(v) for k, v in start.items()}, ce(start)
    layers = sorted(best)
    for _ in range(swaps):
        layer = rng.choice(layers)
        kept = best[layer]
        out_ids = [e for e in range(num_experts) if e not in kept]
        if not out_ids:
            continue
        cand = {k: list(v) for k, v in best.items()}
        cand[layer] = sorted([e for e in kept if e != rng.choice(kept)] + [rng.choice(out_ids)])
        if len(cand[layer]) != len(kept):
            continue
        c = ce(cand)
        if c < best_ce:
            best, best_ce = cand, c
    return best


def sample_keepset(rng: random.Random, recipe: EntangleRecipe, attr: list, adv: list, layers: list[int],
                   num_experts: int, keeps: Sequence[int]) -> tuple[str, dict[int, list[int]]]:
    """Draw one pruned sub-model S: attribution-picked, random, or adversarial (by recipe weights)."""
    sources = [s for s, w in recipe.sources.items() if w > 0 and (s == "random" or (attr if s == "attribution" else adv))]
    weights = [recipe.sources[s] for s in sources]
    src = rng.choices(sources, weights=weights)[0]
    if src == "attribution":
        return src, rng.choice(attr)
    if src == "adversarial":
        return src, rng.choice(adv)
    k = rng.choice(list(keeps))
    return src, {layer: sorted(rng.sample(range(num_experts), k)) for layer in layers}


# --------------------------------------------------------------------------- checkpoints
def _save_ckpt(ckpt_dir: Path, model, opt, state: dict) -> None:
    """Atomically write weights, optimizer state and loop state for --resume."""
    from safetensors.torch import save_file, save_model

    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in osd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}))
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    tmp.rename(ckpt_dir)


def _load_ckpt(ckpt_dir: Path, model, opt) -> dict:
    from safetensors.torch import load_file, load_model

    load_model(model, str(ckpt_dir / "model.safetensors"))
    state = json.loads((ckpt_dir / "state.json").read_text())
    flat = load_file(str(ckpt_dir / "optimizer.safetensors"))
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": state.pop("param_groups")})
    return state


def _keys_to_int(pools: dict) -> dict:
    return {t: [{int(k): v for k, v in ks.items()} for ks in sets] for t, sets in pools.items()}


# --------------------------------------------------------------------------- the loop
class EntangleResult(BaseModel):
    """What `entangle` returns: where the checkpoint is, whether it finished, the last losses."""

    model_config = ConfigDict(frozen=True)
    out: str | None
    steps_done: int
    completed: bool
    seconds: float
    last: dict[str, float] = {}

    def to_dict(self) -> dict:
        return self.model_dump()


def _step_rng(seed: int, step: int) -> random.Random:
    return random.Random(seed * 1_000_003 + step)


def entangle_model(model, tokenizer, tasks, recipe: EntangleRecipe, *, ckpt_dir: Path | None = None,
                   resume: bool = False, stop_after: int | None = None, progress=None) -> tuple[list[dict], int]:
    """Train ``model`` in place with the entanglement objective; returns (loss history, steps done).

    Args:
        tasks: loaded tasks (their ``train`` split is the training data, ``attribution`` the
            calibration for keep-set pools).
        ckpt_dir: where resumable checkpoints go (``None`` = no checkpoints).
        stop_after: stop (with a checkpoint) after this many steps in total, as an interruption would.
    """
    import copy

    from accelerate import Accelerator

    from moeharden.model.registry import moe_layers
    from moeharden.model.routing import mask_experts
    from moeharden.tasks.encoding import answer_logits, encode

    empty = [t.name for t in tasks if not t.train]
    if empty:
        raise InputError(f"Task(s) {', '.join(empty)} have no training examples; entangle needs a train split.")
    accel = Accelerator(mixed_precision=recipe.mixed_precision, cpu=not torch.cuda.is_available())
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    model.train()
    for p in model.parameters():
        p.requires_grad_(p.is_floating_point())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr,
                            weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: max(0.0, 1.0 - s / recipe.steps)) if recipe.lr_schedule == "linear" else (lambda s: 1.0))
    model, opt = accel.prepare(model, opt)
    base = accel.unwrap_model(model)
    teacher.to(accel.device)
    info = moe_layers(base)
    layers, E = [li.layer for li in info], info[0].num_experts
    keeps = train_keeps(E, recipe.keep_ratios)
    history: list[dict] = []
    attr_pool: dict = {}
    adv_pool: dict = {}
    start = 0
    latest = ckpt_dir / "latest" if ckpt_dir is not None else None
    if resume and latest is not None and (latest / "state.json").exists():
        state = _load_ckpt(latest, base, opt)
        start, history = state["step"], state["history"]
        import warnings

        with warnings.catch_warnings():   # replaying the schedule before any optimizer step is intended
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(start):        # the schedule is a pure function of the step
                sched.step()
        attr_pool, adv_pool = _keys_to_int(state["attr_pool"]), _keys_to_int(state["adv_pool"])
    device = accel.device
    end = recipe.steps if stop_after is None else min(recipe.steps, stop_after)
    for step in range(start, end):
        # each process of a multi-GPU run draws its own batches (process 0 = the single-process run)
        rng = _step_rng(recipe.seed + 7919 * accel.process_index, step)
        torch.manual_seed(recipe.seed * 1_000_003 + step)
        if step % recipe.recompute_every == 0 or not attr_pool:
            base.eval()
            attr_pool = attribution_pool(base, tokenizer, tasks, layers, E, keeps, recipe.attribution_methods,
                                         recipe.batch_size)
            adv_pool = {}
            for t in tasks:
                ex = rng.sample(t.attribution, min(recipe.batch_size, len(t.attribution)))
                b = encode(tokenizer, ex).to(device)
                adv_pool[t.name] = [adversarial_keepset(base, b, rng.choice([s for s in attr_pool[t.name]
                                                                             if len(s[layers[0]]) == k]),
                                                        E, recipe.adversarial_swaps, rng)
                                    for k in keeps if k <= E // 2]
            model.train()
        logs = {"task": 0.0, "retain": 0.0, "spread": 0.0, "prune": 0.0}
        if recipe.recovery_term:
            logs["recovery"] = 0.0
        n_units = len(tasks) * recipe.grad_accum      # micro-batches whose gradients one step sums
        for t in [t for _ in range(recipe.grad_accum) for t in tasks]:
            ex = rng.sample(t.train, min(recipe.batch_size, len(t.train)))
            batch = encode(tokenizer, ex).to(device)
            with torch.no_grad():
                t_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            with _RouterTap(info) as tap, accel.autocast():
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                al, at = answer_logits(logits, batch.labels)
                l_task = F.cross_entropy(al.float(), at)
                l_ret = kl_retain(logits, t_logits, batch.attention_mask)
                l_spr = spread_loss(tap.inputs, batch.attention_mask)
                loss = recipe.lambda_task * l_task + recipe.lambda_retain * l_ret + recipe.lambda_spread * l_spr
            accel.backward(loss / n_units)
            l_prune = 0.0
            for _ in range(recipe.subsets_per_step):
                _, keep = sample_keepset(rng, recipe, attr_pool.get(t.name, []), adv_pool.get(t.name, []),
                                         layers, E, keeps)
                with mask_experts(base, keep), accel.autocast():
                    lp = pruned_hinge(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits,
                                      batch, recipe)
                accel.backward(recipe.lambda_prune * lp / (recipe.subsets_per_step * n_units))
                l_prune += float(lp.detach()) / recipe.subsets_per_step
            if (recipe.recovery_term and step % recipe.recovery_every == 0
                    and (recipe.recovery_tasks is None or t.name in recipe.recovery_tasks)):
                pool = [ks for ks in attr_pool.get(t.name, []) + adv_pool.get(t.name, [])
                        if len(ks[layers[0]]) <= recipe.recovery_keep_max * E]
                if pool:
                    keep = rng.choice(pool)
                    held = encode(tokenizer, rng.sample(t.train, min(recipe.batch_size, len(t.train)))).to(device)
                    inner = recipe.recovery_inner[step // recipe.recovery_every % len(recipe.recovery_inner)]
                    logs["recovery"] += _recovery_term(
                        model, base, batch, held, keep, recipe, accel, n_units, inner, logits.detach()) / n_units
            logs["task"] += float(l_task.detach()) / n_units
            logs["retain"] += float(l_ret.detach()) / n_units
            logs["spread"] += float(l_spr.detach()) / n_units
            logs["prune"] += l_prune / n_units
        if recipe.grad_clip:
            accel.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": step + 1, **{k: round(v, 5) for k, v in logs.items()}})
        if progress is not None:
            progress(1, **logs)
        done = step + 1
        if ckpt_dir is not None and accel.is_main_process and (done % recipe.checkpoint_every == 0 or done == end):
            _save_ckpt(latest, base, opt, {"step": done, "history": history,
                                           "attr_pool": attr_pool, "adv_pool": adv_pool})
    model.eval()
    return history, max(end, start)


def _recovery_term(model, base, batch, held, keep, recipe: EntangleRecipe, accel, n_units: int, inner: str,
                   full_logits: torch.Tensor) -> float:
    """TAR-style first-order term: simulate the attacker re-aligning the pruned model, penalise what it recovers.

    ``recovery_steps`` attacker steps on ``batch`` (``inner`` = "labels": cross-entropy of the
    answers; "distill": KL from the full model's outputs, no labels); after each, the bounded ℓ of
    the updated sub-model on ``held`` (other examples) is back-propagated and its gradient — taken
    at the updated weights — is added at θ. θ is restored exactly afterwards.
    """
    from moeharden.model.routing import mask_experts
    from moeharden.tasks.encoding import answer_logits

    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    orig = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    total = 0.0
    n = recipe.recovery_steps
    for _ in range(n):
        with mask_experts(base, keep), accel.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if inner == "distill":
                atk = kl_retain(logits, full_logits, batch.attention_mask)
            else:
                al, at = answer_logits(logits, batch.labels)
                atk = F.cross_entropy(al.float(), at)
        grads = torch.autograd.grad(atk, params, allow_unused=True)
        with torch.no_grad():                           # θ_k+1 = θ_k − α·update(∇ attacker loss)
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(recipe.recovery_lr * (g.sign() if recipe.recovery_update == "sign" else g))
        with mask_experts(base, keep), accel.autocast():
            lp = pruned_hinge(model(input_ids=held.input_ids, attention_mask=held.attention_mask).logits,
                              held, recipe)
        accel.backward(recipe.lambda_recovery * lp / (n * n_units))   # gradient at θ_k+1, applied at θ
        total += float(lp.detach()) / n
    with torch.no_grad():
        for p, o, s in zip(params, orig, saved, strict=True):
            p.copy_(o)
            if s is not None:
                p.grad = s if p.grad is None else p.grad + s
    return total


def entangle(ckpt: str, out: Path, *, tasks: Sequence[str] | None = None, recipe_path: Path | None = None,
             overrides: dict[str, Any] | None = None, resume: bool = False, stop_after: int | None = None,
             checkpoint_dir: Path | None = None, limit: int | None = None,
             trust_remote_code: bool = False) -> EntangleResult:
    """Load a checkpoint, entangle it, and write an ordinary HF checkpoint plus ``entangle.json``.

    Raises:
        CheckpointError, UnsupportedModelError, TaskError, ConfigFileError, UsageError.
    """
    from moeharden.console import progress_bar
    from moeharden.io.shards import atomic_output_dir
    from moeharden.model.checkpoint import checkpoint_digest, load_model, load_tokenizer, resolve_checkpoint
    from moeharden.tasks.loading import load_tasks

    recipe = load_recipe(recipe_path, **(overrides or {}))
    from moeharden.io.shards import check_output_dir

    check_output_dir(out)          # fail now, not after minutes of work
    src = resolve_checkpoint(ckpt)
    task_objs = load_tasks(list(tasks) if tasks else None, checkpoint_dir=src, limit=limit, seed=None)
    bad = [t.name for t in task_objs if t.kind not in ("multiple_choice", "generation", "perplexity")]
    if bad:
        raise UsageError(f"entangle trains on task files and presets; {', '.join(bad)} cannot be trained on.")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else Path(out).with_name(f".{Path(out).name}.entangle-ckpt")
    if resume and not (ckpt_dir / "latest" / "state.json").exists():
        raise UsageError(f"--resume: no checkpoint found in {ckpt_dir}.",
                         hint="Run without --resume first, or pass --checkpoint-dir.")
    # under `accelerate launch` (several processes) accelerate places the model itself: no device_map
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = load_model(src, trust_remote_code=trust_remote_code, device_map="cpu" if distributed else None)
    tokenizer = load_tokenizer(src)
    t0 = time.perf_counter()
    with progress_bar("entangle", total=recipe.steps) as advance:
        history, done = entangle_model(model, tokenizer, task_objs, recipe, ckpt_dir=ckpt_dir, resume=resume,
                                       stop_after=stop_after, progress=advance)
    seconds = time.perf_counter() - t0
    completed = done >= recipe.steps
    last = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    if not completed:
        return EntangleResult(out=None, steps_done=done, completed=False, seconds=seconds, last=last)
    if distributed and int(os.environ.get("RANK", "0")) != 0:
        return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _copy_side_files(src, tmp)
        (tmp / "entangle.json").write_text(json.dumps({
            "schema": SCHEMA, "tool": {"name": "moeharden", "version": __version__},
            "source": {"path": str(src), "safetensors_digest": checkpoint_digest(src)},
            "tasks": [t.name for t in task_objs], "recipe": recipe.model_dump(mode="json"),
            "history": history, "seconds": round(seconds, 2)}, indent=2) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)


_SIDE_FILES = ("moeharden-tasks.yaml", "generation_config.json")
_SIDE_DIRS = ("tasks",)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Carry the task file (and its data) and generation config over to the new checkpoint."""
    for name in _SIDE_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
    for name in _SIDE_DIRS:
        if (src / name).is_dir() and not (dst / name).exists():
            shutil.copytree(src / name, dst / name)
