"""Hostile and careless output paths: what moeharden writes never replaces, deletes or writes through
what it did not write.

One test per defect, through the CLI where it can be: ``report`` over a user's file or through a link,
an ``--out`` inside one of the command's inputs, an ``--out`` that is a link, a re-run deleting files
the user added to an earlier output, and ``entangle --checkpoint-dir`` inside ``--out``. Each asserts
the documented exit code (3), one paragraph and no traceback, the user's files byte-identical, and no
temporary file left behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import InputError
from moeharden.io.outputs import (
    OUTPUT_MARKER,
    atomic_output_dir,
    check_output_dir,
    marker_files,
    marker_kind,
    record_files,
    replace_dir,
    temp_sibling,
    write_files,
)

runner = CliRunner()
KEEP = {"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}}        # the tiny Mixtral: 2 MoE layers, 8 experts


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert "Internal error" not in res.output, res.output
    return res


def _refused(res, *words):
    """Exit 3 with a one-paragraph message naming ``words``."""
    assert res.exit_code == 3, res.output
    assert "\n\n" not in res.output.strip(), res.output           # one paragraph
    for w in words:
        assert w in " ".join(res.output.split()), res.output     # Rich may wrap long paths


def _hashes(root: Path) -> dict[str, str]:
    """Every path under ``root`` (links not followed) and what it is: a file's hash, a link's target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def _litter(root: Path) -> list[str]:
    """Temporary or renamed-away leftovers of moeharden under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*")
                  if ".tmp-" in p.name or ".old-" in p.name)


def _copy(src: Path, tmp_path: Path, name: str = "ck") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _keep(tmp_path: Path) -> Path:
    p = tmp_path / "keep.json"
    p.write_text(json.dumps(KEEP))
    return p


def _scan_doc() -> dict:
    """A minimal valid scan document (no plots to draw: rendering it takes milliseconds)."""
    point = {"keep": None, "retained": None, "method": None}
    model = {"path": "/m", "name": "m", "family": "Mixtral", "model_type": "mixtral", "num_experts": 8, "top_k": 2,
             "moe_layers": [0, 1], "config_sha256": "c" * 64, "safetensors_digest": "d" * 64}
    return {"schema": "moeharden.scan/1", "tool": {"name": "moeharden", "version": "0"}, "created": "2026-01-01",
            "model": model,
            "settings": {"methods": ["frequency"], "keeps": [4], "ranking": "per_layer", "limit": None, "seed": 0,
                         "random_seeds": 1},
            "tasks": [{"name": "t", "kind": "multiple_choice", "metric": "accuracy", "full": 1.0, "chance": 0.5,
                       "n_attribution": 4, "n_evaluation": 4}],
            "attribution": {}, "keep_sets": {}, "sweep": [],
            "headline": {"t": {"keep_25": point, "keep_50": point}}, "timings": {}}


@pytest.fixture
def scan_json(tmp_path) -> Path:
    p = tmp_path / "scan-src" / "scan.json"
    p.parent.mkdir()
    p.write_text(json.dumps(_scan_doc()))
    return p


# ---------------------------------------------------------------- 1. report

def test_report_never_writes_through_a_link_beside_the_json(tmp_path, scan_json):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(scan_json, d / "scan.json")
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    (d / "report.md").symlink_to(victim)
    before = _hashes(d)
    res = _run("report", d / "scan.json")
    _refused(res, "report.md", "symbolic link")
    assert victim.read_text() == "victim\n"
    assert _hashes(d) == before and _litter(tmp_path) == []


def test_report_never_overwrites_a_users_file_beside_the_json(tmp_path, scan_json):
    d = tmp_path / "d"
    d.mkdir()
    shutil.copy(scan_json, d / "scan.json")
    (d / "report.md").write_text("my notes\n")
    before = _hashes(d)
    res = _run("report", d / "scan.json")
    _refused(res, "report.md", "not written by moeharden")
    assert _hashes(d) == before and not (d / "report.html").exists() and _litter(tmp_path) == []


def test_report_into_a_marked_out_refuses_a_link_there(tmp_path, scan_json):
    o = tmp_path / "o"
    assert _run("report", scan_json, "--out", o).exit_code == 0            # o is now moeharden's
    assert marker_files(o / OUTPUT_MARKER) >= {"report.md", "report.html"}
    victim = tmp_path / "victim.txt"
    victim.write_text("victim\n")
    (o / "report.md").unlink()
    (o / "report.md").symlink_to(victim)
    before = _hashes(o)
    _refused(_run("report", scan_json, "--out", o), "report.md", "symbolic link")
    assert victim.read_text() == "victim\n" and _hashes(o) == before and _litter(tmp_path) == []
    link = tmp_path / "link-out"                            # an --out that is itself a link
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    _refused(_run("report", scan_json, "--out", link), "symbolic link")
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_report_refreshes_its_own_files_atomically(tmp_path, scan_json):
    """What a user expects still works: re-rendering into a scan output replaces the reports moeharden
    wrote there, and a report into a fresh --out marks it as moeharden's."""
    s = tmp_path / "s"
    with atomic_output_dir(s, kind="scan") as tmp:
        shutil.copy(scan_json, tmp / "scan.json")
        (tmp / "report.md").write_text("old\n")
        (tmp / "report.html").write_text("old\n")
    assert marker_files(s / OUTPUT_MARKER) == {"scan.json", "report.md", "report.html"}
    res = _run("report", s / "scan.json")
    assert res.exit_code == 0, res.output
    assert (s / "report.md").read_text().startswith("# moeharden scan") and _litter(tmp_path) == []
    assert marker_kind(s / OUTPUT_MARKER) == "scan"
    fresh = tmp_path / "fresh"
    assert _run("report", scan_json, "--out", fresh).exit_code == 0
    assert sorted(p.name for p in fresh.iterdir()) == [OUTPUT_MARKER, "report.html", "report.md"]
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    _refused(_run("report", bad, "--out", tmp_path / "never"), "schema")
    assert not (tmp_path / "never").exists()                 # an invalid document creates nothing


def test_write_files_leaves_no_temporary_file_on_failure(tmp_path, monkeypatch):
    import os

    d = tmp_path / "d"
    d.mkdir()
    (d / "mine.txt").write_text("mine")

    def broken(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        write_files(d, {"a.txt": "new", "b.txt": "b"})
    assert sorted(p.name for p in d.iterdir()) == ["mine.txt"] and (d / "mine.txt").read_text() == "mine"


# ---------------------------------------------------------------- 2. --out inside an input

@pytest.fixture
def lock_inputs(locked_release, tmp_path):
    """A copy of the session's tiny Mixtral source, its policy and keys, and a copy of its release."""
    return (_copy(locked_release / "src", tmp_path), locked_release / "policy.yaml", locked_release / "keys",
            _copy(locked_release / "locked", tmp_path, "rel"))


@pytest.mark.parametrize("command", ["prune", "prune-via-link", "lock", "scan", "entangle", "verify"])
def test_an_out_inside_an_input_is_refused_before_any_work(lock_inputs, tmp_path, scan_json, command):
    ck, policy, keys, rel = lock_inputs
    link = tmp_path / "ck-link"
    link.symlink_to(ck, target_is_directory=True)
    args = {
        "prune": ["prune", ck, "--experts-from", _keep(tmp_path), "--out", ck / "sub"],
        "prune-via-link": ["prune", ck, "--experts-from", _keep(tmp_path), "--out", link / "sub"],
        "lock": ["lock", ck, "--policy", policy, "--key", keys / "moeharden.key", "--out", ck / "locked"],
        "scan": ["scan", ck, "--out", ck / "s"],
        "entangle": ["entangle", ck, "--out", ck / "e", "--steps", "1"],
        "verify": ["verify", rel, "--pubkey", keys / "moeharden.pub", "--baseline", scan_json, "--out", rel / "v"],
    }[command]
    target = rel if command == "verify" else ck
    before = _hashes(target)
    _refused(_run(*args), "lies inside the input")
    assert _hashes(target) == before and _litter(tmp_path) == []
    if command == "verify":                                  # the signed release still verifies
        assert _run("verify", rel, "--pubkey", keys / "moeharden.pub").exit_code == 0


def test_check_output_dir_refuses_an_out_inside_an_input_directory(tmp_path):
    inp = tmp_path / "in"
    (inp / "deep").mkdir(parents=True)
    for out in (inp / "x", inp / "deep" / "x" / "y"):
        with pytest.raises(InputError, match="lies inside the input"):
            check_output_dir(out, inputs=[inp])
    check_output_dir(tmp_path / "beside", inputs=[inp])      # a sibling is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ---------------------------------------------------------------- 3. --out that is a link

def test_an_out_that_is_a_link_is_refused_and_kept(tiny_mixtral_ckpt, tmp_path):
    udir = tmp_path / "udir"
    udir.mkdir()
    out = tmp_path / "out"
    out.symlink_to(udir, target_is_directory=True)
    before = _hashes(tmp_path)
    res = _run("prune", tiny_mixtral_ckpt, "--experts-from", _keep(tmp_path), "--out", out)
    _refused(res, "symbolic link")
    assert out.is_symlink() and out.readlink() == udir and list(udir.iterdir()) == []
    assert {k: v for k, v in _hashes(tmp_path).items() if k != "keep.json"} == before and _litter(tmp_path) == []
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="symbolic link"):
        check_output_dir(dangling)
    t = temp_sibling(tmp_path / "x")
    with pytest.raises(InputError, match="symbolic link"):   # the one swap itself never renames a link away
        replace_dir(t, out)
    assert out.is_symlink() and _litter(tmp_path) == [t.name]
    shutil.rmtree(t)


# ---------------------------------------------------------------- 4. re-running into an earlier output

def test_rerunning_into_an_earlier_output_keeps_the_users_files(tiny_mixtral_ckpt, tmp_path):
    keep, o = _keep(tmp_path), tmp_path / "o"
    assert _run("prune", tiny_mixtral_ckpt, "--experts-from", keep, "--out", o).exit_code == 0
    written = marker_files(o / OUTPUT_MARKER)
    assert written and "config.json" in written and OUTPUT_MARKER not in written
    assert _run("prune", tiny_mixtral_ckpt, "--experts-from", keep, "--out", o).exit_code == 0   # a refresh
    (o / "NOTES.txt").write_text("mine\n")
    before = _hashes(o)
    res = _run("prune", tiny_mixtral_ckpt, "--experts-from", keep, "--out", o)
    _refused(res, "NOTES.txt", "did not write")
    assert _hashes(o) == before and _litter(tmp_path) == []


def test_a_file_added_deep_inside_an_output_or_an_old_marker(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out, kind="scan") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("{}")
    assert marker_files(out / OUTPUT_MARKER) == {"sub", "sub/a.json"}
    (out / "sub" / "mine.txt").write_text("mine")
    with pytest.raises(InputError, match="sub/mine.txt"):
        check_output_dir(out, kind="scan")
    (out / "sub" / "mine.txt").unlink()
    (out / "mine-dir").mkdir()                              # an empty folder of the user's is theirs too
    with pytest.raises(InputError, match="mine-dir"):
        check_output_dir(out, kind="scan")
    # a marker written before file lists were recorded: replaceable as before
    (out / OUTPUT_MARKER).write_text('{"tool": "moeharden", "version": "0.1", "kind": "scan"}\n')
    check_output_dir(out, kind="scan")
    assert marker_files(out / OUTPUT_MARKER) is None and marker_kind(out / OUTPUT_MARKER) == "scan"


def test_a_signed_output_keeps_its_marker_as_signed(tmp_path):
    """A signature made inside the block covers the marker: it is not rewritten at the end. The list
    recorded just before signing (record_files) still protects a user's file added later."""
    out = tmp_path / "rel"
    with atomic_output_dir(out, kind="lock") as tmp:
        (tmp / "a.safetensors").write_bytes(b"w")
        record_files(tmp, also=("model.sig",))
        signed = (tmp / OUTPUT_MARKER).read_bytes()
        (tmp / "model.sig").write_text("sig")
    assert (out / OUTPUT_MARKER).read_bytes() == signed
    assert marker_files(out / OUTPUT_MARKER) == {"a.safetensors", "model.sig"}
    check_output_dir(out, kind="lock")
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(InputError, match="NOTES.txt"):
        check_output_dir(out, kind="lock")


def test_the_signature_name_agrees_with_defend_signing():
    from moeharden.defend.signing import SIGNATURE_NAME
    from moeharden.io import outputs

    assert outputs._SIGNATURE == SIGNATURE_NAME


# ---------------------------------------------------------------- 5. entangle --checkpoint-dir

@pytest.mark.parametrize("where", ["inside-out", "is-out", "holds-out", "inside-ckpt"])
def test_entangle_checkpoint_dir_clashing_with_out_or_input_is_refused_first(tiny_mixtral_ckpt, tmp_path, where):
    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    out = tmp_path / "out"
    cdir = {"inside-out": out / "ckpts", "is-out": out, "holds-out": tmp_path,
            "inside-ckpt": ck / "ckpts"}[where]
    before = _hashes(tmp_path)
    res = _run("entangle", ck, "--out", out, "--steps", "2", "--limit", "4", "--checkpoint-every", "1",
               "--checkpoint-dir", cdir)
    _refused(res, "--checkpoint-dir")
    assert not out.exists() and _hashes(tmp_path) == before and _litter(tmp_path) == []
