"""Hostile small files: FIFOs, devices and links where a document, manifest or signature is read;
integers too long to convert; duplicate keys; task templates that pad a field to gigabytes.

Every case goes through the real CLI where it is cheap (in-process, but in a thread joined with a
timeout, so a regression fails instead of hanging the suite; /dev/zero in a child process whose
memory is capped), and asserts the documented exit code, one paragraph, no traceback, and nothing
read from outside a release.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import (
    EXIT_INPUT,
    EXIT_INTEGRITY,
    ConfigFileError,
    InputError,
    IntegrityError,
    TaskError,
)

runner = CliRunner()
BIG = "9" * 5000                     # more digits than Python converts (sys.get_int_max_str_digits: 4300)
KEEP = {"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}}


def _run(*args, timeout: float = 60):
    """``moeharden ARGS`` in-process, failing (not hanging) when it does not return within ``timeout``."""
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("res", runner.invoke(app, [str(a) for a in args])),
                         daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"moeharden {' '.join(map(str, args))} hung"
    res = box["res"]
    assert "Traceback" not in res.output and "Internal error" not in res.output, res.output
    assert "\n\n" not in res.output.strip(), res.output          # one paragraph
    return res


def _run_capped(*args, cwd, timeout: float = 120):
    """``moeharden ARGS`` in a child process with at most 2 GiB of data memory (an unbounded read of
    /dev/zero dies there with a MemoryError, not the machine)."""
    def cap():
        resource.setrlimit(resource.RLIMIT_DATA, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-m", "moeharden", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=cap, env={**os.environ, "COLUMNS": "200"})


class _OpenWatch:
    """A FIFO that tells whether anyone opened it: a writer's open() returns only once a reader opened it."""

    def __init__(self, path):
        os.mkfifo(path)
        self.path, self.opened = path, threading.Event()
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self):
        os.close(os.open(self.path, os.O_WRONLY))
        self.opened.set()

    def was_opened(self) -> bool:
        time.sleep(0.2)
        seen = self.opened.is_set()
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)         # release the writer
        self.thread.join(5)
        os.close(fd)
        return seen


@pytest.fixture
def release(locked_release, tmp_path):
    """A copy of the signed tiny release (``rel``) and its public key."""
    rel = tmp_path / "rel"
    shutil.copytree(locked_release / "locked", rel)
    return rel, locked_release / "keys" / "moeharden.pub"


# ---------------------------------------------------------------- 1. FIFOs and devices

@pytest.mark.parametrize("name", ["model.sig", "moeharden-manifest.json"])
def test_a_fifo_signature_or_manifest_in_a_release_is_a_tamper_not_a_hang(release, name):
    rel, pub = release
    (rel / name).unlink()
    os.mkfifo(rel / name)
    res = _run("verify", rel, "--pubkey", pub)
    assert res.exit_code == EXIT_INTEGRITY, res.output
    assert "not a regular file" in res.output.replace("\n", " ")


def test_a_fifo_the_user_names_is_an_input_error_not_a_hang(release, tmp_path):
    rel, pub = release
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    for args in (["verify", rel, "--pubkey", pub, "--baseline", fifo, "--out", tmp_path / "v"],
                 ["report", fifo, "--out", tmp_path / "o"]):
        res = _run(*args)
        assert res.exit_code == EXIT_INPUT, res.output
        assert "not a regular file" in res.output.replace("\n", " ")
    assert not (tmp_path / "v").exists()
    # --manifest: a file the user names is an input error (3), not integrity evidence (4)
    res = _run("verify", rel, "--pubkey", pub, "--manifest", fifo)
    assert res.exit_code == EXIT_INPUT, res.output
    from moeharden.audit.documents import load_document
    from moeharden.audit.records import ManifestDocument

    with pytest.raises(InputError) as info:
        load_document(fifo, ManifestDocument, error=IntegrityError, file_error=InputError)
    assert not isinstance(info.value, IntegrityError)


def test_dev_zero_is_refused_before_a_byte_is_read(release, tmp_path):
    rel, pub = release
    res = _run_capped("report", "/dev/zero", "--out", tmp_path / "o", cwd=tmp_path)
    assert res.returncode == EXIT_INPUT, res.stdout + res.stderr
    res = _run_capped("verify", rel, "--pubkey", pub, "--manifest", "/dev/zero", cwd=tmp_path)
    assert res.returncode == EXIT_INPUT, res.stdout + res.stderr
    assert "not a regular file" in res.stdout + res.stderr and "Traceback" not in res.stderr


def test_a_document_over_the_size_cap_is_refused(tmp_path, monkeypatch):
    from moeharden.audit import documents

    monkeypatch.setattr(documents, "MAX_DOCUMENT", 100)
    p = tmp_path / "scan.json"
    p.write_text(json.dumps({"schema": "moeharden.scan/1", "pad": "x" * 200}))
    with pytest.raises(InputError, match="larger than 100 bytes"):
        documents.load_document(p, documents.ScanDocument)


# ---------------------------------------------------------------- 2. links inside a release

@pytest.mark.parametrize("name", ["moeharden-manifest.json", "model.sig"])
def test_a_link_inside_a_release_is_not_followed(release, tmp_path, name):
    rel, pub = release
    (rel / name).unlink()
    watch = _OpenWatch(tmp_path / "outside")       # opening it at all would be seen
    (rel / name).symlink_to(tmp_path / "outside")
    res = _run("verify", rel, "--pubkey", pub)
    assert not watch.was_opened(), "verify opened a file outside the release through a link"
    assert res.exit_code == EXIT_INTEGRITY, res.output
    assert "symbolic link" in res.output.replace("\n", " ")


# ---------------------------------------------------------------- 3. integers too long to convert

def _big_config(ck):
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps(cfg).replace(f'"num_local_experts": {cfg["num_local_experts"]}',
                                                            f'"num_local_experts": {BIG}'))


def _big_index(ck):
    p = ck / "model.safetensors.index.json"
    p.write_text(p.read_text().replace('"metadata": {', f'"metadata": {{"big": {BIG}, ', 1))


@pytest.mark.parametrize("edit", [_big_config, _big_index, "keep"])
def test_a_huge_integer_in_a_checkpoint_or_keep_file_is_an_input_error(tiny_mixtral_ckpt, tmp_path, edit):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_mixtral_ckpt, ck)
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps(KEEP))
    if edit == "keep":
        keep.write_text(json.dumps(KEEP).replace("[0, 1, 2, 3]", f"[0, 1, 2, {BIG}]", 1))
    else:
        edit(ck)
    res = _run("prune", ck, "--experts-from", keep, "--out", tmp_path / "out")
    assert res.exit_code == EXIT_INPUT, res.output
    assert "longer than 4300 digits" in res.output.replace("\n", " ")
    assert not (tmp_path / "out").exists()


def test_a_huge_integer_in_a_policy_is_an_input_error(locked_release, tmp_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text((locked_release / "policy.yaml").read_text().replace("max_rank: 8", f"max_rank: {BIG}"))
    res = _run("lock", locked_release / "src", "--policy", pol, "--key", locked_release / "keys" / "moeharden.key",
               "--out", tmp_path / "rel")
    assert res.exit_code == EXIT_INPUT, res.output
    assert "longer than 4300 digits" in res.output.replace("\n", " ")


def test_a_huge_integer_in_a_manifest_or_scan_json(release, tmp_path):
    rel, pub = release
    man = rel / "moeharden-manifest.json"
    man.write_text(man.read_text().replace('"num_experts": 8', f'"num_experts": {BIG}', 1))
    res = _run("verify", rel, "--pubkey", pub)
    assert res.exit_code == EXIT_INTEGRITY, res.output
    scan = tmp_path / "scan.json"
    scan.write_text(f'{{"schema": "moeharden.scan/1", "limit": {BIG}}}')
    for args in (["report", scan, "--out", tmp_path / "o"],
                 ["verify", release[0], "--pubkey", pub, "--baseline", scan, "--out", tmp_path / "v"]):
        res = _run(*args)
        assert res.exit_code == EXIT_INPUT, res.output
        assert "longer than 4300 digits" in res.output.replace("\n", " ")


def _task_file(tmp_path, *, prompt="{text}:", seed="0", rows=None):
    rows = rows if rows is not None else ['{"text": "a", "label": 0}', '{"text": "b", "label": 1}'] * 4
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    p = tmp_path / "tasks.yaml"
    p.write_text(f"version: 1\ntasks:\n- name: t\n  kind: multiple_choice\n  data: {{path: rows.jsonl}}\n"
                 f"  prompt: {json.dumps(prompt)}\n  choices: [N, P]\n  label_field: label\n"
                 f"  split: {{attribution: 2, evaluation: 2, seed: {seed}}}\n")
    return p


def test_a_huge_integer_in_a_task_file_or_row_is_a_task_error(tmp_path):
    from moeharden.tasks.resolve import load_tasks
    from moeharden.tasks.spec import read_task_file

    with pytest.raises(TaskError, match="longer than 4300 digits"):
        read_task_file(_task_file(tmp_path, seed=BIG))
    with pytest.raises(TaskError, match="longer than 4300 digits"):
        load_tasks([str(_task_file(tmp_path, rows=[f'{{"text": "a", "label": {BIG}}}']))])
    p = _task_file(tmp_path, rows=["text,label", f"a,{BIG}", "b,1"])
    (tmp_path / "rows.csv").write_text((tmp_path / "rows.jsonl").read_text())
    p.write_text(p.read_text().replace("rows.jsonl", "rows.csv"))
    with pytest.raises(TaskError, match="outside the 2 choices") as info:      # a csv label of 5000 digits
        load_tasks([str(p)])
    assert len(info.value.message) < 400


# ---------------------------------------------------------------- 4. duplicate keys

def test_a_duplicate_key_in_a_keep_file_is_refused(tiny_mixtral_ckpt, tmp_path):
    keep = tmp_path / "keep.json"
    keep.write_text('{"keep": {"0": [0, 1, 2, 3], "0": [4, 5, 6, 7], "1": [0, 1, 2, 3]}}')
    res = _run("prune", tiny_mixtral_ckpt, "--experts-from", keep, "--out", tmp_path / "out")
    assert res.exit_code == EXIT_INPUT, res.output
    assert "'0' twice" in res.output.replace("\n", " ") and str(keep.name) in res.output
    assert not (tmp_path / "out").exists()


def test_a_duplicate_key_in_a_policy_is_refused(locked_release, tmp_path):
    pol = tmp_path / "policy.yaml"
    pol.write_text((locked_release / "policy.yaml").read_text() + "  experts: trainable\n")
    res = _run("lock", locked_release / "src", "--policy", pol, "--key", locked_release / "keys" / "moeharden.key",
               "--out", tmp_path / "rel")
    assert res.exit_code == EXIT_INPUT, res.output
    assert "'experts' twice" in res.output.replace("\n", " ")
    assert not (tmp_path / "rel").exists()


def test_duplicate_keys_at_any_depth_and_legitimate_documents(tmp_path):
    from moeharden.io.files import load_yaml_data, parse_json

    with pytest.raises(InputError, match=r"'b' twice in one JSON object"):
        parse_json('{"a": [{"b": 1, "b": 2}]}', where="x.json")
    with pytest.raises(ConfigFileError, match=r"'b' twice in one mapping \(line 3\)"):
        load_yaml_data("a:\n  b: 1\n  b: 2\n", where="x.yaml", error=ConfigFileError)
    with pytest.raises(InputError, match="twice"):
        load_yaml_data("{0: a, 00: b}", where="x.yaml")           # YAML 1.1: both the integer 0
    assert parse_json('{"a": {"b": 1}, "c": {"b": 2}}', where="x") == {"a": {"b": 1}, "c": {"b": 2}}
    assert load_yaml_data("a: {b: 1}\nc: [{b: 2}, {b: 3}]\n", where="x") == {"a": {"b": 1},
                                                                           "c": [{"b": 2}, {"b": 3}]}
    for shipped in ("policy-example.yaml", "gate-default.yaml", "demo_recipe.yaml", "entangle_recipe.yaml"):
        from importlib import resources

        text = resources.files("moeharden").joinpath("data", shipped).read_text(encoding="utf-8")
        assert load_yaml_data(text, where=shipped) == yaml.safe_load(text)


# ---------------------------------------------------------------- 5. task templates

@pytest.mark.parametrize("prompt", ["{text:>999999999}:", "{text:.999999999}", "{text!r}", "{text!s:>5}", "{text:d}"])
def test_a_format_spec_or_conversion_in_a_template_is_refused_at_load(tmp_path, prompt):
    from moeharden.tasks.spec import read_task_file

    with pytest.raises(TaskError, match="only plain {field} placeholders") as info:
        read_task_file(_task_file(tmp_path, prompt=prompt))
    assert "tasks[0] (t).prompt" in info.value.message


def test_a_format_width_in_a_checkpoint_task_file_fails_the_scan_at_once(tiny_mixtral_ckpt, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(tiny_mixtral_ckpt, ck)
    p = _task_file(ck, prompt="{text:>999999999}:")
    p.rename(ck / "moeharden-tasks.yaml")
    res = _run("scan", ck, "--out", tmp_path / "s", "--limit", 8, "--no-ladder", "--method", "frequency",
               "--keep", 4, "--random-seeds", 1)
    assert res.exit_code == EXIT_INPUT, res.output
    assert "placeholders" in res.output.replace("\n", " ")


def test_a_template_that_repeats_a_long_field_is_capped(tmp_path, monkeypatch):
    from moeharden.tasks import readers
    from moeharden.tasks.resolve import load_tasks

    monkeypatch.setattr(readers, "MAX_PROMPT_CHARS", 10_000)
    p = _task_file(tmp_path, prompt="{text}" * 200, rows=[json.dumps({"text": "x" * 100, "label": 0})] * 4)
    with pytest.raises(TaskError, match="longer than 10000 characters"):
        load_tasks([str(p)])
    tasks = load_tasks([str(_task_file(tmp_path, prompt="{{{text}}} {text}=", rows=['{"text": 7, "label": 1}'] * 4))])
    assert tasks[0].attribution[0].prompt == "{7} 7="                  # what str.format_map gave


def test_every_shipped_preset_still_loads():
    from moeharden.tasks.resolve import preset_names, preset_spec

    assert preset_names()
    for name in preset_names():
        assert preset_spec(name).name
