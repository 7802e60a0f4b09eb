"""Hostile weights and names (stop 39 audit): a checkpoint that is damaged in a way that stays a valid
safetensors file is refused before it is pruned or signed, with exit 3 and one paragraph.

Each case edits a copy of the tiny Mixtral (two MoE layers, eight experts stored one tensor each,
``model.layers.L.block_sparse_moe.experts.E.w1.weight``) and runs the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import EXIT_INPUT
from moeharden.model.keepset import parse_keep

runner = CliRunner()
KEEP = {"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}}
ROUTER = "model.layers.0.block_sparse_moe.gate.weight"
EXPERT = "model.layers.0.block_sparse_moe.experts.3.w1.weight"


def _run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in res.output and "Internal error" not in res.output, res.output
    return res


def _copy(ckpt, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(ckpt, dst)
    return dst


def _shard_of(ck, tensor):
    index = ck / "model.safetensors.index.json"
    if index.exists():
        return ck / json.loads(index.read_text())["weight_map"][tensor]
    return ck / "model.safetensors"


def _edit(ck, tensor, edit_header=None, edit_bytes=None):
    """Rewrite ``tensor``'s header entry and/or its data bytes in place (the file stays valid safetensors)."""
    shard = _shard_of(ck, tensor)
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    if edit_bytes is not None:
        a, b = header[tensor]["data_offsets"]
        raw[8 + n + a:8 + n + b] = edit_bytes(bytes(raw[8 + n + a:8 + n + b]))
    if edit_header is not None:
        header[tensor] = edit_header(dict(header[tensor]))
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    shard.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(raw[8 + n:]))


@pytest.fixture
def work(tiny_mixtral_ckpt, tmp_path):
    (tmp_path / "keep.json").write_text(json.dumps(KEEP))
    assert _run("keygen", "--out", tmp_path / "keys").exit_code == 0
    policy = tmp_path / "policy.yaml"
    shutil.copy(os.path.join(os.path.dirname(__file__), "..", "src", "moeharden", "data", "policy-example.yaml"), policy)
    return _copy(tiny_mixtral_ckpt, tmp_path), tmp_path


def _prune_and_lock_refuse(ck, root, *words):
    for args in (["prune", ck, "--experts-from", root / "keep.json", "--out", root / "p", "--skip-self-check"],
                 ["lock", ck, "--policy", root / "policy.yaml", "--key", root / "keys" / "moeharden.key",
                  "--out", root / "l", "--skip-self-check"]):
        res = _run(*args)
        assert res.exit_code == EXIT_INPUT, (args[0], res.output)
        text = " ".join(res.output.split())
        assert all(w in text for w in words), (args[0], text)
        assert not (root / "p").exists() and not (root / "l").exists()


def test_a_router_whose_header_shape_was_rewritten_is_refused(work):
    """[8, 32] stored as [4, 64]: the same bytes, a valid file — and a model that no longer loads.
    Before, lock signed it and verify called the release intact."""
    ck, root = work
    _edit(ck, ROUTER, edit_header=lambda e: {**e, "shape": [e["shape"][0] // 2, e["shape"][1] * 2]})
    _prune_and_lock_refuse(ck, root, "[0]", "no router tensor")


@pytest.mark.parametrize("dtype", ["BF16", "I32"])
def test_one_expert_stored_unlike_its_siblings_is_refused(work, dtype):
    ck, root = work

    def header(e):
        if dtype == "BF16":        # half the bytes: keep the size consistent by halving the first dimension
            return {**e, "dtype": "BF16", "shape": [e["shape"][0] * 2, e["shape"][1]]}
        return {**e, "dtype": "I32"}
    _edit(ck, EXPERT, edit_header=header)
    _prune_and_lock_refuse(ck, root, EXPERT, "disagree")


def test_non_finite_expert_weights_are_not_signed(work):
    """One NaN in one expert: lock exited 0 and its own untouched release then failed verify (the
    manifest's fingerprint held null). Now lock refuses, naming the expert."""
    ck, root = work
    _edit(ck, EXPERT, edit_bytes=lambda b: struct.pack("<f", float("nan")) + b[4:])
    res = _run("lock", ck, "--policy", root / "policy.yaml", "--key", root / "keys" / "moeharden.key",
               "--out", root / "l", "--skip-self-check")
    assert res.exit_code == EXIT_INPUT, res.output
    assert "non-finite" in res.output and "Expert 3 of layer 0" in " ".join(res.output.split())
    assert not (root / "l").exists()


def test_an_absurd_expert_count_is_refused_without_exhausting_memory(work):
    """num_local_experts = 10**12 built a set of 10**12 ids (OOM after 95 s)."""
    ck, root = work
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_local_experts"] = 10 ** 12
    (ck / "config.json").write_text(json.dumps(cfg))
    res = _run("prune", ck, "--experts-from", root / "keep.json", "--out", root / "p", "--skip-self-check")
    assert res.exit_code == EXIT_INPUT and "1000000000000 experts" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("name", ["model.sig", "moeharden-manifest.json", "README.md", ".moeharden-output"])
def test_a_shard_named_like_a_file_moeharden_writes_is_refused(work, name):
    """An index naming its shard model.sig had lock overwrite the weights with the signature."""
    ck, root = work
    index = ck / "model.safetensors.index.json"
    assert index.exists()                                   # the tiny checkpoint is sharded
    doc = json.loads(index.read_text())
    first = sorted(set(doc["weight_map"].values()))[0]
    (ck / first).rename(ck / name)
    doc["weight_map"] = {k: (name if v == first else v) for k, v in doc["weight_map"].items()}
    index.write_text(json.dumps(doc))
    _prune_and_lock_refuse(ck, root, "not .safetensors files")


def test_a_shape_too_large_to_exist_is_an_input_error(work):
    ck, root = work
    _edit(ck, EXPERT, edit_header=lambda e: {**e, "shape": [int("9" * 4000), int("9" * 4000)]})
    _prune_and_lock_refuse(ck, root)


def test_names_that_are_not_utf8_are_refused(work):
    """A side file, a shard or the directory itself with undecodable bytes in its name ended in exit 70
    (a digest, a signature or a record could not name it)."""
    ck, root = work
    bad = os.fsdecode(b"notes-\xff.txt")
    (ck / bad).write_text("x")
    _prune_and_lock_refuse(ck, root, "not a UTF-8 name", "notes-\\xff.txt")
    (ck / bad).unlink()
    moved = root / os.fsdecode(b"c\xffk")
    ck.rename(moved)
    res = _run("prune", moved, "--experts-from", root / "keep.json", "--out", root / "p", "--skip-self-check")
    assert res.exit_code == EXIT_INPUT and "not a UTF-8 name" in res.output, res.output


@pytest.mark.parametrize("other", ["00", " 0", "+0", "0_0"])
def test_a_layer_given_twice_under_another_spelling_is_refused(other):
    """{"0": [...], "00": [...]} kept the later list for layer 0 silently."""
    from moeharden.errors import KeepSetError

    raw = {"keep": {"0": [0, 1, 2, 3], other: [4, 5, 6, 7], "1": [0, 1, 2, 3]}}
    with pytest.raises(KeepSetError, match="not a layer number"):
        parse_keep(raw, moe_layers=[0, 1], num_experts=8)
    assert parse_keep({"keep": {"0": [1, 0], "1": [2, 3]}}, moe_layers=[0, 1], num_experts=8) == {0: [0, 1], 1: [2, 3]}
    assert parse_keep({0: [1, 0], 1: [2, 3]}, moe_layers=[0, 1], num_experts=8) == {0: [0, 1], 1: [2, 3]}


def test_keygen_never_writes_through_a_link_nor_leaves_half_a_pair(tmp_path):
    """A dangling link where moeharden.pub goes had keygen create the file it pointed to (outside
    --out); one that could not be written left moeharden.key alone behind, and every rerun refused."""
    outside = tmp_path / "planted.pub"
    k = tmp_path / "k"
    k.mkdir()
    (k / "moeharden.pub").symlink_to(outside)
    res = _run("keygen", "--out", k)
    assert res.exit_code == EXIT_INPUT and not outside.exists(), res.output
    assert sorted(p.name for p in k.iterdir()) == ["moeharden.pub"]
    from moeharden.defend import signing

    k2 = tmp_path / "k2"
    real_open = os.open

    def failing_open(path, flags, mode=0o777):
        if str(path).endswith("moeharden.pub"):
            raise OSError(28, "No space left on device")
        return real_open(path, flags, mode)
    import unittest.mock

    with unittest.mock.patch.object(signing.os, "open", failing_open), pytest.raises(OSError):
        signing.keygen(k2)
    assert list(k2.iterdir()) == []                       # the private key written first was removed


def test_an_out_holding_the_keep_file_it_reads_is_refused(work):
    """Replaying an earlier prune's record into the same output (``--experts-from o/moeharden-prune.json
    --out o``) would replace the file being read: the keep file is an input like the checkpoint."""
    ck, root = work
    assert _run("prune", ck, "--experts-from", root / "keep.json", "--out", root / "o", "--skip-self-check").exit_code == 0
    record = root / "o" / "moeharden-prune.json"
    before = record.read_bytes()
    res = _run("prune", ck, "--experts-from", record, "--out", root / "o", "--skip-self-check")
    assert res.exit_code == EXIT_INPUT and "input" in res.output, res.output
    assert record.read_bytes() == before
