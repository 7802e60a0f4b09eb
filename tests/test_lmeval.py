"""lm-evaluation-harness bridge: a local task YAML over the real SST-2 file, run by lm-eval's HFLM.

Skipped when lm-eval (optional extra ``moeharden[lm-eval]``) is not installed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tiny_lm import build_model, build_tokenizer

from moeharden.errors import TaskError
from moeharden.tasks.metrics import choice_logprobs, evaluate, task_loss
from moeharden.tasks.resolve import load_tasks

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'moeharden[lm-eval]'")
torch.set_num_threads(1)

DATA = Path(os.environ.get("MOEHARDEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SST2 = DATA / "glue" / "sst2_validation.jsonl"

TASK_YAML = """\
task: sst2_local_test
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {path}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{sentence}}}}\\nQuestion: Is this sentence positive or negative?\\nAnswer:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.skipif(not SST2.is_file(), reason=f"real eval data not found at {SST2}")
def test_lm_eval_task_matches_own_scoring(tmp_path):
    inc = tmp_path / "lmtasks"
    inc.mkdir()
    (inc / "sst2_local_test.yaml").write_text(TASK_YAML.format(path=SST2))
    (task,) = load_tasks(["lm-eval:sst2_local_test"], lm_eval_include=[inc], limit=12, seed=0)
    assert task.kind == "lm_eval" and task.metric == "acc" and task.chance == pytest.approx(0.5)
    att = {e.index for e in task.attribution}
    assert len(att) == 12 and len(task.evaluation) == 12 and not att & {e.index for e in task.evaluation}
    # the documents, rendered by the task's own prompt, are the calibration text
    ex = task.attribution[0]
    assert ex.prompt.endswith("\nAnswer:") and ex.choices == (" negative", " positive")
    assert task.calibration_texts()[0] == ex.prompt + ex.target

    tok = build_tokenizer()
    model = build_model(tok)
    res = evaluate(model, tok, task, batch_size=4)
    # lm-eval's acc on the split equals moeharden's own log-likelihood scoring of the same documents
    lp = choice_logprobs(model, tok, task.evaluation)
    own = sum(int(lp[i].argmax()) == e.label for i, e in enumerate(task.evaluation)) / len(task.evaluation)
    assert res.n == 12 and res.value == pytest.approx(own)
    with torch.no_grad():
        assert torch.isfinite(task_loss(model, tok, task.attribution))


def test_include_with_code_is_refused(tmp_path):
    (tmp_path / "evil.yaml").write_text("task: evil\nprocess_docs: !function utils.process\n")
    with pytest.raises(TaskError, match="!function"):
        load_tasks(["lm-eval:evil"], lm_eval_include=[tmp_path])
    with pytest.raises(TaskError, match="not a directory"):
        load_tasks(["lm-eval:evil"], lm_eval_include=[tmp_path / "nope"])


@pytest.mark.slow
@pytest.mark.skipif(not SST2.is_file(), reason=f"real eval data not found at {SST2}")
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_a_pruned_checkpoint_is_an_ordinary_one_for_transformers_and_lm_eval(tmp_path, family):
    """Ecosystem proof: ``prune`` writes a checkpoint that AutoModelForCausalLM loads (with the kept
    expert count) and generates from, and that lm-eval's HFLM evaluates offline on a local task
    file — with the same accuracy as moeharden's own log-likelihood scoring of those documents."""
    from families import build_tiny
    from transformers import AutoModelForCausalLM

    from moeharden.attack.prune import prune_checkpoint
    from moeharden.model.registry import moe_layers

    tok = build_tokenizer()
    model, _ = build_tiny(family, vocab_size=len(tok))
    model.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    layers = moe_layers(model)
    E = layers[0].num_experts
    prune_checkpoint(tmp_path / "src", tmp_path / "pruned", {li.layer: list(range(0, E, 2)) for li in layers})
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert {li.num_experts for li in moe_layers(pruned)} == {E // 2}
    ids = tok("the movie was", return_tensors="pt").input_ids
    out = pruned.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    inc = tmp_path / "lmtasks"
    inc.mkdir()
    (inc / "sst2_local_test.yaml").write_text(TASK_YAML.format(path=SST2))
    (task,) = load_tasks(["lm-eval:sst2_local_test"], lm_eval_include=[inc], limit=8, seed=0)
    res = evaluate(pruned, tok, task, batch_size=4)
    lp = choice_logprobs(pruned, tok, task.evaluation)
    own = sum(int(lp[i].argmax()) == e.label for i, e in enumerate(task.evaluation)) / len(task.evaluation)
    assert res.n == 8 and res.value == pytest.approx(own)
