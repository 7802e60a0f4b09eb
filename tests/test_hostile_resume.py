"""Hostile and damaged resume state: entangle's training checkpoints and the ladder's journal.

A real, tiny partial checkpoint of ``entangle`` (the same run the CLI then resumes: same weights,
tasks, recipe, so its fingerprint matches) is damaged one way per case. Every case asserts the
README's promises: a one-paragraph error with exit 3 (never 70, never a hang), no output written,
nothing read through a link out of ``--checkpoint-dir``, and a user's file unchanged byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import InputError
from moeharden.io.outputs import OUTPUT_MARKER

runner = CliRunner()
RECIPE = """version: 1
steps: 2
batch_size: 4
subsets_per_step: 1
attribution_methods: [frequency]
adversarial_swaps: 1
checkpoint_every: 1
"""
USER = b"my notes, not moeharden's\n"


@pytest.fixture(autouse=True)
def _one_thread():
    """One compute thread (two oversubscribe a 2-core machine shared with another test process)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Hung(BaseException):
    """Raised by :func:`_deadline` (a BaseException: no ``except OSError`` or ``except Exception`` swallows it)."""


@contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (a FIFO opened for reading blocks until a writer comes)."""
    def expired(*_):
        raise Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def made(demo_ckpt, tmp_path_factory):
    """(model, recipe, checkpoint dir): the checkpoint of step 1 of a 2-step run, as the CLI makes it."""
    import torch

    from moeharden.defend.entangle.command import EntangleSettings, entangle

    root = tmp_path_factory.mktemp("resume")
    recipe = root / "recipe.yaml"
    recipe.write_text(RECIPE)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = entangle(str(demo_ckpt), EntangleSettings(out=root / "x", recipe_path=recipe, limit=8, self_check=False,
                                                        checkpoint_dir=root / "ck", stop_after=1))
    finally:
        torch.set_num_threads(n)
    assert res.steps_done == 1 and not res.completed
    assert json.loads((root / "ck" / "latest" / "state.json").read_text())["run"]
    return demo_ckpt, recipe, root / "ck"


def _entangle(made, tmp_path, ck, *extra):
    model, recipe, _ = made
    with _deadline(60):
        res = runner.invoke(app, [str(a) for a in ("entangle", model, "--out", tmp_path / "x", "--recipe", recipe,
                                                   "--limit", 8, "--skip-self-check", "--checkpoint-dir", ck,
                                                   *extra)])
    assert "Traceback" not in res.output, res.output
    assert "Internal error" not in res.output, res.output
    return res.exit_code, " ".join(res.output.replace("│", " ").split())


def _copy(made, tmp_path) -> Path:
    ck = tmp_path / "ck"
    shutil.copytree(made[2], ck)
    return ck


def _state(ck, edit):
    p = ck / "latest" / "state.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))


def _tensors(path, edit):
    from safetensors.torch import load_file, save_file

    t = load_file(str(path))
    edit(t)
    save_file(t, str(path))


def _pop(key):
    def edit(d):
        d.pop(key)
        return d
    return edit


def _set(key, value):
    def edit(d):
        d[key] = value
        return d
    return edit


def _first_matrix(t):
    return next(k for k in sorted(t) if t[k].dim() > 1)


# case: (damage, phrase the message must hold)
DAMAGE = {
    "state.json not JSON": (lambda ck: (ck / "latest" / "state.json").write_text("{not json"), "not valid JSON"),
    "state.json not an object": (lambda ck: (ck / "latest" / "state.json").write_text("[1, 2]"), "JSON object"),
    "step missing": (lambda ck: _state(ck, _pop("step")), "state.json is invalid"),
    "step a string": (lambda ck: _state(ck, _set("step", "1")), "state.json is invalid"),
    "step past the run": (lambda ck: _state(ck, _set("step", 99)), "records step 99 of a run of 2 steps"),
    "history not a list": (lambda ck: _state(ck, _set("history", "x")), "state.json is invalid"),
    "pool of foreign layers": (lambda ck: _state(ck, _set("attr_pool", {"sentiment": [{"0": [0], "77": [1]}]})),
                               "keep-set"),
    "pool not an object": (lambda ck: _state(ck, _set("adv_pool", [1])), "state.json is invalid"),
    "model truncated": (lambda ck: (ck / "latest" / "model.safetensors").write_bytes(
        (ck / "latest" / "model.safetensors").read_bytes()[:5000]), "model.safetensors"),
    "model of another shape": (lambda ck: _tensors(ck / "latest" / "model.safetensors",
                                                   lambda t: t.update({(k := _first_matrix(t)): t[k][:1].clone()})),
                               "not this model's"),
    "model lacks a tensor": (lambda ck: _tensors(ck / "latest" / "model.safetensors",
                                                 lambda t: t.pop(_first_matrix(t))), "lacks"),
    "optimizer key without index": (lambda ck: _tensors(ck / "latest" / "optimizer.safetensors",
                                                        lambda t: t.update({"nodot": t[sorted(t)[0]].clone()})),
                                    "not this optimizer's state"),
    "optimizer of another shape": (lambda ck: _tensors(ck / "latest" / "optimizer.safetensors",
                                                       lambda t: t.update({(k := _first_matrix(t)): t[k][:1].clone()})),
                                   "not this optimizer's state"),
    "optimizer missing": (lambda ck: (ck / "latest" / "optimizer.safetensors").unlink(), "optimizer.safetensors is missing"),
    "state.json a FIFO": (lambda ck: ((ck / "latest" / "state.json").unlink(), os.mkfifo(ck / "latest" / "state.json")),
                          "not a regular file"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_a_clean_error_with_resume(made, tmp_path, case):
    ck = _copy(made, tmp_path)
    damage, phrase = DAMAGE[case]
    damage(ck)
    code, out = _entangle(made, tmp_path, ck, "--resume")
    assert code == 3, out
    assert "cannot be resumed" in out and phrase in out and "Run without --resume" in out, out
    assert not (tmp_path / "x").exists() and (ck / "latest").is_dir()      # nothing written, nothing removed


@pytest.mark.parametrize("what", ["latest", "model.safetensors", "state.json"])
def test_a_link_out_of_the_checkpoint_dir_is_never_followed(made, tmp_path, what):
    """A checkpoint (or one of its files) swapped for a link to a copy elsewhere: before, --resume read
    it and finished the run from it; now it is refused, and without --resume the run starts again
    and removes only its own directory: the link's target stays as it was."""
    ck = _copy(made, tmp_path)
    outside = tmp_path / "elsewhere"
    src = ck / "latest" / what if what != "latest" else ck / "latest"
    shutil.move(str(src), outside)
    src.symlink_to(outside)
    before = {p: p.read_bytes() for p in ([outside] if outside.is_file() else sorted(outside.iterdir()))}
    code, out = _entangle(made, tmp_path, ck, "--resume")
    assert code == 3 and "symbolic link" in out and "inside --checkpoint-dir" in out, out
    assert not (tmp_path / "x").exists()
    code, out = _entangle(made, tmp_path, ck)             # starts again (the damaged checkpoint is replaced)
    assert code == 0, out
    assert (tmp_path / "x" / "entangle.json").is_file() and not ck.exists()
    assert {p: p.read_bytes() for p in before} == before


def test_a_marker_linked_to_a_users_file_is_refused_and_the_file_kept(made, tmp_path):
    """Before, the checkpoint directory's marker was written through the link: the user's file was overwritten."""
    ck = _copy(made, tmp_path)
    user = tmp_path / "notes.txt"
    user.write_bytes(USER)
    (ck / OUTPUT_MARKER).unlink()
    (ck / OUTPUT_MARKER).symlink_to(user)
    for extra in (("--resume",), ()):
        code, out = _entangle(made, tmp_path, ck, *extra)
        assert code == 3 and "refusing to write into it" in out, out
        assert user.read_bytes() == USER and not (tmp_path / "x").exists()


def test_a_checkpoint_dir_that_is_a_link_or_another_output_is_refused(made, tmp_path):
    """A linked --checkpoint-dir (before: written through, and left behind at the end) and an earlier
    moeharden output given as --checkpoint-dir (before: adopted, and deleted at the end)."""
    from moeharden.defend.entangle.resume import remove_checkpoint_dir

    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    code, out = _entangle(made, tmp_path, tmp_path / "link")
    assert code == 3 and "symbolic link" in out and "Pass the directory it points to" in out, out
    assert list(real.iterdir()) == []
    release = tmp_path / "release"            # e.g. a pruned model moeharden wrote
    release.mkdir()
    (release / OUTPUT_MARKER).write_text('{"tool": "moeharden", "version": "0.1"}\n')
    (release / "model.safetensors").write_bytes(USER)
    code, out = _entangle(made, tmp_path, release)
    assert code == 3 and "another moeharden output" in out, out
    assert not remove_checkpoint_dir(release) and not remove_checkpoint_dir(tmp_path / "link")
    assert (release / "model.safetensors").read_bytes() == USER and not (tmp_path / "x").exists()


def test_a_fifo_state_does_not_hang_a_run_without_resume(made, tmp_path):
    """Before, reading the checkpoint's run fingerprint opened the FIFO and blocked forever."""
    ck = _copy(made, tmp_path)
    (ck / "latest" / "state.json").unlink()
    os.mkfifo(ck / "latest" / "state.json")
    code, out = _entangle(made, tmp_path, ck)
    assert code == 0, out
    assert (tmp_path / "x" / "entangle.json").is_file()


def test_the_demo_starts_again_from_its_own_damaged_checkpoint(made, tmp_path):
    """``resume_if_same`` (the demo): a checkpoint of this very run that is damaged is started again,
    from the original weights (nothing was loaded before the damage was found)."""
    import torch

    from moeharden.defend.entangle.loop import entangle_model
    from moeharden.defend.entangle.recipe import load_recipe
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    model_dir, recipe_path, _ = made
    ck = _copy(made, tmp_path)
    _tensors(ck / "latest" / "optimizer.safetensors", lambda t: t.update({"nodot": t[sorted(t)[0]].clone()}))
    recipe, tok = load_recipe(recipe_path), load_tokenizer(model_dir)
    tasks = load_tasks(None, checkpoint_dir=model_dir, limit=8, seed=None)
    model = load_model(model_dir)
    hist, done = entangle_model(model, tok, tasks, recipe, ckpt_dir=ck, resume_if_same=True, stop_after=1)
    assert done == 1 and [h["step"] for h in hist] == [1]
    fresh = load_model(model_dir)
    hist2, _ = entangle_model(fresh, tok, tasks, recipe, stop_after=1)      # one step from the original
    for (n, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


# --------------------------------------------------------------------------- the ladder's journal
def test_a_hard_linked_journal_is_refused_and_the_users_file_kept(tmp_path):
    """Before, the journal truncated its file to its header: a hard link to a user's file emptied it."""
    from moeharden.io.journal import JOURNAL_FILE, Journal

    user = tmp_path / "notes.txt"
    user.write_bytes(USER)
    d = tmp_path / "j"
    Journal(d, "fp").close()
    (d / JOURNAL_FILE).unlink()
    os.link(user, d / JOURNAL_FILE)
    with pytest.raises(InputError, match="other hard links"):
        Journal(d, "fp")
    assert user.read_bytes() == USER


def test_a_deeply_nested_journal_line_ends_the_journal(tmp_path):
    """A garbled line ends the journal (the lines before it are kept), however deep it nests."""
    from moeharden.io.journal import JOURNAL_FILE, SCHEMA, Journal

    d = tmp_path / "j"
    Journal(d, "fp").close()
    head = json.dumps({"schema": SCHEMA, "fingerprint": "fp"}) + "\n" + json.dumps({"key": "a", "record": {"n": 1}}) + "\n"
    (d / JOURNAL_FILE).write_text(head + "[" * 100_000 + "\n")
    with Journal(d, "fp") as j:
        assert j.done == {"a": {"n": 1}}
    assert (d / JOURNAL_FILE).read_text() == head


def test_a_journal_path_holding_another_moeharden_output_is_refused_and_kept(tmp_path):
    """Before, any directory with a ``.moeharden-output`` marker was adopted as the journal and deleted
    once the scan's output was in place (a release moved to ``.scan.ladder-journal`` was lost)."""
    from moeharden.io.journal import Journal, check_journal_dir, journal_dir, remove_journal

    d = journal_dir(tmp_path / "scan", "ladder")
    d.mkdir()
    (d / OUTPUT_MARKER).write_text('{"tool": "moeharden", "version": "0.1"}\n')
    (d / "model.safetensors").write_bytes(USER)
    for claim in (check_journal_dir, lambda p: Journal(p, "fp")):
        with pytest.raises(InputError, match="another moeharden output"):
            claim(d)
    assert not remove_journal(d) and (d / "model.safetensors").read_bytes() == USER
    Journal(tmp_path / "ours", "fp").close()          # a journal's own directory is still reused and removed
    check_journal_dir(tmp_path / "ours")
    assert remove_journal(tmp_path / "ours") and not (tmp_path / "ours").exists()


def test_a_journal_record_under_a_key_that_is_not_json_is_run_again():
    """A journaled curve is read back only under its own job's key: a key that is not JSON (or not
    one of ours) makes it a curve to run again, not an internal error."""
    from moeharden.audit.ladder import valid_curve

    record = {"task": "t", "reference": "pruned", "attack": "labels", "mode": "full", "strategy": "random",
              "seed": 0, "keep": 2, "points": [], "seconds": 1.0}
    assert valid_curve(json.dumps(["t", "pruned", "labels", "random", 0]), record)
    for key in ("not json", "[" * 100_000, json.dumps(["t", "pruned", "labels", "random", 1])):
        assert not valid_curve(key, record)


def _forbid(monkeypatch, module, name: str) -> None:
    """Make ``module.name`` fail the test if called: the refusal must come before that work."""
    def called(*_a, **_k):
        raise AssertionError(f"{name} was called")

    monkeypatch.setattr(module, name, called)


@pytest.mark.parametrize("where", [".scan.ladder-journal", ".verify.ladder-journal", ".entangled.entangle-ckpt"])
def test_the_demo_refuses_a_users_file_at_its_resume_paths_before_any_work(tmp_path, monkeypatch, where):
    """The demo checks where it keeps journals and checkpoints before it trains or loads anything."""
    from moeharden.demo import pipeline

    _forbid(monkeypatch, pipeline, "build_demo_model")
    out = tmp_path / "demo"
    out.mkdir()
    (out / where).write_bytes(USER)
    with pytest.raises(InputError):
        pipeline.run_demo(out)
    assert (out / where).read_bytes() == USER


def test_entangle_refuses_a_users_checkpoint_dir_before_loading_the_model(made, tmp_path, monkeypatch):
    from moeharden.model import checkpoint

    _forbid(monkeypatch, checkpoint, "load_model")
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "notes.txt").write_bytes(USER)
    code, output = _entangle(made, tmp_path, ck)
    assert code == 3 and "not empty" in output, output
    assert (ck / "notes.txt").read_bytes() == USER and not (tmp_path / "x").exists()
