"""verify re-loads the baseline's tasks: a scan made with `--task file.yaml` records where each task
came from and a digest of its examples; verify needs the file named again, and refuses other data."""

from __future__ import annotations

import json
import shlex

import pytest

from moeharden.audit.documents import ScanDocument
from moeharden.audit.scan import limit_tasks
from moeharden.audit.verify import baseline_tasks
from moeharden.errors import TaskError
from moeharden.tasks.resolve import load_tasks

TASKS = """version: 1
tasks:
- name: parity
  kind: multiple_choice
  data: {path: rows.jsonl, format: jsonl}
  prompt: '{text}:'
  choices: [E, O]
  label_field: label
  split: {attribution: 8, evaluation: 8, train: 16, seed: 0}
"""


def _write(root, flip: int | None = None):
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": "ab" * (i % 5 + 1) + str(i), "label": i % 2} for i in range(32)]
    if flip is not None:
        rows[flip]["label"] ^= 1
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "tasks.yaml").write_text(TASKS)
    return root / "tasks.yaml"


def _baseline(tasks) -> ScanDocument:
    """A scan document whose task records are what `scan` writes for ``tasks`` (limit 4)."""
    from test_documents import _scan

    raw = _scan(1.0, []).to_json()
    raw["settings"]["limit"] = 4
    raw["tasks"] = [{"name": t.name, "kind": t.kind, "metric": t.metric, "full": 1.0, "chance": 0.5,
                     "n_attribution": 4, "n_evaluation": 4, "option": t.option or None,
                     "examples_sha256": t.examples_sha256()} for t in limit_tasks(tasks, 4, None)]
    return ScanDocument.model_validate(raw)


def test_a_task_file_is_recorded_with_its_absolute_option_and_digest(tmp_path, monkeypatch):
    f = _write(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    (t,) = load_tasks(["data/tasks.yaml"])
    assert t.option == f"{f.resolve()}#parity"
    (again,) = load_tasks([t.option])                 # the option loads the same task from anywhere
    assert again.examples_sha256() == t.examples_sha256()
    # the digest sees every split's examples: one changed label changes it
    (other,) = load_tasks([str(_write(tmp_path / "other", flip=t.train[0].index))])
    assert other.examples_sha256() != t.examples_sha256()


def test_verify_needs_the_task_file_named_and_the_same_examples(tmp_path):
    f = _write(tmp_path / "data")
    base = _baseline(load_tasks([str(f)]))
    ckpt = tmp_path / "ckpt"                          # a hardened checkpoint without a task file
    ckpt.mkdir()
    with pytest.raises(TaskError) as err:
        baseline_tasks(ckpt, base)
    assert f"--task {shlex.quote(f'{f.resolve()}#parity')}" in err.value.hint     # the exact option to pass
    tasks = baseline_tasks(ckpt, base, (str(f),))
    assert [t.name for t in tasks] == ["parity"] and len(tasks[0].evaluation) == 4
    # the same file name with other data is refused: the gate would compare different tasks
    g = _write(tmp_path / "changed", flip=3)
    with pytest.raises(TaskError, match="differ from the ones the baseline scanned"):
        baseline_tasks(ckpt, base, (str(g),))
    # a task the baseline scanned must be among the given ones
    h = _write(tmp_path / "renamed")
    h.write_text(TASKS.replace("name: parity", "name: other"))
    with pytest.raises(TaskError, match="parity"):
        baseline_tasks(ckpt, base, (str(h),))


def test_verify_takes_the_checkpoints_own_task_file_first(tmp_path):
    f = _write(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "moeharden-tasks.yaml").write_text(f.read_text())
    base = _baseline(load_tasks(None, checkpoint_dir=tmp_path / "ckpt"))
    assert base.tasks[0].option is None               # found without an option
    (t,) = baseline_tasks(tmp_path / "ckpt", base)
    assert t.examples_sha256() == base.tasks[0].examples_sha256


def test_verify_via_the_cli_names_the_option(tmp_path):
    from typer.testing import CliRunner

    from moeharden.cli import app

    f = _write(tmp_path / "data")
    (tmp_path / "scan.json").write_text(json.dumps(_baseline(load_tasks([str(f)])).to_json()))
    from families import build_tiny

    build_tiny("mixtral")[0].save_pretrained(tmp_path / "ckpt")
    res = CliRunner().invoke(app, ["verify", str(tmp_path / "ckpt"), "--baseline", str(tmp_path / "scan.json"),
                                   "--out", str(tmp_path / "v")])
    assert res.exit_code == 3, res.output
    assert "Traceback" not in res.output and "--task" in res.output and not (tmp_path / "v").exists()
