"""Tests of the embedded demo model: generators, task file, tokenizer, training loop, cache, CLI.

The slow test trains (or reuses) the real demo model and checks the paper's finding on it: keeping
the 2 most frequently routed experts of 8 per layer keeps >= 90 % of each task's accuracy, and
2 random experts keep much less.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from moeharden.demo import synthetic as syn
from moeharden.demo.build import RECIPE_FILE_NAME, build_demo_model
from moeharden.demo.synthetic import TASK_FILE_NAME
from moeharden.demo.train import build_tokenizer, evaluate_task, load_recipe
from moeharden.errors import ConfigFileError


@pytest.fixture
def tiny_recipe():
    """The packaged recipe shrunk to a few seconds of training."""
    r = load_recipe()
    return r.model_copy(update={
        "model": r.model.model_copy(update={"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 2,
                                            "num_local_experts": 4}),
        "data": r.data.model_copy(update={"rows_per_task": 64, "train_pool": 128,
                                          "split": {"attribution": 8, "evaluation": 16, "train": 32, "seed": 0}}),
        "train": r.train.model_copy(update={"steps": 3, "batch_per_task": 8, "warmup_steps": 1}),
        "routing": r.routing.model_copy(update={"prior_steps": 2}),
    })


# ----------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", list(syn.TASKS))
def test_generators_are_seeded_and_reproducible(name):
    a = syn.generate(name, 200, seed=3)
    assert a == syn.generate(name, 200, seed=3)
    assert a != syn.generate(name, 200, seed=4)
    held = {r["text"] for r in a[:50]}
    fresh = syn.generate(name, 200, seed=5, exclude=held)
    assert not held & {r["text"] for r in fresh}
    distinct = syn.generate(name, 300, seed=3, distinct=True)
    assert len({r["text"] for r in distinct}) == 300


def test_generated_answers_are_right():
    # recomputed from the row text, independently of the generators
    for r in syn.generate("sentiment", 300, seed=0):
        marker, letters = r["text"][0], r["text"][1:]
        pos = sum(c in "lmnopqrstuv" for c in letters)
        neg = sum(c in "abcdefghijk" for c in letters)
        assert pos + neg == 7 and marker in "xy"
        assert r["label"] == int((pos > neg) != (marker == "x"))
    labels = [r["label"] for r in syn.generate("sentiment", 1000, seed=1)]
    assert 400 < sum(labels) < 600  # balanced classes: chance really is 0.5
    for r in syn.generate("addition", 300, seed=0):
        a, b = r["text"].split("+")
        assert int(r["answer"]) == int(a) + int(b) and len(r["answer"]) == 3
    for r in syn.generate("reverse", 300, seed=0):
        assert r["answer"] == "".join(reversed(r["text"]))


def test_licensee_tasks_are_new_and_right():
    """The tasks a licensee adapts the release to: answers recomputed from the text, and never a
    prompt of the demo's own tasks (different characters or markers)."""
    for r in syn.generate("copy", 200, seed=0):
        assert r["answer"] == r["text"] and len(r["text"]) == 4 and r["text"].isupper()
    rows = syn.generate("majority", 500, seed=0)
    for r in rows:
        pos = sum(c in "lmnopqrstuv" for c in r["text"])
        assert len(r["text"]) == 7 and r["label"] == int(pos > 7 - pos)
    assert 150 < sum(r["label"] for r in rows) < 350
    own = {syn.TASKS[n].prompt_of(r) for n in syn.TASKS for r in syn.generate(n, 300, seed=0)}
    new = {syn.LICENSEE_TASKS[n].prompt_of(r) for n in syn.LICENSEE_TASKS for r in syn.generate(n, 300, seed=0)}
    assert not own & new and not set(syn.LICENSEE_TASKS) & set(syn.TASKS)


def test_owner_data_is_the_training_pool_and_never_a_held_out_row(tmp_path):
    """entangle's data in the demo: the first rows of the demo model's training stream, no text of
    the checkpoint's task file (evaluation stays held out), as a valid task file."""
    from moeharden.demo.build import write_owner_tasks
    from moeharden.demo.train import load_recipe

    recipe = load_recipe()
    path = write_owner_tasks(tmp_path / "owner", train_rows=300)
    _check_task_file(path)
    for name in syn.TASKS:
        held = syn.generate(name, recipe.data.rows_per_task, recipe.data.split["seed"], distinct=True)
        rows = [json.loads(x) for x in (path.parent / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 128 + 64 + 300
        assert not {r["text"] for r in rows} & {r["text"] for r in held}
        pool = syn.generate(name, len(rows), recipe.seed + 1, exclude={r["text"] for r in held})
        assert rows == pool                                  # the pool demo training draws from


def _check_task_file(path: Path) -> dict:
    """Minimal check of the task-file schema of docs/CONTRACTS.md (independent of moeharden.tasks.spec)."""
    spec = yaml.safe_load(path.read_text())
    assert spec["version"] == 1
    names = [t["name"] for t in spec["tasks"]]
    assert len(set(names)) == len(names)
    allowed = {"name", "kind", "data", "prompt", "choices", "choices_field", "label_field", "target_field",
               "metric", "chance", "max_new_tokens", "split"}
    for t in spec["tasks"]:
        assert set(t) <= allowed, set(t) - allowed
        assert t["kind"] in {"multiple_choice", "perplexity", "generation"}
        assert t["data"]["format"] == "jsonl"
        rows = [json.loads(x) for x in (path.parent / t["data"]["path"]).read_text().splitlines()]
        split = t["split"]
        assert len(rows) >= split["attribution"] + split["evaluation"] + split["train"]
        assert 0.0 < t["chance"] < 1.0
        for row in rows:
            t["prompt"].format_map(row)
        if t["kind"] == "multiple_choice":
            assert t["metric"] == "accuracy"
            assert {row[t["label_field"]] for row in rows} == set(range(len(t["choices"])))
        else:
            assert t["metric"] == "exact_match" and t["max_new_tokens"] >= 1
            assert all(isinstance(row[t["target_field"]], str) for row in rows)
    return spec


def test_task_file_validates(tmp_path):
    split = {"attribution": 16, "evaluation": 32, "train": 64, "seed": 7}
    written = syn.write_task_file(tmp_path, 128, split)
    spec = _check_task_file(tmp_path / syn.TASK_FILE_NAME)
    assert [t["name"] for t in spec["tasks"]] == list(syn.TASKS) == list(written)
    # a uniform guesser: 2 labels; 179 sums (20..198); 26**4 four-letter words
    assert {t["name"]: t["chance"] for t in spec["tasks"]} == pytest.approx(
        {"sentiment": 0.5, "addition": 1 / 179, "reverse": 1 / 26**4}, rel=1e-2)
    try:
        from moeharden.tasks.resolve import load_tasks
    except ImportError:
        return
    tasks = load_tasks(None, checkpoint_dir=tmp_path)
    assert [t.name for t in tasks] == list(syn.TASKS)
    for t in tasks:
        assert (len(t.attribution), len(t.evaluation), len(t.train)) == (16, 32, 64)
        task = syn.TASKS[t.name]
        pairs = {(task.prompt_of(r), task.answer_of(r)) for r in written[t.name]}
        assert {(ex.prompt, ex.target) for ex in t.evaluation + t.train} <= pairs


def test_packaged_recipe_loads_and_bad_recipe_is_rejected(tmp_path):
    r = load_recipe()
    assert r.model.num_local_experts == 8 and r.model.num_experts_per_tok == 2
    bad = yaml.safe_load((Path(syn.__file__).parents[1] / "data" / "demo_recipe.yaml").read_text())
    bad["train"]["lr"] = -1
    bad["model"]["extra_key"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigFileError) as err:
        load_recipe(tmp_path / "bad.yaml")
    assert "train.lr" in err.value.message and "model.extra_key" in err.value.message


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "ybqfnmae:N 37+45=082 KQBD>DBQK"
    ids = tok(text).input_ids
    assert len(ids) == len(text) and tok.unk_token_id not in ids  # one token per character
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert tok.pad_token == "<pad>" and tok.eos_token == "<eos>"


# ----------------------------------------------------------------------------- training, cache, CLI
def test_tiny_training_saves_a_loadable_checkpoint_and_reuses_cache(tmp_path, monkeypatch, tiny_recipe):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    monkeypatch.setenv("MOEHARDEN_CACHE", str(tmp_path / "cache"))
    out = build_demo_model(tmp_path / "out", recipe=tiny_recipe)
    for f in ("config.json", "model.safetensors", "tokenizer.json", TASK_FILE_NAME, RECIPE_FILE_NAME):
        assert (out / f).is_file(), f
    _check_task_file(out / TASK_FILE_NAME)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert isinstance(model, MixtralForCausalLM) and model.config.num_local_experts == 4
    stamp = json.loads((out / RECIPE_FILE_NAME).read_text())
    assert stamp["recipe_hash"] == tiny_recipe.hash() and stamp["training"]["steps"] == 3
    # the stamped accuracy was measured on the in-memory model; the reloaded one must agree
    for name, task in syn.TASKS.items():
        rows = [json.loads(x) for x in (out / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        assert evaluate_task(model, tok, task, rows) == stamp["training"]["accuracy"][name]

    # second call: served from the cache (training would fail now)
    import moeharden.demo.train as train_mod

    monkeypatch.setattr(train_mod, "train_demo", lambda *a, **k: pytest.fail("retrained"))
    again = build_demo_model(tmp_path / "out2", recipe=tiny_recipe)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_cli_demo_json(tmp_path, monkeypatch, tiny_recipe):
    from typer.testing import CliRunner

    import moeharden.demo.pipeline as demo_mod
    from moeharden.cli import app

    monkeypatch.setenv("MOEHARDEN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_mod, "load_recipe", lambda: tiny_recipe)
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--model-only", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["reused_cache"] is False and doc["recipe_hash"] == tiny_recipe.hash()
    assert Path(doc["model_dir"]) == tmp_path / "d" / "model"
    assert set(doc["training"]["accuracy"]) == set(syn.TASKS)
    res = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--model-only", "--json"])
    assert json.loads(res.stdout)["reused_cache"] is True


# ----------------------------------------------------------------------------- the real demo model
@contextmanager
def _keep_only(model, keep: dict[int, list[int]]):
    """Route only among ``keep[layer]`` (router logits of the others set to -inf)."""
    try:
        from moeharden.model.masking import mask_experts
    except ImportError:
        mask_experts = None
    if mask_experts is not None:
        with mask_experts(model, keep=keep):
            yield
        return
    handles = []
    for i, layer in enumerate(model.model.layers):
        mask = torch.full((layer.mlp.gate.num_experts,), float("-inf"))
        mask[keep[i]] = 0.0

        def hook(gate, args, out, mask=mask):
            probs = torch.softmax(out[0].float() + mask, -1)  # [N, E]
            v, idx = torch.topk(probs, gate.top_k, -1)
            return out[0] + mask, v / v.sum(-1, keepdim=True), idx

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _frequency_keep(model, ids: torch.Tensor, k: int = 2) -> dict[int, list[int]]:
    """The ``k`` experts per layer most often among a token's top-k on ``ids`` [N, L]."""
    counts: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(gate, args, out, i=i):
            counts[i] = counts.get(i, 0) + torch.bincount(out[2].flatten(), minlength=gate.num_experts)
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return {i: torch.topk(c, k).indices.tolist() for i, c in counts.items()}


@torch.no_grad()
def _accuracy_hf(model, tok, task, rows) -> float:
    """Scored with transformers' own generate / plain log-softmax, independently of evaluate_task."""
    prompts = torch.tensor([tok(task.prompt_of(r)).input_ids for r in rows])
    if task.kind == "multiple_choice":
        logp = torch.log_softmax(model(input_ids=prompts).logits[:, -1], -1)
        choice_ids = [tok.convert_tokens_to_ids(c) for c in task.choices]
        pred = logp[:, choice_ids].argmax(-1)
        return float((pred == torch.tensor([r["label"] for r in rows])).float().mean())
    gen = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                         max_new_tokens=task.answer_len + 1)
    texts = tok.batch_decode(gen[:, prompts.shape[1]:], skip_special_tokens=True)
    return sum(t.strip() == r["answer"] for t, r in zip(texts, rows, strict=True)) / len(rows)


@pytest.mark.slow
def test_demo_model_is_accurate_and_task_specialised(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    out = build_demo_model(tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    n_exp, n_layers = model.config.num_local_experts, model.config.num_hidden_layers
    assert (n_exp, model.config.num_experts_per_tok) == (8, 2)
    rng = random.Random(0)
    for name, task in syn.TASKS.items():
        rows = [json.loads(x) for x in (out / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        attr, ev = rows[:128], rows[128:384]
        full = _accuracy_hf(model, tok, task, ev)
        assert full >= 0.95, (name, full)
        assert evaluate_task(model, tok, task, ev) == pytest.approx(full, abs=1e-4)
        ids = torch.tensor([tok(task.prompt_of(r) + task.answer_of(r)).input_ids for r in attr])
        keep = _frequency_keep(model, ids)
        with _keep_only(model, keep):
            kept = _accuracy_hf(model, tok, task, ev)
        retained = (kept - task.chance) / (full - task.chance)
        assert retained >= 0.9, (name, keep, kept, full)
        rand = []
        for _ in range(3):
            with _keep_only(model, {i: rng.sample(range(n_exp), 2) for i in range(n_layers)}):
                rand.append(_accuracy_hf(model, tok, task, ev))
        rand_retained = (sum(rand) / len(rand) - task.chance) / (full - task.chance)
        assert rand_retained < retained - 0.3, (name, rand, kept)
    try:  # the library's own task loader and evaluator agree (issue #3 modules, when present)
        from moeharden.tasks.metrics import evaluate
        from moeharden.tasks.resolve import load_tasks
    except ImportError:
        return
    for t in load_tasks(None, checkpoint_dir=out):
        assert evaluate(model, tok, t).value >= 0.95, t.name
