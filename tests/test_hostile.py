"""Hostile and careless input (issue 14): one test per defect class, through the CLI where it can be.

Every case asserts the README's promises: the documented exit code, one paragraph and no traceback,
nothing written or deleted that moeharden did not own, nothing read from outside the checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import threading

import pytest
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import CheckpointError, InputError, TaskError
from moeharden.io.outputs import OUTPUT_MARKER

runner = CliRunner()
KEEP = {"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}}


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output, res.output
    assert "Internal error" not in res.output, res.output
    return res


def _copy(ckpt, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(ckpt, dst)
    return dst


def _keep(tmp_path):
    p = tmp_path / "keep.json"
    p.write_text(json.dumps(KEEP))
    return p


def _rewrite_header(shard, edit):
    """Apply ``edit(header) -> header`` to a safetensors file, keeping the data bytes."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + n]))
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    shard.write_bytes(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def _first_shard_with_two_equal_tensors(ck):
    for shard in sorted(ck.glob("*.safetensors")):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        h = {k: v for k, v in json.loads(raw[8:8 + n]).items() if k != "__metadata__"}
        names = sorted(h, key=lambda k: h[k]["data_offsets"][0])
        for a, b in zip(names, names[1:], strict=False):
            if h[a]["dtype"] == h[b]["dtype"] and h[a]["shape"] == h[b]["shape"]:
                return shard, a, b
    raise AssertionError("no shard with two tensors of one shape")


# ---------------------------------------------------------------- 1. data loss

def test_entangle_checkpoint_dir_of_someone_else_is_refused_and_kept(tmp_path):
    from moeharden.defend.entangle.loop import entangle_model
    from moeharden.defend.entangle.resume import claim_checkpoint_dir, remove_checkpoint_dir

    user = tmp_path / "U"
    user.mkdir()
    (user / "f").write_text("mine")
    # refused before any work (no model is even needed to get there)
    with pytest.raises(InputError, match="not written by moeharden"):
        entangle_model(None, None, [], None, ckpt_dir=user)
    assert not remove_checkpoint_dir(user)                  # an unmarked directory is never removed
    assert (user / "f").read_text() == "mine" and sorted(p.name for p in user.iterdir()) == ["f"]
    ours = tmp_path / "fresh"
    claim_checkpoint_dir(ours)
    assert (ours / OUTPUT_MARKER).is_file()
    claim_checkpoint_dir(ours)                              # re-claiming our own directory is fine
    assert remove_checkpoint_dir(ours) and not ours.exists()


def test_demo_never_replaces_a_users_model_dir_nor_deletes_keys(tmp_path):
    from moeharden.demo.pipeline import run_demo, signing_keys_state

    out = tmp_path / "D"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_text("the user's model")
    with pytest.raises(InputError, match="not written by moeharden"):
        run_demo(out)                                       # refused before training anything
    assert (out / "model" / "weights.bin").read_text() == "the user's model"
    keys = tmp_path / "keys"
    assert signing_keys_state(keys) == "none"
    keys.mkdir()
    (keys / "moeharden.key").write_text("private")
    with pytest.raises(InputError, match="half of a key pair"):
        signing_keys_state(keys)
    (keys / "moeharden.pub").write_text("public")
    assert signing_keys_state(keys) == "pair"               # reused, not regenerated
    assert (keys / "moeharden.key").read_text() == "private"


def test_report_never_overwrites_files_moeharden_did_not_write(tmp_path):
    user = tmp_path / "U"
    user.mkdir()
    (user / "report.md").write_text("mine")
    scan = tmp_path / "scan.json"
    scan.write_text("{}")
    res = _run("report", scan, "--out", user)
    assert res.exit_code == 3 and "not written by moeharden" in res.output
    assert (user / "report.md").read_text() == "mine" and not (user / OUTPUT_MARKER).exists()


# ---------------------------------------------------------------- 2. reading outside the checkpoint

def test_a_shard_linked_outside_the_checkpoint_is_refused(tiny_mixtral_ckpt, tmp_path):
    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    shard = sorted(ck.glob("*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    res = _run("prune", ck, "--experts-from", _keep(tmp_path), "--out", tmp_path / "P")
    assert res.exit_code == 3 and "outside the checkpoint" in res.output
    assert not (tmp_path / "P").exists()


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_shard_that_is_not_a_regular_file_fails_fast(tiny_mixtral_ckpt, tmp_path, kind):
    from moeharden.io.shards import CheckpointFiles

    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    shard = sorted(ck.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard) if kind == "fifo" else shard.mkdir()
    caught = []
    t = threading.Thread(target=lambda: caught.append(pytest.raises(CheckpointError, CheckpointFiles, ck)))
    t.daemon = True
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO shard blocked"
    assert caught and ("regular file" in str(caught[0].value) or "directory" in str(caught[0].value))


def test_a_checkpoint_task_file_may_not_read_through_a_link_out(tmp_path):
    from moeharden.tasks.readers import load_rows
    from moeharden.tasks.spec import TaskSpec

    ck = tmp_path / "ck"
    ck.mkdir()
    secret = tmp_path / "secret.jsonl"
    secret.write_text('{"text": "secret"}\n')
    (ck / "data.jsonl").symlink_to(secret)
    spec = TaskSpec.model_validate({"name": "t", "kind": "perplexity", "data": {"path": "data.jsonl"},
                                    "text_field": "text"})
    with pytest.raises(TaskError, match="outside the checkpoint"):
        load_rows(spec, ck, confine=True)


# ---------------------------------------------------------------- 3. malformed weights

@pytest.mark.parametrize("defect", ["overlap", "gap", "trailing", "dtype", "twice"])
def test_malformed_headers_are_refused_before_any_work(tiny_mixtral_ckpt, tmp_path, defect):
    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    shard, a, b = _first_shard_with_two_equal_tensors(ck)

    def edit(h):
        if defect == "overlap":
            h[b]["data_offsets"] = list(h[a]["data_offsets"])
        elif defect == "gap":
            for k, v in h.items():
                if k != "__metadata__" and v["data_offsets"][0] >= h[b]["data_offsets"][0]:
                    v["data_offsets"] = [v["data_offsets"][0] + 8, v["data_offsets"][1] + 8]
        elif defect == "dtype":
            h[a]["dtype"] = "F16" if h[a]["dtype"] != "F16" else "F32"
        return h

    if defect == "trailing":
        with open(shard, "ab") as f:
            f.write(b"\0" * 16)
    elif defect == "twice":
        other = sorted(ck.glob("*.safetensors"))[-1]
        assert other != shard
        raw = other.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        name = next(k for k in json.loads(raw[8:8 + n]) if k != "__metadata__")
        _rewrite_header(shard, lambda h: {**{k: v for k, v in h.items() if k != a}, name: h[a]})
    else:
        _rewrite_header(shard, edit)
    out = tmp_path / "P"
    res = _run("prune", ck, "--experts-from", _keep(tmp_path), "--out", out)
    assert res.exit_code == 3, res.output
    assert not out.exists()


@pytest.mark.parametrize("experts", [16, 4, "8"])
def test_config_expert_count_must_match_the_tensors(tiny_mixtral_ckpt, tmp_path, experts):
    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_local_experts"] = experts
    (ck / "config.json").write_text(json.dumps(cfg))
    keep = tmp_path / "keep.json"
    keep.write_text(json.dumps({"keep": {"0": [0, 1], "1": [0, 1]}}))
    out = tmp_path / "P"
    res = _run("prune", ck, "--experts-from", keep, "--out", out)
    assert res.exit_code == 3, res.output
    assert not out.exists()


# ---------------------------------------------------------------- 4. untyped errors

def _hostile_inputs(ck, tmp_path):
    """(label, argv) pairs that used to end in exit 70."""
    keep = _keep(tmp_path)
    (tmp_path / "file").write_text("x")
    deep = _copy(ck, tmp_path, "deep")
    (deep / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    listcfg = _copy(ck, tmp_path, "listcfg")
    (listcfg / "config.json").write_text("[1, 2]")
    idx = _copy(ck, tmp_path, "idx")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": [1, 2]}))
    idx2 = _copy(ck, tmp_path, "idx2")
    (idx2 / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": {"b": 1}}}))
    return [
        ("keep.json is a directory", ["prune", ck, "--experts-from", tmp_path, "--out", tmp_path / "o1"]),
        ("keep.json is /dev/zero", ["prune", ck, "--experts-from", "/dev/zero", "--out", tmp_path / "o1"]),
        ("--out too long", ["prune", ck, "--experts-from", keep, "--out", tmp_path / ("x" * 300)]),
        ("--out under a file", ["prune", ck, "--experts-from", keep, "--out", tmp_path / "file" / "o"]),
        ("keygen onto a file", ["lock", "keygen", "--out", tmp_path / "file"]),
        ("config nested deep", ["prune", deep, "--experts-from", keep, "--out", tmp_path / "o2"]),
        ("config a list", ["prune", listcfg, "--experts-from", keep, "--out", tmp_path / "o3"]),
        ("index weight_map a list", ["prune", idx, "--experts-from", keep, "--out", tmp_path / "o4"]),
        ("index value an object", ["prune", idx2, "--experts-from", keep, "--out", tmp_path / "o5"]),
        ("policy /dev/zero", ["lock", ck, "--policy", "/dev/zero", "--key", tmp_path / "k", "--out", tmp_path / "o6"]),
        ("policy a directory", ["lock", ck, "--policy", tmp_path, "--key", tmp_path / "k", "--out", tmp_path / "o7"]),
    ]


def test_inputs_that_used_to_be_internal_errors_are_input_errors(tiny_mixtral_ckpt, tmp_path):
    for label, argv in _hostile_inputs(tiny_mixtral_ckpt, tmp_path):
        res = _run(*argv)
        assert res.exit_code in (2, 3), f"{label}: exit {res.exit_code}: {res.output}"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("o", ".o")) and p.name != "file")
    assert leftovers == [], leftovers


@pytest.mark.parametrize("loader", ["policy", "gate", "recipe", "keep"])
@pytest.mark.parametrize("path", ["/dev/zero", "dir"])
def test_config_files_that_are_devices_or_directories_fail_fast(tmp_path, loader, path):
    from moeharden.audit.gate import load_gate
    from moeharden.defend.entangle.recipe import load_recipe
    from moeharden.defend.policy import load_policy
    from moeharden.errors import MoehardenError
    from moeharden.model.keepset import read_keep_file

    fn = {"policy": load_policy, "gate": load_gate, "recipe": load_recipe, "keep": read_keep_file}[loader]
    with pytest.raises(MoehardenError) as err:
        fn(tmp_path if path == "dir" else path)
    assert err.value.exit_code == 3


def test_os_errors_name_the_path_and_the_reason():
    import errno

    from moeharden.cli.handler import os_error_message

    msg = os_error_message(OSError(errno.ENOSPC, "No space left on device", "/data/out"))
    assert "/data/out" in msg and "disk is full" in msg


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary\xff\xfe", "a: &a [x, x, x, x, x, x, x, x, x]\n"
                                     + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
                                               for p, c in zip("abcdefgh", "bcdefghi", strict=True)),
                                     "[" * 5000 + "]" * 5000])
def test_binary_alias_bomb_and_deep_task_files_fail_fast(tmp_path, content):
    import time

    from moeharden.tasks.spec import read_task_file

    p = tmp_path / "tasks.yaml"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    t0 = time.perf_counter()
    with pytest.raises(TaskError):
        read_task_file(p)
    assert time.perf_counter() - t0 < 2.0


def test_a_task_file_that_is_a_device_fails_fast():
    from moeharden.tasks.spec import read_task_file

    with pytest.raises(TaskError, match="regular file"):
        read_task_file("/dev/zero")


@pytest.mark.parametrize("name", ["a[/]b", "a[bold]b", "x[red]y[/red]"])
def test_markup_in_user_text_is_printed_as_written(tmp_path, name):
    ck = tmp_path / name
    ck.mkdir(parents=True)
    res = _run("prune", ck, "--experts-from", tmp_path / "k.json", "--out", tmp_path / "o")
    assert res.exit_code == 3
    assert name in res.output.replace("\n", "")


# ---------------------------------------------------------------- 5. integrity gaps

@pytest.fixture
def release(locked_release):
    """The session's locked tiny Mixtral (conftest.locked_release)."""
    return locked_release


def _verify(path, root, *extra):
    return _run("verify", path, "--pubkey", root / "keys" / "moeharden.pub", *extra)


def test_the_intact_release_verifies(release):
    res = _verify(release / "locked", release)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("what", [".gitattributes", ".git/config", "marker", "notes.txt"])
def test_any_added_or_rewritten_file_is_a_tamper(release, tmp_path, what):
    ck = _copy(release / "locked", tmp_path)
    if what == "marker":
        (ck / OUTPUT_MARKER).write_text('{"tool": "someone else"}\n')
    else:
        (ck / what).parent.mkdir(parents=True, exist_ok=True)
        (ck / what).write_text("*.safetensors filter=lfs\n")
    res = _verify(ck, release)
    assert res.exit_code == 4, res.output


@pytest.mark.parametrize("index_too", [False, True])
def test_a_renamed_tensor_is_an_integrity_failure_naming_both_sides(release, tmp_path, index_too):
    ck = _copy(release / "locked", tmp_path)
    old, new = "layers.0.block_sparse_moe.experts.1.w1", "layers.0.block_sparse_moe.experts.9.w1"
    for shard in sorted(ck.glob("*.safetensors")):
        raw = shard.read_bytes()
        if old.encode() in raw[:8 + struct.unpack("<Q", raw[:8])[0]]:
            _rewrite_header(shard, lambda h: {k.replace(old, new): v for k, v in h.items()})
            break
    if index_too:                     # a careful tamperer edits the index as well
        index = ck / "model.safetensors.index.json"
        index.write_text(index.read_text().replace(old, new))
    res = _verify(ck, release)
    assert res.exit_code == 4, res.output
    flat = res.output.replace("\n", "")
    assert old in flat and new in flat, flat


def test_a_hostile_manifest_is_an_integrity_failure(release, tmp_path):
    ck = _copy(release / "locked", tmp_path)
    man = json.loads((ck / "moeharden-manifest.json").read_text())
    man["tensors"] = [1, 2, 3]
    (ck / "moeharden-manifest.json").write_text(json.dumps(man))
    assert _verify(ck, release).exit_code == 4
    (ck / "moeharden-manifest.json").write_text("[" * 100_000)
    assert _verify(ck, release).exit_code == 4


def test_verify_on_a_missing_directory_is_an_input_error(release, tmp_path):
    res = _verify(tmp_path / "nowhere", release)
    assert res.exit_code == 3, res.output


@pytest.mark.parametrize("kind", ["link-out", "fifo"])
def test_files_read_by_name_must_be_regular_files_inside_the_checkpoint(tiny_mixtral_ckpt, tmp_path, kind):
    ck = _copy(tiny_mixtral_ckpt, tmp_path)
    target = ck / "generation_config.json"
    if target.exists():
        target.unlink()
    if kind == "link-out":
        secret = tmp_path / "secret.json"
        secret.write_text('{"token": "TOP SECRET"}')
        target.symlink_to(secret)
    else:
        os.mkfifo(target)
    res = _run("prune", ck, "--experts-from", _keep(tmp_path), "--out", tmp_path / "P")
    assert res.exit_code == 3, res.output
    assert "outside the checkpoint" in res.output or "regular file" in res.output
    assert not (tmp_path / "P").exists()


@pytest.mark.parametrize("tamper", ["byte", "rename"])
def test_verify_baseline_checks_integrity_before_any_attack(release, tmp_path, tamper):
    from test_documents import _scan

    ck = _copy(release / "locked", tmp_path)
    name = "layers.0.block_sparse_moe.experts.1.w1"
    shard = next(s for s in sorted(ck.glob("*.safetensors")) if name.encode() in s.read_bytes()[:4096])
    if tamper == "byte":
        raw = bytearray(shard.read_bytes())
        raw[-3] ^= 0xFF                                     # a data byte of the shard's last tensor
        shard.write_bytes(bytes(raw))
    else:
        _rewrite_header(shard, lambda h: {k.replace(name, name.replace("1.w1", "9.w1")): v for k, v in h.items()})
    baseline = tmp_path / "scan.json"
    baseline.write_text(json.dumps(_scan(1.0, []).to_json()))
    out = tmp_path / "V"
    res = _run("verify", ck, "--baseline", baseline, "--pubkey", release / "keys" / "moeharden.pub", "--out", out)
    assert res.exit_code == 4, res.output
    assert "no attack was run" in res.output.replace("\n", " ") and not out.exists()
    if tamper == "rename":
        assert name in res.output.replace("\n", "")


def test_alias_bomb_in_a_model_card_is_bounded(tmp_path):
    """A README whose YAML front matter is a billion-laughs alias bomb: lock neither expands it nor fails."""
    import time

    from moeharden.defend.lock import _front_matter

    bomb = "---\na: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)) + "---\nbody\n"
    t0 = time.perf_counter()
    meta, body = _front_matter(bomb)
    assert meta == {} and body == "body\n" and time.perf_counter() - t0 < 2


def test_the_demo_summary_prints_user_paths_and_names_as_written():
    """`demo --out 'a[bold]b'`: every path, task name and gate row of the summary is escaped."""
    from pathlib import Path

    from moeharden import console as ui
    from moeharden.cli import render
    from moeharden.demo.pipeline import DemoResult, PipelineResult

    out = Path("a[bold]b/x[/]y")
    res = DemoResult(out=out, model_dir=out / "model", reused_cache=True, recipe_hash="h[red]",
                     training={"accuracy": {"t[i]": 1.0}},
                     pipeline=PipelineResult(out, out / "report.html", False, ["row [bold]x"],
                                                         {"scan": 1.0, "total": 1.0}))
    with ui.console.capture() as cap:
        render.demo(res)
    text = cap.get().replace("\n", "")
    for s in (str(out / "model"), "h[red]", "t[i]", "row [bold]x", str(out / "report.html")):
        assert s in text


def _tree(d):
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_an_output_that_is_the_input_or_another_commands_output_is_refused(release, tmp_path):
    """Before, a moeharden output was replaced by any command: ``prune P --out P`` pruned a checkpoint
    into itself (deleting the source), and ``prune … --out locked`` replaced a signed release. Both
    are refused before any work (exit 3), and the directories are untouched."""
    ck = _copy(release / "src", tmp_path)
    assert _run("prune", ck, "--experts-from", _keep(tmp_path), "--out", tmp_path / "P").exit_code == 0
    before = _tree(tmp_path / "P")
    res = _run("prune", tmp_path / "P", "--experts-from", _keep(tmp_path), "--out", tmp_path / "P")
    assert res.exit_code == 3 and "is or holds the input" in res.output, res.output
    assert _tree(tmp_path / "P") == before
    locked = _copy(release / "locked", tmp_path, "locked")
    signed = _tree(locked)
    res = _run("prune", ck, "--experts-from", _keep(tmp_path), "--out", locked)
    assert res.exit_code == 3 and "holds a moeharden lock output" in res.output, res.output
    res = _run("lock", ck, "--policy", release / "policy.yaml", "--key", release / "keys" / "moeharden.key",
               "--out", release / "keys")
    assert res.exit_code == 3 and "is or holds the input" in res.output, res.output
    assert _tree(locked) == signed and _verify(locked, release).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
