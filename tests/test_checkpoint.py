"""Checkpoint checks and loading, streaming safetensors IO, atomic output directories, keep-sets.

Corrupt files are built byte by byte (a header whose length passes the end of the file, data
offsets past the end, shapes that disagree with offsets), so each check is seen to fire on the
thing it claims to detect. Round trips are compared with safetensors' own reader and with the
in-memory model's logits.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeharden.errors import CheckpointError, InputError, KeepSetError, NetworkError, UnsupportedModelError
from moeharden.io.shards import (
    INDEX_NAME,
    OUTPUT_MARKER,
    CheckpointFiles,
    ShardWriter,
    atomic_output_dir,
    iter_shard_tensors,
    parse_size,
    read_tensor,
)
from moeharden.model.checkpoint import (
    checkpoint_digest,
    config_hash,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
    validate_checkpoint,
)
from moeharden.model.keepset import parse_keep, read_keep_file, to_json


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# --------------------------------------------------------------------------- validation
def test_directory_without_config_is_refused(tmp_path):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="config.json"):
        validate_checkpoint(tmp_path)


def test_config_that_is_not_json_is_refused(tiny_mixtral_ckpt, tmp_path):
    ck = _copy(tiny_mixtral_ckpt, tmp_path / "ck")
    (ck / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        validate_checkpoint(ck)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "weights.pt", "model.pth"])
def test_pickle_only_weights_are_refused(tiny_mixtral_ckpt, tmp_path, name):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(tiny_mixtral_ckpt / "config.json", ck)
    torch.save({"w": torch.zeros(2)}, ck / name)
    with pytest.raises(CheckpointError, match="pickle") as err:
        validate_checkpoint(ck)
    assert name in err.value.message


def test_no_weights_at_all(tiny_mixtral_ckpt, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    shutil.copy(tiny_mixtral_ckpt / "config.json", ck)
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        validate_checkpoint(ck)


def test_header_length_beyond_the_file(tiny_mixtral_ckpt, tmp_path):
    ck = _copy(tiny_mixtral_ckpt, tmp_path / "ck")
    shard = sorted(ck.glob("*.safetensors"))[0]
    size = shard.stat().st_size
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", size)          # 8 + size > size: the header cannot fit
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated") as err:
        validate_checkpoint(ck)
    assert shard.name in err.value.message


def test_data_offsets_beyond_the_end(tiny_mixtral_ckpt, tmp_path):
    ck = _copy(tiny_mixtral_ckpt, tmp_path / "ck")
    shard = sorted(ck.glob("*.safetensors"))[-1]
    n = struct.unpack("<Q", shard.read_bytes()[:8])[0]
    shard.write_bytes(shard.read_bytes()[: 8 + n + 4])   # header intact, data cut after 4 bytes
    with pytest.raises(CheckpointError, match="beyond the end") as err:
        validate_checkpoint(ck)
    assert shard.name in err.value.message


def test_offsets_that_disagree_with_the_shape(tmp_path):
    # [2, 3] float32 needs 24 bytes; the header says 16
    _raw_safetensors(tmp_path / "model.safetensors",
                     {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, bytes(24))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="disagrees with its shape"):
        validate_checkpoint(tmp_path)


def test_unknown_dtype_is_named(tmp_path):
    _raw_safetensors(tmp_path / "model.safetensors",
                     {"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 2]}}, bytes(2))
    with pytest.raises(CheckpointError, match="Q7"):
        CheckpointFiles(tmp_path)


def test_index_naming_a_missing_shard(tiny_mixtral_ckpt, tmp_path):
    ck = _copy(tiny_mixtral_ckpt, tmp_path / "ck")
    gone = sorted(ck.glob("*.safetensors"))[1]
    gone.unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        validate_checkpoint(ck)
    assert gone.name in err.value.message


def test_nonexistent_local_path_and_offline_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        resolve_checkpoint(str(tmp_path / "no-such-dir"))
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    with pytest.raises(NetworkError, match="offline"):
        resolve_checkpoint("someone-fake/not-a-real-repo-xyz")


# --------------------------------------------------------------------------- digests
def test_digest_is_stable_location_independent_and_layout_sensitive(tiny_mixtral_ckpt, tmp_path):
    d = checkpoint_digest(tiny_mixtral_ckpt)
    assert d == checkpoint_digest(tiny_mixtral_ckpt) and len(d) == 64
    assert checkpoint_digest(_copy(tiny_mixtral_ckpt, tmp_path / "copy")) == d
    from families import build_tiny

    model, _ = build_tiny("mixtral")
    model.save_pretrained(tmp_path / "other", max_shard_size="60KB")   # other sharding → other headers
    assert checkpoint_digest(tmp_path / "other") != d


def test_config_hash_ignores_formatting_not_values(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "c").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"x": 1, "y": [1, 2]}')
    (tmp_path / "b" / "config.json").write_text('{\n  "y": [1,2],\n  "x": 1\n}')
    (tmp_path / "c" / "config.json").write_text('{"x": 2, "y": [1, 2]}')
    assert config_hash(tmp_path / "a") == config_hash(tmp_path / "b") != config_hash(tmp_path / "c")


# --------------------------------------------------------------------------- loading
def test_load_model_matches_the_saved_model(tiny_mixtral_ckpt):
    from families import build_tiny

    ref, _ = build_tiny("mixtral")            # seeded: the same weights that were saved
    model = load_model(tiny_mixtral_ckpt)
    assert next(model.parameters()).dtype == torch.float32 and not model.training
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_load_model_refuses_a_dense_model_before_loading(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="mixtral"):
        load_model(tmp_path)


def test_load_tokenizer_sets_a_pad_token(tmp_path):
    from tiny_lm import build_tokenizer

    tok = build_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<eos>"
    assert loaded("a charming journey")["input_ids"] == tok("a charming journey")["input_ids"]
    with pytest.raises(CheckpointError, match="tokenizer"):
        load_tokenizer(tmp_path / "nothing-here")


# --------------------------------------------------------------------------- st_io
@pytest.mark.parametrize("text,expected", [
    ("2GB", 2 * 10**9), ("10MB", 10 * 10**6), ("20KB", 20_000), ("1GiB", 2**30), ("1.5MB", 1_500_000),
    ("300", 300), (4096, 4096), ("64kib", 65536),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "abc", "2 GBs", "-1MB"])
def test_parse_size_rejects(bad):
    with pytest.raises(InputError):
        parse_size(bad)


def test_checkpoint_files_index_and_positioned_reads(tiny_mixtral_ckpt):
    files = CheckpointFiles(tiny_mixtral_ckpt)
    weight_map = json.loads((tiny_mixtral_ckpt / INDEX_NAME).read_text())["weight_map"]
    assert sorted(files.tensor_names) == sorted(weight_map)
    assert len(files.shards) == len(set(weight_map.values())) > 2
    for name in files.tensor_names:
        assert files.shard_of(name).name == weight_map[name]
    for shard in files.shards:
        ref = load_file(str(shard))                      # safetensors' own reader
        streamed = dict(iter_shard_tensors(shard))
        assert streamed.keys() == ref.keys()
        for name, t in ref.items():
            info = files.tensors[name]
            assert info.shape == tuple(t.shape)
            assert torch.equal(streamed[name], t) and torch.equal(read_tensor(info), t)


def _count_shards(sizes, cap):
    """Independent count of greedy size-capped shards (a tensor over the cap gets its own shard)."""
    n, cur = 0, None
    for s in sizes:
        if cur is None or cur + s > cap:
            n, cur = n + 1, s
        else:
            cur += s
    return n


def test_shard_writer_caps_names_indexes_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([100, 300, 50, 2000, 10, 10, 400])}
    cap = 1600                                            # bytes; float32 → 400 elements
    w = ShardWriter(tmp_path, cap, metadata={"who": "test"})
    for k, v in tensors.items():
        w.add(k, v)
    shards = w.close()
    n = _count_shards([v.numel() * 4 for v in tensors.values()], cap)
    assert n == 5 and len(shards) == n     # [400+1200] [200] [8000] [40+40] [1600]
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    got = {}
    for p in shards:
        with safe_open(str(p), "pt") as f:
            assert f.metadata() == {"format": "pt", "who": "test"}
            for k in f.keys():
                assert index["weight_map"][k] == p.name
                got[k] = f.get_tensor(k)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert not list(tmp_path.glob(".shard-*"))


def test_shard_writer_single_shard_has_no_index(tmp_path):
    w = ShardWriter(tmp_path, parse_size("10MB"))
    w.add("a", torch.ones(3))
    assert [p.name for p in w.close()] == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()


def test_rewritten_checkpoint_loads_with_transformers(tiny_mixtral_ckpt, tmp_path):
    """Stream every shard through the writer into differently sized shards; the model is unchanged."""
    from families import build_tiny

    out = tmp_path / "re"
    with atomic_output_dir(out) as tmp:
        w = ShardWriter(tmp, parse_size("25KB"))
        for shard in CheckpointFiles(tiny_mixtral_ckpt).shards:
            for name, t in iter_shard_tensors(shard):
                w.add(name, t)
        assert len(w.close()) > 2
        shutil.copy(tiny_mixtral_ckpt / "config.json", tmp)
    ref, _ = build_tiny("mixtral")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(type(ref).from_pretrained(out)(input_ids=ids).logits, ref(input_ids=ids).logits)


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


# --------------------------------------------------------------------------- keep-sets
def test_parse_keep_sorts_and_round_trips():
    keep = parse_keep({"keep": {"1": [5, 2], "0": [7, 0]}}, moe_layers=[0, 1], num_experts=8)
    assert keep == {0: [0, 7], 1: [2, 5]}
    assert parse_keep(to_json(keep), moe_layers=[0, 1], num_experts=8) == keep


def test_parse_keep_reports_every_problem_at_once():
    raw = {"keep": {"0": [1, 1], "1": [0, 9], "x": [0], "2": [True, 0]}}
    with pytest.raises(KeepSetError) as err:
        parse_keep(raw, moe_layers=[0, 1, 2, 3], num_experts=8)
    msg = err.value.message
    for part in ("twice", "outside 0..7", "'x' is not an integer", "list of integers", "[3] are missing"):
        assert part in msg, msg
    with pytest.raises(KeepSetError, match="must be"):
        parse_keep([0, 1], moe_layers=[0], num_experts=8)


def test_read_keep_file_errors(tmp_path):
    with pytest.raises(KeepSetError, match="does not exist"):
        read_keep_file(tmp_path / "nope.json", moe_layers=[0], num_experts=4)
    (tmp_path / "k.json").write_text("[1,")
    with pytest.raises(KeepSetError, match="not valid JSON"):
        read_keep_file(tmp_path / "k.json", moe_layers=[0], num_experts=4)
