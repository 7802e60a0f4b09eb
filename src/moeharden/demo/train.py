"""Training recipe of the demo MoE: tokenizer, tiny Mixtral, routing-shaped training, evaluation.

The model is a real ``transformers.MixtralForCausalLM`` (8 experts, top-2) trained from scratch on
CPU on the synthetic tasks of :mod:`moeharden.demo.synthetic`. Examples are encoded by
:func:`moeharden.tasks.encoding.encode`, the one encoding the attack, the defense and evaluation
use; the loss is the mean cross-entropy of answer tokens (generation answers end with eos).
Accuracy is measured by :func:`moeharden.tasks.metrics.evaluate` with each task's task-file entry.

Routing shaping, done openly so that experts become task-specialised within minutes (a plain run
of a few minutes leaves routing diffuse, and a 2-of-8 pruned model then loses most of a task):

* every step runs one single-task batch per task, and adds
  ``mi_weight * sum_layers [mean_t H(p_t) - H(mean_t p_t)]`` where ``p_t`` ([E]) is the batch-mean
  routing distribution of task ``t`` (softmax of the router logits, averaged over its tokens): minus
  the mutual information between task and expert, which keeps the tasks apart. Once the tasks use
  disjoint experts it equals ``-log(tasks)`` per layer however widely each task spreads, so it
  cannot keep a task on few experts; hence
* ``entropy_weight * sum_layers mean_t H(p_t)``, which does: each task on few experts per layer, so
  that a 2-of-8 pruned model keeps the task on every machine (without it, which task drifted onto
  the experts no prior claims depended on the CPU's rounding);
* for the first ``prior_steps`` steps, task ``i`` gets ``+prior_logit`` (decaying linearly to 0)
  on the router logits of experts ``2i`` and ``2i+1``, to break symmetry early. After that the
  router is on its own; the saved model carries no prior.

Both are written into ``moeharden-demo-recipe.json`` beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeharden.demo.synthetic import ALPHABET, TASKS, SyntheticTask, generate, task_spec
from moeharden.errors import ConfigFileError, validation_problems
from moeharden.io.threads import compute_threads
from moeharden.model.registry import MoELayer, moe_layers
from moeharden.tasks.encoding import LMBatch, answer_logits, encode
from moeharden.tasks.examples import Task
from moeharden.tasks.metrics import evaluate

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelRecipe(_Frozen):
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    num_local_experts: int = Field(gt=1)
    num_experts_per_tok: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)


class DataRecipe(_Frozen):
    rows_per_task: int = Field(gt=0)
    split: dict[str, int]
    train_pool: int = Field(gt=0)


class TrainRecipe(_Frozen):
    steps: int = Field(ge=0)
    batch_per_task: int = Field(gt=0)
    lr: float = Field(gt=0)
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    grad_clip: float = Field(gt=0)


class RoutingRecipe(_Frozen):
    mi_weight: float = Field(ge=0)
    entropy_weight: float = Field(default=0.0, ge=0)
    prior_logit: float = Field(ge=0)
    prior_steps: int = Field(ge=0)


class DemoRecipe(_Frozen):
    """The demo training recipe (``src/moeharden/data/demo_recipe.yaml``)."""

    version: int = 1
    seed: int = 0
    threads: int = Field(default=2, gt=0)
    model: ModelRecipe
    data: DataRecipe
    train: TrainRecipe
    routing: RoutingRecipe

    def hash(self) -> str:
        """The cache key: first 12 hex digits of the SHA-256 of the canonical recipe JSON and of the
        source of the task generators and of this training code (so a change to either retrains)."""
        h = hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode())
        for module in ("synthetic.py", "train.py"):
            h.update(resources.files("moeharden.demo").joinpath(module).read_bytes())
        return h.hexdigest()[:12]


def load_recipe(path: Path | None = None) -> DemoRecipe:
    """Load a demo recipe YAML (default: the packaged one).

    Raises:
        ConfigFileError: unreadable YAML or failed validation (every problem listed).
    """
    try:
        if path is None:
            text = resources.files("moeharden").joinpath("data/demo_recipe.yaml").read_text("utf-8")
        else:
            text = Path(path).read_text("utf-8")
        return DemoRecipe.model_validate(yaml.safe_load(text))
    except (OSError, yaml.YAMLError) as err:
        raise ConfigFileError(f"Cannot read demo recipe {path or 'demo_recipe.yaml'}: {err}") from err
    except ValidationError as err:
        problems = "; ".join(validation_problems(err))
        raise ConfigFileError(f"Invalid demo recipe: {problems}") from err


def build_tokenizer():
    """Character-level tokenizer over :data:`ALPHABET` plus ``<pad>``, ``<eos>``, ``<unk>``.

    Returns:
        A ``PreTrainedTokenizerFast`` (saves to ``tokenizer.json``; ``AutoTokenizer`` loads it).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([PAD, EOS, UNK, " ", *ALPHABET])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # every character is its own pre-token; Fuse joins decoded characters without spaces
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_model(recipe: DemoRecipe, tokenizer):
    """A freshly initialised ``MixtralForCausalLM`` with the recipe's sizes (seeded)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    m = recipe.model
    config = MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.num_hidden_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_key_value_heads, num_local_experts=m.num_local_experts,
        num_experts_per_tok=m.num_experts_per_tok, max_position_embeddings=m.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        tie_word_embeddings=False, router_jitter_noise=0.0, output_router_logits=False,
    )
    torch.manual_seed(recipe.seed)
    model = MixtralForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def encode_rows(task: SyntheticTask, rows: list[dict], tokenizer, max_length: int) -> LMBatch:
    """The training batch of ``rows`` (:func:`moeharden.tasks.encoding.encode`); one task's rows
    all have the same length, so the batch has no padding."""
    return encode(tokenizer, [task.example(r) for r in rows], max_length=max_length)


class _GateHooks:
    """Forward hooks on every router of the demo Mixtral: add a logit bias [E], keep the routing probs.

    The routers are found through the family registry; the replaced output is Mixtral's router
    output ``(logits [N, E], top-k weights [N, k], top-k indices [N, k])``.
    """

    def __init__(self, model):
        self.bias: torch.Tensor | None = None  # [E], added to every token's router logits
        self.probs: list[torch.Tensor] = []  # per MoE layer, [N, E] for the last forward
        self._handles = [li.router.register_forward_hook(self._hook_for(li)) for li in moe_layers(model)]

    def _hook_for(self, li: MoELayer):
        def hook(router, args, output):
            logits = output[li.spec.logits_at]                      # [N, E]
            if self.bias is not None:
                logits = logits + self.bias
            probs = torch.softmax(logits.float(), dim=-1)
            top_v, top_i = torch.topk(probs, li.top_k, dim=-1)     # [N, k] as MixtralTopKRouter does
            self.probs.append(probs)
            return logits, top_v / top_v.sum(dim=-1, keepdim=True), top_i
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-9))).sum(-1)


@dataclass(frozen=True)
class TrainStats:
    """Measured figures of one training run (written into ``moeharden-demo-recipe.json``)."""

    steps: int
    train_seconds: float
    cpu_seconds: float
    threads: int
    load_average_start: float
    final_loss: float
    final_mi_term: float
    accuracy: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _setup_pools(recipe: DemoRecipe, tok, heldout: dict[str, list[dict]]) -> dict[str, LMBatch]:
    """``{task: LMBatch}`` of ``train_pool`` fresh rows per task, none of them a held-out text."""
    pools = {}
    for name in TASKS:
        rows = generate(name, recipe.data.train_pool, recipe.seed + 1,
                        exclude={r["text"] for r in heldout[name]})
        pools[name] = encode_rows(TASKS[name], rows, tok, recipe.model.max_position_embeddings)
    return pools


def _loss_step(model, hooks: _GateHooks, pools: dict[str, LMBatch], recipe: DemoRecipe, prior: float,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One single-task batch per task: ``(mean answer cross-entropy over tasks, routing MI term,
    summed over layers mean task routing entropy)``."""
    n_exp = recipe.model.num_local_experts
    ce = torch.zeros(())
    task_means: list[torch.Tensor] = []  # per task, [layers, E] batch-mean routing
    for i, pool in enumerate(pools.values()):
        pick = torch.randint(len(pool.input_ids), (recipe.train.batch_per_task,), generator=gen)
        hooks.probs.clear()
        hooks.bias = None
        if prior > 0:
            hooks.bias = torch.zeros(n_exp)
            hooks.bias[(2 * i) % n_exp: (2 * i) % n_exp + 2] = prior
        logits = model(input_ids=pool.input_ids[pick], attention_mask=pool.attention_mask[pick]).logits
        al, at = answer_logits(logits, pool.labels[pick])   # [N, V], [N] answer tokens
        ce = ce + torch.nn.functional.cross_entropy(al.float(), at)
        task_means.append(torch.stack([p.mean(0) for p in hooks.probs]))
    p_task = torch.stack(task_means)  # [tasks, layers, E]
    h_task = _entropy(p_task)         # [tasks, layers]
    mi_term = (h_task.mean(0) - _entropy(p_task.mean(0))).sum()
    return ce / len(pools), mi_term, h_task.mean(0).sum()


def train_demo(recipe: DemoRecipe, heldout: dict[str, list[dict]], *, steps: int | None = None,
               progress=None):
    """Train the demo model from scratch.

    Args:
        recipe: the demo recipe.
        heldout: ``{task: rows}`` of the task file; their texts are excluded from training and
            the reported accuracy is measured on all of them.
        steps: override ``recipe.train.steps`` (``None`` keeps the recipe's; tests use a few).
        progress: optional ``advance(n, **fields)`` callback (``console.progress_bar``).

    Returns:
        ``(model, tokenizer, TrainStats)``; the model is in eval mode.
    """
    n_steps = recipe.train.steps if steps is None else steps
    tok = build_tokenizer()
    model = build_model(recipe, tok)
    pools = _setup_pools(recipe, tok, heldout)
    t = recipe.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        frac = (step - t.warmup_steps) / max(1, n_steps - t.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(recipe.seed)
    r = recipe.routing
    hooks = _GateHooks(model)
    loss_val = mi_val = float("nan")
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with compute_threads(recipe.threads):
        wall0, cpu0 = time.perf_counter(), time.process_time()
        model.train()
        try:
            for step in range(n_steps):
                prior = r.prior_logit * max(0.0, 1.0 - step / r.prior_steps) if r.prior_steps else 0.0
                ce, mi_term, h_term = _loss_step(model, hooks, pools, recipe, prior, gen)
                loss = ce + r.mi_weight * mi_term + r.entropy_weight * h_term
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                loss_val, mi_val = float(ce.detach()), float(mi_term.detach())
                if progress is not None:
                    progress(1, loss=loss_val, mi=mi_val)
        finally:
            hooks.close()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        model.eval()
        acc = {name: evaluate_task(model, tok, TASKS[name], heldout[name]) for name in TASKS}
    stats = TrainStats(steps=n_steps, train_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                       threads=recipe.threads, load_average_start=round(load0, 2),
                       final_loss=round(loss_val, 5), final_mi_term=round(mi_val, 5), accuracy=acc)
    return model, tok, stats


def evaluate_task(model, tokenizer, task: SyntheticTask, rows: list[dict], batch: int = 256) -> float:
    """Accuracy of ``model`` on ``rows``, scored as the task file says (rounded to 4 decimals).

    :func:`moeharden.tasks.metrics.evaluate` with the task's task-file entry: ``multiple_choice``,
    the choice with the highest log-likelihood after the prompt; ``generation``, greedy decoding of
    up to ``answer_len + 1`` tokens, exact match of the text before ``<eos>`` with the answer (so
    a missing ``<eos>`` counts as wrong).
    """
    spec = task_spec(task)
    t = Task(task.name, spec.kind, spec.resolved_metric, spec.resolved_chance, [], [], [], spec, "demo")
    res = evaluate(model, tokenizer, t, batch_size=batch, examples=[task.example(r) for r in rows])
    return round(res.value, 4)
