"""Checkpoint checks and loading, streaming safetensors IO, keep-sets (atomic outputs: test_outputs.py).

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
from moeharden.io.outputs import atomic_output_dir
from moeharden.io.shards import (
    INDEX_NAME,
    CheckpointFiles,
    PlannedTensor,
    parse_size,
    read_tensor,
    write_streaming_shards,
)
from moeharden.model.checkpoint import (
    checkpoint_digest,
    config_hash,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
)
from moeharden.model.keepset import parse_keep, read_keep_file, to_json
from moeharden.model.validate import validate_checkpoint


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


# --------------------------------------------------------------------------- io.shards
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
    assert sorted(files.tensors) == sorted(weight_map)
    assert len(files.shards) == len(set(weight_map.values())) > 2
    for name, info in files.tensors.items():
        assert info.file.name == weight_map[name]
    for shard in files.shards:
        ref = load_file(str(shard))                      # safetensors' own reader
        with open(shard, "rb") as handle:
            for name, t in ref.items():
                info = files.tensors[name]
                assert info.shape == tuple(t.shape)
                assert torch.equal(read_tensor(info), t) and torch.equal(read_tensor(info, handle), t)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/x.safetensors", "sub/a.safetensors", 7])
def test_index_naming_a_path_outside_the_checkpoint(tiny_mixtral_ckpt, tmp_path, bad):
    ck = _copy(tiny_mixtral_ckpt, tmp_path / "ck")
    index = json.loads((ck / INDEX_NAME).read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = bad
    (ck / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a valid" if isinstance(bad, int) else "outside the checkpoint"):
        CheckpointFiles(ck)


def test_read_tensor_of_a_file_truncated_after_indexing(tmp_path):
    save_file({"w": torch.arange(6, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    info = CheckpointFiles(tmp_path).tensors["w"]
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="ends inside tensor"):
        read_tensor(info)


def _count_shards(sizes, cap):
    """Independent count of greedy size-capped shards (a tensor over the cap gets its own shard)."""
    n, cur = 0, None
    for s in sizes:
        if cur is None or cur + s > cap:
            n, cur = n + 1, s
        else:
            cur += s
    return n


def _write_tensors(out, tensors, cap, metadata=None):
    """``write_streaming_shards`` fed from in-memory tensors (float32, in dict order)."""
    plan = [PlannedTensor(k, "F32", tuple(v.shape), v.numel() * 4) for k, v in tensors.items()]
    return write_streaming_shards(out, plan, lambda p: tensors[p.name], cap, metadata)


def test_streaming_writer_caps_names_indexes_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate([100, 300, 50, 2000, 10, 10, 400])}
    cap = 1600                                            # bytes; float32 → 400 elements
    shards = _write_tensors(tmp_path, tensors, cap, metadata={"who": "test"})
    n = _count_shards([v.numel() * 4 for v in tensors.values()], cap)
    assert n == 5 and len(shards) == n     # [400+1200] [200] [8000] [40+40] [1600]
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    got = {}
    for p in shards:
        with safe_open(str(p), "pt") as f:                # safetensors' own reader
            assert f.metadata() == {"format": "pt", "who": "test"}
            for k in f.keys():
                assert index["weight_map"][k] == p.name
                got[k] = f.get_tensor(k)
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], tensors[k]) for k in tensors)


def test_streaming_writer_single_shard_has_no_index(tmp_path):
    assert [p.name for p in _write_tensors(tmp_path, {"a": torch.ones(3)}, parse_size("10MB"))] == ["model.safetensors"]
    assert not (tmp_path / INDEX_NAME).exists()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["a"], torch.ones(3))


def test_streaming_writer_refuses_a_tensor_of_the_wrong_size(tmp_path):
    plan = [PlannedTensor("a", "F32", (3,), 12)]
    with pytest.raises(CheckpointError, match="planned 12"):
        write_streaming_shards(tmp_path, plan, lambda p: torch.ones(4), 1 << 20)


def test_rewritten_checkpoint_loads_with_transformers(tiny_mixtral_ckpt, tmp_path):
    """Stream every tensor as file-to-file byte ranges into differently sized shards; the model is unchanged."""
    from families import build_tiny

    files = CheckpointFiles(tiny_mixtral_ckpt)
    infos = sorted(files.tensors.values(), key=lambda i: (i.file.name, i.start))
    plan = [PlannedTensor(i.name, i.dtype, i.shape, i.end - i.start) for i in infos]
    handles = {p: open(p, "rb") for p in files.shards}
    out = tmp_path / "re"

    def produce(p):                                       # one byte range per tensor, copied by the kernel
        info = files.tensors[p.name]
        return [(handles[info.file], info.start, p.nbytes)]

    try:
        with atomic_output_dir(out) as tmp:
            assert len(write_streaming_shards(tmp, plan, produce, parse_size("25KB"))) > 2
            shutil.copy(tiny_mixtral_ckpt / "config.json", tmp)
    finally:
        for h in handles.values():
            h.close()
    ref, _ = build_tiny("mixtral")
    ids = torch.randint(0, 64, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(type(ref).from_pretrained(out)(input_ids=ids).logits, ref(input_ids=ids).logits)


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
    for part in ("twice", "outside 0..7", "'x' is not a layer number", "list of integers", "[3] are missing"):
        assert part in msg, msg
    with pytest.raises(KeepSetError, match="must be"):
        parse_keep([0, 1], moe_layers=[0], num_experts=8)


def test_read_keep_file_errors(tmp_path):
    with pytest.raises(KeepSetError, match="does not exist"):
        read_keep_file(tmp_path / "nope.json", moe_layers=[0], num_experts=4)
    (tmp_path / "k.json").write_text("[1,")
    with pytest.raises(KeepSetError, match="not valid JSON"):
        read_keep_file(tmp_path / "k.json", moe_layers=[0], num_experts=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_read_rows_reads_one_expert_of_a_fused_tensor(tmp_path, dtype):
    """``read_rows`` equals slicing the whole tensor, along a contiguous axis (only those bytes are
    read) and along a non-contiguous one; ``read_tensor`` equals safetensors' own reader."""
    from moeharden.io.shards import CheckpointFiles, contiguous_rows, read_rows, read_tensor

    g = torch.Generator().manual_seed(0)
    fused = torch.randn(6, 10, 4, generator=g).to(dtype)          # [E, 2I, H]
    inner = torch.randn(1, 6, 5, generator=g).to(dtype)           # experts on axis 1 after a 1: contiguous
    strided = torch.randn(3, 6, 2, generator=g).to(dtype)         # experts on axis 1: not contiguous
    d = tmp_path / "ckpt"
    d.mkdir()
    save_file({"a": torch.zeros(3), "fused": fused, "inner": inner, "strided": strided}, str(d / "model.safetensors"))
    files = CheckpointFiles(d)
    info = files.tensors
    assert contiguous_rows(info["fused"], 0) and contiguous_rows(info["inner"], 1)
    assert not contiguous_rows(info["strided"], 1)
    for e in range(6):
        assert torch.equal(read_rows(info["fused"], 0, e, 1), fused[e:e + 1])
        assert torch.equal(read_rows(info["inner"], 1, e, 1), inner[:, e:e + 1])
        assert torch.equal(read_rows(info["strided"], 1, e, 1), strided[:, e:e + 1])
    assert torch.equal(read_rows(info["fused"], 0, 2, 3), fused[2:5])
    ref = load_file(str(d / "model.safetensors"))
    for name in ref:
        assert torch.equal(read_tensor(info[name]), ref[name])
