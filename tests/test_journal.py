"""A run's journal of finished learning curves: an interrupted scan or verify resumes where it stopped,
gives the document an uninterrupted run gives, and never reads or writes what moeharden did not write."""

from __future__ import annotations

import json

import pytest

from moeharden.attack.realign import ladder_suite
from moeharden.attack.realign.ladder import LadderSettings
from moeharden.attack.realign.ladder_suite import AttackPlan
from moeharden.errors import InputError
from moeharden.io.journal import JOURNAL_FILE, Journal, journal_dir, remove_journal
from moeharden.io.outputs import OUTPUT_MARKER

PLAN = AttackPlan(seeds=(0, 1), validation_size=8, strategies=("random",),
                  ladder=LadderSettings(rungs=(0, 8, 16), prompt_rungs=(0, 8), lrs=(1e-3, 3e-3), steps=(2, 4),
                                        batch_size=4))


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model's ladders on one compute thread: beside another test file (pytest-xdist on 2
    cores) two threads per process oversubscribe the cores and every file slows down many times."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- the journal itself
def test_finished_units_come_back_under_the_same_fingerprint_only(tmp_path):
    d = tmp_path / ".out.ladder-journal"
    with Journal(d, "fp-1") as j:
        assert j.resumed == 0
        j.add("a", {"x": 1})
        j.add("b", {"x": [2, 3]})
    with Journal(d, "fp-1") as j:
        assert j.done == {"a": {"x": 1}, "b": {"x": [2, 3]}} and j.resumed == 2
        j.add("c", {"x": 4})
    with Journal(d, "fp-1") as j:
        assert sorted(j.done) == ["a", "b", "c"]
    with Journal(d, "fp-2") as j:               # other inputs: nothing is reused, the file starts again
        assert j.done == {}
        j.add("z", {})
    lines = [json.loads(x) for x in (d / JOURNAL_FILE).read_text().splitlines()]
    assert lines == [{"schema": "moeharden.journal/1", "fingerprint": "fp-2"}, {"key": "z", "record": {}}]


def test_two_runs_of_the_same_output_cannot_share_a_journal(tmp_path):
    first = Journal(tmp_path / "j", "fp")
    with pytest.raises(InputError, match="Another moeharden run"):
        Journal(tmp_path / "j", "fp")
    first.add("a", {})
    first.close()
    with Journal(tmp_path / "j", "fp") as j:
        assert j.done == {"a": {}}


def test_a_torn_last_line_is_dropped_and_the_journal_goes_on(tmp_path):
    d = tmp_path / "j"
    with Journal(d, "fp") as j:
        j.add("a", {"x": 1})
    with open(d / JOURNAL_FILE, "ab") as f:
        f.write(b'{"key": "b", "rec')             # the process died mid-write
    with Journal(d, "fp") as j:
        assert j.done == {"a": {"x": 1}}
        j.add("c", {"x": 3})
    with Journal(d, "fp") as j:
        assert j.done == {"a": {"x": 1}, "c": {"x": 3}}


def test_the_journal_sits_beside_the_output_and_is_removed_only_when_moeharden_wrote_it(tmp_path):
    assert journal_dir(tmp_path / "scan", "ladder") == tmp_path / ".scan.ladder-journal"
    Journal(tmp_path / "j", "fp").close()
    assert remove_journal(tmp_path / "j") and not (tmp_path / "j").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert not remove_journal(foreign) and (foreign / "notes.txt").read_text() == "mine"


def test_a_directory_or_link_moeharden_did_not_write_is_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not written by moeharden"):
        Journal(foreign, "fp")
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / "link").symlink_to(foreign, target_is_directory=True)
    with pytest.raises(InputError, match="not a directory moeharden wrote"):
        Journal(tmp_path / "link", "fp")
    d = tmp_path / "j"
    d.mkdir()
    (d / OUTPUT_MARKER).write_text("{}\n")
    (d / JOURNAL_FILE).symlink_to(outside)        # the journal file swapped for a link to a user's file
    with pytest.raises(InputError):
        Journal(d, "fp")
    m = tmp_path / "m"
    m.mkdir()
    (m / OUTPUT_MARKER).symlink_to(outside)       # the marker swapped for a link to a user's file
    with pytest.raises(InputError, match="not a file moeharden wrote"):
        Journal(m, "fp")
    assert outside.read_text() == "keep"


def test_scan_refuses_at_once_when_its_journal_path_holds_a_users_file(ckpt, tmp_path):
    from typer.testing import CliRunner

    from moeharden.cli import app

    (tmp_path / ".scan.ladder-journal").write_text("my notes")
    res = CliRunner().invoke(app, ["scan", str(ckpt), "--out", str(tmp_path / "scan"), "--ladder", "--limit", "8"])
    assert res.exit_code == 3, res.output
    assert "ladder-journal" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == [".scan.ladder-journal"]
    assert (tmp_path / ".scan.ladder-journal").read_text() == "my notes"


# --------------------------------------------------------------------------- scan and verify, interrupted
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from moeharden.demo import build as demo

    return demo.build_demo_model(tmp_path_factory.mktemp("journal") / "model", steps=30)


def _scan(ckpt, out, workers=1):
    from moeharden.audit.scan import ScanSettings, scan

    return scan(str(ckpt), out, tasks=[f"{ckpt / 'moeharden-tasks.yaml'}#sentiment"],
                settings=ScanSettings(limit=32, train_limit=64, ladder=True, plan=PLAN, workers=workers,
                                      methods=("frequency",)))


def _curves(doc: dict) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "seconds"} for c in doc["ladder"]["curves"]]


REAL_RUN_JOB = ladder_suite.run_job


class Interrupt:
    """``run_job`` that lets ``n`` curves finish, then raises KeyboardInterrupt; counts the curves run."""

    def __init__(self, n: int | None):
        self.n, self.ran, self.real = n, [], REAL_RUN_JOB

    def __call__(self, ctx, job):
        if self.n is not None and len(self.ran) >= self.n:
            raise KeyboardInterrupt
        self.ran.append(job)
        return self.real(ctx, job)


def test_an_interrupted_scan_resumes_and_writes_what_an_uninterrupted_one_writes(ckpt, tmp_path, monkeypatch):
    whole = _scan(ckpt, tmp_path / "whole")
    total = len(whole.data.ladder.curves)
    assert total == len(ladder_suite.plan_jobs(["sentiment"], PLAN)) == 12 and not journal_dir(tmp_path / "whole", "ladder").exists()

    out = tmp_path / "scan"
    first = Interrupt(3)
    monkeypatch.setattr(ladder_suite, "run_job", first)
    with pytest.raises(KeyboardInterrupt):
        _scan(ckpt, out)
    jdir = journal_dir(out, "ladder")
    assert not out.exists()                              # no half-written output
    assert len((jdir / JOURNAL_FILE).read_text().splitlines()) == 1 + 3

    second = Interrupt(None)
    monkeypatch.setattr(ladder_suite, "run_job", second)
    res = _scan(ckpt, out)
    assert len(second.ran) == total - 3                   # the three finished curves were not run again
    assert {(j.reference, j.attack, j.seed) for j in second.ran}.isdisjoint(
        {(j.reference, j.attack, j.seed) for j in first.ran})
    doc = json.loads((out / "scan.json").read_text())
    assert _curves(doc) == _curves(json.loads((tmp_path / "whole" / "scan.json").read_text()))
    assert doc["ladder"]["summary"] == json.loads((tmp_path / "whole" / "scan.json").read_text())["ladder"]["summary"]
    assert doc["ladder"]["resumed_curves"] == 3 and whole.data.ladder.resumed_curves == 0   # the document says so
    assert res.out == out and not jdir.exists()           # removed once the output is in place


def test_a_journal_of_other_weights_is_not_reused(ckpt, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "scan"
    monkeypatch.setattr(ladder_suite, "run_job", Interrupt(4))
    with pytest.raises(KeyboardInterrupt):
        _scan(ckpt, out)
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    w = load_file(str(other / "model.safetensors"))
    name = next(n for n in w if "embed" in n)
    w[name] = w[name].clone()
    w[name][0, 0] += 1e-3                                   # one weight changed
    save_file(w, str(other / "model.safetensors"), metadata={"format": "pt"})
    again = Interrupt(None)
    monkeypatch.setattr(ladder_suite, "run_job", again)
    res = _scan(other, out)
    assert len(again.ran) == 12                              # every curve run again on the new weights
    assert res.data.ladder.resumed_curves == 0


def test_with_two_workers_finished_curves_are_journaled_as_they_end_and_read_back(ckpt, tmp_path):
    """The worker-pool path: a journal holding some curves runs only the others, in two processes."""
    from moeharden.audit.ladder import journal_fingerprint, strongest_keepset
    from moeharden.audit.scan import limit_tasks
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    whole = _scan(ckpt, tmp_path / "whole")
    curves = whole.data.to_json()["ladder"]["curves"]
    jobs = ladder_suite.plan_jobs(["sentiment"], PLAN)
    model, tok = load_model(ckpt), load_tokenizer(ckpt)
    tasks = limit_tasks(load_tasks([f"{ckpt / 'moeharden-tasks.yaml'}#sentiment"], checkpoint_dir=ckpt), 32, 64)
    keepsets = {"sentiment": strongest_keepset(whole.data, "sentiment", whole.data.ladder.settings["keeps"]["sentiment"])}
    fp = journal_fingerprint(model, tok, tasks, keepsets, PLAN)
    out = tmp_path / "scan"
    with Journal(journal_dir(out, "ladder"), fp) as j:    # as if an earlier run had finished four curves
        for job, c in list(zip(jobs, curves, strict=True))[:4]:
            j.add(ladder_suite.job_key(job), {**c, "seconds": 1234.5})
        j.add(ladder_suite.job_key(jobs[4]), {**curves[4], "points": "not points"})    # not a curve: run again
        j.add(ladder_suite.job_key(jobs[5]), curves[6])                               # another job's curve: run again
    res = _scan(ckpt, out, workers=2)
    got = res.data.to_json()["ladder"]["curves"]
    assert [c["seconds"] for c in got[:4]] == [1234.5] * 4 and all(c["seconds"] < 1000 for c in got[4:])
    assert res.data.ladder.resumed_curves == 4                # the two records that did not validate ran again
    assert _curves({"ladder": {"curves": got}}) == _curves({"ladder": {"curves": curves}})
    assert not journal_dir(out, "ladder").exists()


def test_a_verify_stopped_in_its_null_curves_resumes_them(ckpt, tmp_path, monkeypatch):
    """verify --null-seeds journals the null's curves beside the ladder's: a verify stopped after
    three null curves runs only the other five again, and writes the uninterrupted verify's section."""
    from moeharden.audit.verify import VerifySettings, verify_attacks

    base = _scan(ckpt, tmp_path / "scan").out / "scan.json"
    settings = VerifySettings(null_seeds=4)
    whole = verify_attacks(str(ckpt), base, tmp_path / "whole", settings=settings).data.to_json()["head_start_null"]
    n_ladder = len(ladder_suite.plan_jobs(["sentiment"], PLAN, skip={("sentiment", "scratch", "labels"),
                                                                     ("sentiment", "scratch", "distill")}))
    out = tmp_path / "verify"
    monkeypatch.setattr(ladder_suite, "run_job", Interrupt(n_ladder + 3))
    with pytest.raises(KeyboardInterrupt):
        verify_attacks(str(ckpt), base, out, settings=settings)
    again = Interrupt(None)
    monkeypatch.setattr(ladder_suite, "run_job", again)
    got = verify_attacks(str(ckpt), base, out, settings=settings).data.to_json()["head_start_null"]
    assert len(again.ran) == len(whole["curves"]) - 3 == 5 and all(j.seed >= 1000 for j in again.ran)
    strip = [{k: v for k, v in c.items() if k != "seconds"} for c in got["curves"]]
    assert strip == [{k: v for k, v in c.items() if k != "seconds"} for c in whole["curves"]]
    assert got["rows"] == whole["rows"] and not journal_dir(out, "ladder").exists()


@pytest.mark.slow
def test_a_demo_stopped_in_verify_runs_again_without_redoing_the_scan_or_entangle(ckpt, tmp_path, monkeypatch):
    from moeharden.demo.pipeline import run_pipeline

    out = tmp_path / "demo"
    kw = {"entangle_overrides": {"steps": 4}, "limit": 16, "workers": 1, "plan": PLAN}
    n_scan = 3 * len(ladder_suite.plan_jobs(["sentiment"], PLAN))              # the demo model's three tasks
    first = Interrupt(n_scan + 2)                                               # the scan, then two verify curves
    monkeypatch.setattr(ladder_suite, "run_job", first)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(out, ckpt, **kw)
    assert (out / "scan" / "scan.json").is_file() and not (out / "verify").exists()
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert kept == [".entangled.entangle-ckpt", ".scan.ladder-journal", ".verify.ladder-journal"]
    again = Interrupt(None)
    monkeypatch.setattr(ladder_suite, "run_job", again)
    res = run_pipeline(out, ckpt, **kw)
    assert {j.reference for j in again.ran} <= {"pruned", "shared"}             # verify's curves only (scratch reused)
    assert len(again.ran) == 3 * len(ladder_suite.plan_jobs(["sentiment"], PLAN)) * 2 // 3 - 2
    assert json.loads((res.out / "verify" / "verify.json").read_text())["attack"]["ladder"]["resumed_curves"] == 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing left to resume
