"""The in-place loader (:mod:`moeharden.model.inplace`) against ``from_pretrained``.

For every supported family the tiny model is saved in its release layout (``save_pretrained``
turns fused experts back into one tensor per expert where the family stores them so) and loaded
both ways: every tensor of the state dict is bit-identical, with the same dtype and shape; every
buffer (rotary ``inv_freq`` included) equal; the logits agree to 1e-5 (only the memory alignment of
the weights differs, which moves float32 sums by an ulp). A model loaded in place saves back to
the stored tensors, and anything the loader cannot place exactly falls back instead of guessing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from moeharden.errors import CheckpointError
from moeharden.io.shards import INDEX_NAME, CheckpointFiles
from moeharden.model import inplace
from moeharden.model.checkpoint import load_config, load_model
from moeharden.model.inplace import load_in_place

# families whose stored layout needs arithmetic or vocabulary surgery (Inkling2's unpadding and
# looped-expert conversions; Ergo's router stored transposed, [H, E], so the conversion moves the
# last dimension): the loader must decline them, and from_pretrained loads them
DECLINED = {"inkling2_text", "inkling2_loop_text", "ergo"}


def _same_model(ref, got, vocab: int) -> None:
    rs, gs = ref.state_dict(), got.state_dict()
    assert set(rs) == set(gs)
    for k, v in rs.items():
        assert gs[k].dtype == v.dtype and gs[k].shape == v.shape, k
        assert torch.equal(gs[k], v), k
    rb, gb = dict(ref.named_buffers()), dict(got.named_buffers())
    assert set(rb) == set(gb)
    for k, v in rb.items():
        assert torch.equal(gb[k], v), k
    ids = torch.randint(0, vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ref(input_ids=ids).logits.float(), got(input_ids=ids).logits.float()
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``family -> checkpoint directory`` of each family's tiny model, built on first use."""
    made: dict[str, tuple[Path, object]] = {}

    def get(family: str):
        if family not in made:
            model, cfg = build_tiny(family)
            path = tmp_path_factory.mktemp(family)
            model.save_pretrained(path)
            made[family] = (path, cfg)
        return made[family]
    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_in_place_equals_from_pretrained(family, saved):
    path, cfg = saved(family)
    for dtype in (torch.float32, torch.bfloat16):
        got = load_in_place(path, load_config(path), dtype)
        if family in DECLINED:
            assert got is None
            continue
        assert got is not None, f"{family} fell back to from_pretrained"
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        _same_model(ref, got, cfg.vocab_size)
        assert not got.training


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "dbrx"])
def test_a_model_loaded_in_place_saves_the_stored_tensors_back(family, saved, tmp_path):
    path, _ = saved(family)
    stored = load_file(path / "model.safetensors")
    load_in_place(path, load_config(path), torch.float32).save_pretrained(tmp_path)
    again = load_file(tmp_path / "model.safetensors")
    assert set(again) == set(stored)
    for k, v in stored.items():
        assert torch.equal(again[k], v), k


def test_shards_dtype_change_and_chunked_reads(tmp_path, monkeypatch):
    """bf16 shards of 30 kB (tensors spread over many files) into a float32 model, read through a
    scratch buffer smaller than one expert (several chunks per run)."""
    model, cfg = build_tiny("olmoe")
    model.to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="30KB")
    assert (tmp_path / INDEX_NAME).exists() and len(CheckpointFiles(tmp_path).shards) > 3
    monkeypatch.setattr(inplace, "_CHUNK_BYTES", 100)
    got = load_in_place(tmp_path, load_config(tmp_path), torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    _same_model(ref, got, cfg.vocab_size)


def test_tied_embeddings_stay_tied(tmp_path):
    model, cfg = build_tiny("olmoe", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    got = load_in_place(tmp_path, load_config(tmp_path), torch.float32)
    assert got.lm_head.weight.data_ptr() == got.model.embed_tokens.weight.data_ptr()
    _same_model(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), got, cfg.vocab_size)


def test_a_missing_tensor_falls_back_and_an_unknown_one_is_skipped(tmp_path):
    model, cfg = build_tiny("mixtral")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    extra = dict(tensors, **{"model.layers.0.unknown.weight": torch.ones(3, 4)})
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    got = load_in_place(tmp_path, load_config(tmp_path), torch.float32)
    _same_model(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), got, cfg.vocab_size)

    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert load_in_place(tmp_path, load_config(tmp_path), torch.float32) is None   # from_pretrained would init it


def test_a_shard_truncated_after_indexing_is_a_checkpoint_error(tmp_path, monkeypatch):
    model, _ = build_tiny("olmoe")
    model.save_pretrained(tmp_path)
    files = CheckpointFiles(tmp_path)
    shard = tmp_path / "model.safetensors"
    os.truncate(shard, shard.stat().st_size - 64)          # the headers were read while it was whole
    monkeypatch.setattr(inplace, "CheckpointFiles", lambda _root: files)
    with pytest.raises(CheckpointError, match="ends inside tensor"):
        load_in_place(tmp_path, load_config(tmp_path), torch.float32)


def test_load_model_uses_it_and_can_be_told_not_to(tmp_path):
    model, cfg = build_tiny("qwen3_moe")
    model.save_pretrained(tmp_path)
    fast = load_model(tmp_path)
    slow = load_model(tmp_path, in_place=False)
    assert json.loads(fast.config.to_json_string()) == json.loads(slow.config.to_json_string())
    _same_model(slow, fast, cfg.vocab_size)


def test_a_family_whose_class_rewrites_stored_values_loads_as_transformers_loads_it(tmp_path):
    """ZAYA's class resets its skip expert's selection bias to -1.0 on every load, whatever was stored;
    the in-place loader would keep the stored value, so ZAYA always loads through from_pretrained
    (measured before: in place 0.5, from_pretrained -1.0)."""
    from moeharden.model.checkpoint import load_model
    from moeharden.model.registry import moe_layers

    model, _ = build_tiny("zaya")
    with torch.no_grad():
        for li in moe_layers(model):
            li.selection_bias[-1] = 0.5
    model.save_pretrained(tmp_path)
    got = load_model(tmp_path)
    ref = load_model(tmp_path, in_place=False)
    assert [float(li.selection_bias[-1]) for li in moe_layers(ref)] == [-1.0] * len(moe_layers(ref))
    for (name, a), (_, b) in zip(got.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
