"""Task files, presets, data loading and splits; presets run on the real data in ../shared/data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from tiny_lm import build_model, build_tokenizer

from moeharden.errors import EXIT_INPUT, TaskError
from moeharden.tasks.metrics import evaluate, task_loss
from moeharden.tasks.resolve import load_tasks, preset_names, preset_spec
from moeharden.tasks.spec import TASK_FILE_NAME, parse_task_file, read_task_file, template_fields

torch.set_num_threads(1)

DATA = Path(os.environ.get("MOEHARDEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "glue").is_dir(), reason=f"real eval data not found at {DATA}")

PRESET_FILES = {
    "glue-sst2": "glue/sst2_validation.jsonl",
    "glue-mrpc": "glue/mrpc_validation.jsonl",
    "glue-qnli": "glue/qnli_validation.jsonl",
    "glue-rte": "glue/rte_validation.jsonl",
    "wikitext2": "wikitext-2/test.txt",
    "xsum": "xsum/test_1000.jsonl",
}


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer()
    return build_model(tok), tok


def _write(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False) if path.suffix == ".yaml" else obj)
    return path


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _mc_task(**over):
    t = {"name": "sent", "kind": "multiple_choice", "data": {"path": "rows.jsonl"}, "prompt": "{text} ->",
         "choices": [" neg", " pos"], "label_field": "label", "split": {"attribution": 3, "train": 2, "seed": 1}}
    t.update(over)
    return t


def test_every_preset_validates():
    names = preset_names()
    assert {"glue-sst2", "glue-mrpc", "glue-qnli", "glue-rte", "wikitext2", "wikitext103", "xsum",
            "cnn-dailymail"} <= set(names)
    for n in names:
        spec = preset_spec(n)
        assert spec.name == n and spec.data.hub and spec.data.split
        if spec.kind == "multiple_choice":
            assert spec.resolved_chance == pytest.approx(1 / len(spec.choices))


@needs_data
@pytest.mark.parametrize("name", list(PRESET_FILES))
def test_presets_run_on_local_data(lm, name):
    model, tok = lm
    (task,) = load_tasks([f"{name}={DATA / PRESET_FILES[name]}"], limit=3, seed=0)
    assert task.name == name and len(task.attribution) == 3 and len(task.evaluation) == 3
    res = evaluate(model, tok, task, batch_size=4)
    assert res.n == 3 and res.metric == task.metric
    if task.kind == "multiple_choice":
        assert res.value in (0.0, 1 / 3, 2 / 3, 1.0)
        assert all(ex.target == ex.choices[ex.label] for ex in task.evaluation)
    elif task.kind == "perplexity":
        assert res.value > 1.0 and res.extra["tokens"] > 100
    else:
        assert 0.0 <= res.value <= 1.0 and {"rouge1", "rouge2", "rougeL"} <= set(res.extra)
    with torch.no_grad():
        assert torch.isfinite(task_loss(model, tok, task.attribution))
    assert task.calibration_texts() == [ex.prompt + ex.target for ex in task.attribution]


@needs_data
def test_glue_labels_and_formats_agree():
    """SST-2 from jsonl and from GLUE's TSV, RTE from jsonl and parquet: the same examples."""
    a = load_tasks([f"glue-sst2={DATA / 'glue/sst2_validation.jsonl'}"], limit=20, seed=3)[0]
    b = load_tasks([f"glue-sst2={DATA / 'glue/sst2_dev.tsv'}"], limit=20, seed=3)[0]
    assert [(e.prompt, e.label) for e in a.evaluation] == [(e.prompt, e.label) for e in b.evaluation]
    rows = [json.loads(line) for line in (DATA / "glue/sst2_validation.jsonl").read_text().splitlines()]
    for ex in a.evaluation:  # label 1 = positive
        assert ex.target == (" positive" if rows[ex.index]["label"] == 1 else " negative")
    c = load_tasks([f"glue-rte={DATA / 'glue/rte_validation.jsonl'}"], limit=10)[0]
    d = load_tasks([f"glue-rte={DATA / 'glue/rte_validation.parquet'}"], limit=10)[0]
    # (the two RTE files differ in 48 sentences' quoting, so compare rows and labels, not text)
    assert [(e.index, e.label) for e in c.evaluation] == [(e.index, e.label) for e in d.evaluation]


@needs_data
def test_wikitext_articles_and_splits():
    lines = (DATA / "wikitext-2/test.txt").read_text(encoding="utf-8").splitlines()
    # article titles look like " = Title = "; section headings " = = Section = = " (2 table rows start with " = ")
    n_titles = sum(1 for ln in lines if ln.startswith(" = ") and ln.endswith(" = ") and not ln.startswith(" = = "))
    (task,) = load_tasks([f"wikitext2={DATA / 'wikitext-2/test.txt'}"])
    docs = task.attribution + task.evaluation + task.train
    assert len(docs) == n_titles
    assert all(ex.target.lstrip().startswith("= ") for ex in docs)
    assert len(task.attribution) == 8 and len(task.evaluation) == n_titles - 8


@needs_data
def test_splits_are_disjoint_seeded_and_limited():
    spec = f"glue-mrpc={DATA / 'glue/mrpc_validation.jsonl'}"
    (full,) = load_tasks([spec], seed=0)
    ids = [[e.index for e in getattr(full, s)] for s in ("attribution", "evaluation", "train")]
    assert [len(x) for x in ids] == [64, 408 - 64 - 128, 128]
    assert len(set(ids[0]) | set(ids[1]) | set(ids[2])) == 408
    (again,) = load_tasks([spec], seed=0)
    assert [e.index for e in again.evaluation] == ids[1]
    (lim,) = load_tasks([spec], seed=0, limit=10)
    assert [e.index for e in lim.evaluation] == ids[1][:10] and [e.index for e in lim.attribution] == ids[0][:10]
    (other,) = load_tasks([spec], seed=1, limit=10)
    assert [e.index for e in other.evaluation] != ids[1][:10]


def test_task_file_with_checkpoint_default_and_selection(tmp_path):
    _jsonl(tmp_path / "rows.jsonl", [{"text": f"r{i}", "label": str(i % 2)} for i in range(8)])
    _jsonl(tmp_path / "gen.jsonl", [{"q": f"{i}+1=", "a": str(i + 1)} for i in range(6)])
    doc = {"version": 1, "tasks": [
        _mc_task(),
        {"name": "inc", "kind": "generation", "data": {"path": "gen.jsonl"}, "prompt": "{q}", "target_field": "a",
         "split": {"attribution": 2, "evaluation": 2}}]}
    _write(tmp_path / TASK_FILE_NAME, doc)
    tasks = load_tasks(None, checkpoint_dir=tmp_path)
    assert [t.name for t in tasks] == ["sent", "inc"]
    sent, inc = tasks
    assert (len(sent.attribution), len(sent.evaluation), len(sent.train)) == (3, 3, 2)
    assert sent.chance == 0.5 and sent.metric == "accuracy" and inc.metric == "exact_match"
    assert all(e.target == (" pos" if int(e.prompt[1]) % 2 else " neg") for e in sent.evaluation)  # csv-ish "1"
    (only,) = load_tasks([f"{tmp_path / TASK_FILE_NAME}#inc"])
    assert only.name == "inc" and len(only.evaluation) == 2


def test_demo_task_file_is_valid(tmp_path):
    from moeharden.demo.synthetic import write_task_file

    write_task_file(tmp_path, 40, {"attribution": 8, "evaluation": 16, "train": 16, "seed": 0})
    tasks = load_tasks(None, checkpoint_dir=tmp_path, limit=5)
    assert {t.name for t in tasks} == {"sentiment", "addition", "reverse"}
    assert all(len(t.evaluation) == 5 for t in tasks)


# --------------------------------------------------------------------------- bad input
def test_unknown_task_lists_presets():
    with pytest.raises(TaskError) as e:
        load_tasks(["glue-nope"])
    assert "glue-nope" in e.value.message and "glue-sst2" in e.value.hint
    assert e.value.exit_code == EXIT_INPUT == 3


def test_all_schema_problems_listed_at_once(tmp_path):
    bad = {"version": 1, "tasks": [
        {"name": "a", "kind": "mc", "data": {"path": "x.jsonl"}, "prompt": "{t}", "colour": "red"},
        {"name": "b", "kind": "generation", "data": {"path": "x.jsonl"}, "prompt": "{t}", "target_field": "y",
         "max_new_tokens": "many", "split": {"attribution": 0, "seed": "x"}},
        {"kind": "multiple_choice", "data": {"path": "x.jsonl"}, "prompt": "{t}", "choices": [" a", " b"]}]}
    with pytest.raises(TaskError) as e:
        read_task_file(_write(tmp_path / "bad.yaml", bad))
    msg = e.value.message
    for needle in ("tasks[0] (a).kind", "tasks[0] (a).colour", "tasks[1] (b).max_new_tokens",
                   "tasks[1] (b).split.attribution", "tasks[1] (b).split.seed", "tasks[2].name",
                   "(got 'mc')", "(got 'many')", "tasks[2]: label_field is required"):
        assert needle in msg, needle
    assert "has 7 problem(s)" in msg and msg.count("\n  tasks[") == 7
    # cross-field problems of one task come together too
    with pytest.raises(TaskError) as e:
        parse_task_file({"version": 1, "tasks": [{"name": "c", "kind": "multiple_choice", "data": {"path": "x"},
                                                  "metric": "rougeL"}]}, "inline")
    assert all(s in e.value.message for s in ("metric 'rougeL'", "prompt is required", "label_field is required"))


def test_bad_yaml_and_code_tags_are_refused(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("version: 1\ntasks:\n  - name: x\n    kind: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(TaskError, match="not valid YAML"):
        read_task_file(p)
    with pytest.raises(TaskError, match="Cannot read task file"):
        read_task_file(tmp_path / "missing.yaml")


@pytest.mark.parametrize("template", ["{x.__class__}", "{x[0]}", "{}", "{0}", "{x!r}", "{x:{y}}", "{b:>5}",
                                      "{text:>999999999}"])
def test_templates_cannot_reach_objects(template, tmp_path):
    with pytest.raises(ValueError):
        template_fields(template)
    with pytest.raises(TaskError, match="prompt"):
        parse_task_file({"version": 1, "tasks": [_mc_task(prompt=template)]}, "inline")
    assert template_fields("{a} and {b} {{literal}}") == ["a", "b"]     # plain fields only: a width can fill memory


def test_empty_dataset_and_bad_labels(tmp_path):
    (tmp_path / "rows.jsonl").write_text("")
    _write(tmp_path / "t.yaml", {"version": 1, "tasks": [_mc_task()]})
    with pytest.raises(TaskError, match="dataset is empty"):
        load_tasks([str(tmp_path / "t.yaml")])
    _jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}])
    with pytest.raises(TaskError, match=r"row 1: label 2 is outside the 2 choices"):
        load_tasks([str(tmp_path / "t.yaml")])
    _jsonl(tmp_path / "rows.jsonl", [{"text": "a", "label": 0}, {"txt": "b", "label": 1}])
    with pytest.raises(TaskError, match="row 1 has no field"):
        load_tasks([str(tmp_path / "t.yaml")])


def test_checkpoint_task_file_cannot_read_outside(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _jsonl(tmp_path / "secret.jsonl", [{"text": "s", "label": 0}] * 4)
    _write(ckpt / TASK_FILE_NAME, {"version": 1, "tasks": [_mc_task(data={"path": "../secret.jsonl"})]})
    with pytest.raises(TaskError, match="outside the checkpoint"):
        load_tasks(None, checkpoint_dir=ckpt)
    with pytest.raises(TaskError, match="no moeharden-tasks.yaml"):
        load_tasks(None, checkpoint_dir=tmp_path)
    # the same file given by the user on the command line is trusted
    assert load_tasks([str(ckpt / TASK_FILE_NAME)])[0].name == "sent"


def test_small_dataset_shrinks_splits_and_duplicates_fail(tmp_path):
    _jsonl(tmp_path / "rows.jsonl", [{"text": str(i), "label": i % 2} for i in range(4)])
    _write(tmp_path / "t.yaml", {"version": 1, "tasks": [_mc_task(split={"attribution": 8, "train": 8})]})
    (t,) = load_tasks([str(tmp_path / "t.yaml")])
    assert len(t.attribution) >= 1 and len(t.evaluation) >= 1
    assert len(t.attribution) + len(t.evaluation) + len(t.train) <= 4
    with pytest.raises(TaskError, match="more than once"):
        load_tasks([str(tmp_path / "t.yaml"), str(tmp_path / "t.yaml")])
    with pytest.raises(TaskError, match="limit"):
        load_tasks([str(tmp_path / "t.yaml")], limit=0)
