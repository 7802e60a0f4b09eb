"""Output directories: the atomic swap (io.outputs.atomic_output_dir / replace_dir) and
copy_side_files (io.sidefiles), the one way a derived checkpoint takes files from its source.

Each copy rule is checked on a source built to break it: a symlink to a secret outside the
checkpoint, a FIFO (which would block a naive copy forever), custom code, stale integrity files,
weights of other formats. Expected file sets are written out by hand, not computed by the code.
"""

from __future__ import annotations

import os

import pytest

from moeharden.errors import InputError
from moeharden.io.outputs import (
    OUTPUT_MARKER,
    atomic_output_dir,
    check_output_dir,
    replace_dir,
    temp_sibling,
)
from moeharden.io.sidefiles import SIDE_FILE_SKIP, copy_side_files


# --------------------------------------------------------------------------- atomic output
def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_failure_leaves_nothing(tmp_path, exc):
    out = tmp_path / "out"
    with pytest.raises(exc), atomic_output_dir(out) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise exc()
    assert not out.exists() and _leftovers(out) == []


def test_atomic_dir_gets_ordinary_permissions(tmp_path):
    import os

    out, plain = tmp_path / "out", tmp_path / "plain"
    plain.mkdir()
    with atomic_output_dir(out):
        pass
    assert os.stat(out).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_an_output_is_replaced_only_by_an_output_of_its_own_kind(tmp_path):
    """The marker records what wrote the directory; a re-run of the same command refreshes it, another
    command refuses it (a release, a baseline scan, a journal are not a prune's to replace), and a
    marker of an older moeharden (no kind) counts as any kind."""
    import json

    out = tmp_path / "out"
    with atomic_output_dir(out, kind="scan") as tmp:
        (tmp / "scan.json").write_text("{}")
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "scan"
    with atomic_output_dir(out, kind="scan") as tmp:               # the same command again: refreshed
        (tmp / "scan.json").write_text('{"again": 1}')
    for other in ("verify", "prune", "lock"):
        with pytest.raises(InputError, match="holds a moeharden scan output"):
            check_output_dir(out, kind=other)
        with pytest.raises(InputError), atomic_output_dir(out, kind=other):
            pass
    assert (out / "scan.json").read_text() == '{"again": 1}'
    (out / OUTPUT_MARKER).write_text('{"tool": "moeharden", "version": "0.1"}\n')   # written before kinds
    check_output_dir(out, kind="verify")
    journal = tmp_path / "j"
    journal.mkdir()
    (journal / OUTPUT_MARKER).write_text('{"tool": "moeharden", "kind": "journal"}\n')
    (journal / "curves.jsonl").write_text("x")
    with pytest.raises(InputError, match="journal output"):
        check_output_dir(journal, kind="scan")


def test_an_output_is_never_an_input_or_a_directory_holding_one(tmp_path):
    """``verify --baseline scan/scan.json --out scan`` would delete the baseline it reads, and
    ``prune out --out out`` the checkpoint it prunes; both are refused before any work (an output
    inside an input directory is refused too: tests/test_hostile_outputs.py)."""
    scan = tmp_path / "scan"
    with atomic_output_dir(scan, kind="verify") as tmp:              # even an output of the same kind
        (tmp / "scan.json").write_text("{}")
    for inputs in ([scan / "scan.json"], [scan], [str(scan)], ["some-org/some-model", scan / "scan.json"]):
        with pytest.raises(InputError, match="is or holds the input"):
            check_output_dir(scan, kind="verify", inputs=inputs)
    link = tmp_path / "link"
    link.symlink_to(scan, target_is_directory=True)
    with pytest.raises(InputError, match="is or holds the input"):      # through a link to it
        check_output_dir(link, kind="verify", inputs=[scan / "scan.json"])
    check_output_dir(scan, kind="verify", inputs=[tmp_path / "elsewhere.json", "some-org/some-model"])
    with atomic_output_dir(scan / "inner", kind="verify", inputs=[scan / "scan.json"]) as tmp:
        (tmp / "v.json").write_text("{}")
    assert (scan / "scan.json").is_file()


def test_a_linked_marker_does_not_make_a_directory_moeharden_s(tmp_path):
    """A ``.moeharden-output`` that is a link (to any file) is not a marker moeharden wrote: the
    directory is a user's, and is not replaced."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "data.txt").write_text("mine")
    (tmp_path / "any.json").write_text('{"tool": "moeharden"}')
    (user / OUTPUT_MARKER).symlink_to(tmp_path / "any.json")
    with pytest.raises(InputError, match="not written by moeharden"):
        check_output_dir(user, kind="scan")
    assert (user / "data.txt").read_text() == "mine"


def test_atomic_dir_failure_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("first")
    assert (out / OUTPUT_MARKER).is_file()
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "a.txt").write_text("second")
        raise RuntimeError
    assert (out / "a.txt").read_text() == "first" and _leftovers(out) == []
    with atomic_output_dir(out) as tmp:                    # an earlier output is replaced by default
        (tmp / "b.txt").write_text("third")
    assert not (out / "a.txt").exists() and (out / "b.txt").read_text() == "third" and _leftovers(out) == []
    with pytest.raises(InputError, match="already holds"), atomic_output_dir(out, overwrite=False):
        pass
    assert (out / "b.txt").exists()


def test_atomic_dir_never_replaces_foreign_data(tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(InputError, match="not written by moeharden"), atomic_output_dir(out):
        pass
    assert (out / "thesis.tex").read_text() == "years of work" and _leftovers(out) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:
        (tmp / "x").write_text("1")
    assert (empty / "x").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="not a directory"), atomic_output_dir(tmp_path / "file"):
        pass


def test_replace_dir_swaps_whole_directories(tmp_path):
    dest = tmp_path / "dest"
    first = temp_sibling(dest)
    assert first.parent == tmp_path and first.name.startswith(".dest.tmp-") and not any(first.iterdir())
    (first / "a").write_text("1")
    replace_dir(first, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["a"] and not first.exists()
    second = temp_sibling(dest)
    (second / "b").write_text("2")
    replace_dir(second, dest)
    assert sorted(p.name for p in dest.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["dest"]          # no .old-* or .tmp-* left


# --------------------------------------------------------------------------- copy_side_files
def _source(root):
    """A checkpoint directory holding one of everything copy_side_files must decide about."""
    src = root / "src"
    (src / "tasks").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "model-00001-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "model.gguf", "moeharden-manifest.json",
                 "model.sig", "moeharden-prune.json", OUTPUT_MARKER, ".hidden", "modeling_x.py",
                 "tokenizer.json", "README.md", "generation_config.json", "moeharden-tasks.yaml"):
        (src / name).write_text(f"content of {name}")
    (src / "tasks" / "a.jsonl").write_text('{"text": "x"}\n')
    (src / "tasks" / "weights.pt").write_text("nested pickle")
    (src / ".git").mkdir()
    (src / ".git" / "HEAD").write_text("ref")
    return src


def test_copy_side_files_carries_data_and_nothing_stale(tmp_path):
    src, dst = _source(tmp_path), tmp_path / "dst"
    dst.mkdir()
    (dst / "tokenizer.json").write_text("the writer's own")          # already written: the writer wins
    copied = copy_side_files(src, dst)
    assert copied == ["README.md", "generation_config.json", "moeharden-tasks.yaml", "tasks/a.jsonl"]
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*") if p.is_file()) == [
        "README.md", "generation_config.json", "moeharden-tasks.yaml", "tasks/a.jsonl", "tokenizer.json"]
    assert (dst / "tokenizer.json").read_text() == "the writer's own"
    assert (dst / "tasks" / "a.jsonl").read_text() == '{"text": "x"}\n'


def test_copy_side_files_code_only_when_trusted_and_extra_skips(tmp_path):
    src = _source(tmp_path)
    (tmp_path / "a").mkdir()
    assert "modeling_x.py" in copy_side_files(src, tmp_path / "a", trust_remote_code=True)
    (tmp_path / "b").mkdir()
    got = copy_side_files(src, tmp_path / "b", skip=SIDE_FILE_SKIP | {"README.md"})
    assert "README.md" not in got and "modeling_x.py" not in got and "tasks/a.jsonl" in got


def test_copy_side_files_never_follows_links_out_or_opens_special_files(tmp_path):
    src = tmp_path / "src"
    (src / "tasks").mkdir(parents=True)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (src / "tokenizer.json").symlink_to(secret)                        # leaves the checkpoint
    (src / "tasks" / "b.jsonl").symlink_to("../../id_rsa")             # relative, also leaves it
    (src / "real.txt").write_text("inside")
    (src / "alias.txt").symlink_to(src / "real.txt")                   # stays inside: content copied
    (src / "dangling.txt").symlink_to(tmp_path / "nothing")
    (src / "linked-dir").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(src / "pipe.txt")                                        # a plain open() would block
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_side_files(src, dst) == ["alias.txt", "real.txt"]
    assert (dst / "alias.txt").read_text() == "inside" and not (dst / "alias.txt").is_symlink()
    assert "PRIVATE KEY" not in "".join(p.read_text() for p in dst.rglob("*") if p.is_file())


def test_copy_side_files_accepts_hub_cache_snapshot_links(tmp_path):
    """A Hub cache snapshot's files are symlinks into the repo's blobs/ folder: those are the checkpoint."""
    repo = tmp_path / "models--o--n"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc123").write_text("tokenizer data")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").symlink_to("../../blobs/abc123")
    (tmp_path / "outside").write_text("secret")
    (snap / "vocab.txt").symlink_to("../../../outside")
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_side_files(snap, dst) == ["tokenizer.json"]
    assert (dst / "tokenizer.json").read_text() == "tokenizer data"


def test_skip_list_names_agree_with_the_layers_that_define_them():
    from moeharden.attack.prune import PRUNE_RECORD
    from moeharden.defend.lock import MANIFEST_NAME
    from moeharden.defend.signing import SIGNATURE_NAME
    from moeharden.io.shards import INDEX_NAME

    assert {PRUNE_RECORD, MANIFEST_NAME, SIGNATURE_NAME, INDEX_NAME, OUTPUT_MARKER, "config.json"} <= SIDE_FILE_SKIP


def test_atomic_output_dir_rejects_a_foreign_dir_before_any_work(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "f").write_text("")
    ran = []
    with pytest.raises(InputError), atomic_output_dir(out):
        ran.append(1)
    assert ran == []
