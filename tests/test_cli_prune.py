"""`moeharden prune` through the CLI: success, and every kind of bad input (message, exit code,
no traceback, no output directory left behind)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from moeharden.cli import app

runner = CliRunner()


def _keep_file(tmp_path, keep, name="keep.json"):
    p = tmp_path / name
    p.write_text(json.dumps({"keep": keep}))
    return p


def _assert_clean_failure(res, code, out, *words):
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    for w in words:
        assert w.lower() in res.output.lower(), res.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_prune_cli_success_json(tiny_mixtral_ckpt, tmp_path):
    keep = _keep_file(tmp_path, {"0": [1, 3], "1": [0, 2]})
    out = tmp_path / "pruned"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from", str(keep), "--out", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["num_experts_after"] == 2 and doc["top_k_after"] == 2
    assert (out / "config.json").exists()


@pytest.mark.parametrize("keep,words", [
    ({"0": list(range(9)), "1": list(range(9))}, ["outside"]),          # more experts than exist
    ({"0": [], "1": []}, ["keeps no expert"]),                            # none
    ({"0": [0, 1], "1": [0, 1, 2]}, ["different numbers"]),              # unequal counts per layer
    ({"0": [0, 1], "1": [0, 1], "7": [0, 1]}, ["not an moe layer"]),     # unknown layer
    ({"0": [0, 1]}, ["missing"]),                                         # a layer left out
])
def test_bad_keep_files(tiny_mixtral_ckpt, tmp_path, keep, words):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from", str(_keep_file(tmp_path, keep)),
                              "--out", str(out)])
    _assert_clean_failure(res, 3, out, *words)


def test_malformed_keep_json(tiny_mixtral_ckpt, tmp_path):
    bad = tmp_path / "keep.json"
    bad.write_text("{not json")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from", str(bad), "--out", str(out)])
    _assert_clean_failure(res, 3, out, "not valid json")


def test_directory_without_config(tmp_path):
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tmp_path / "ckpt"), "--experts-from", str(_keep_file(tmp_path, {})),
                              "--out", str(out)])
    _assert_clean_failure(res, 3, out, "config.json")


def test_truncated_safetensors(tiny_mixtral_ckpt, tmp_path):
    ck = tmp_path / "ckpt"
    shutil.copytree(tiny_mixtral_ckpt, ck)
    shard = sorted(ck.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(ck), "--experts-from", str(_keep_file(tmp_path, {"0": [0], "1": [0]})),
                              "--out", str(out)])
    _assert_clean_failure(res, 3, out, "truncated", shard.name)


def test_dense_model_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "dense")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tmp_path / "dense"), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0]})), "--out", str(out)])
    _assert_clean_failure(res, 3, out, "not a supported mixture-of-experts", "mixtral", "deepseek-v3")


def test_pickle_only_checkpoint_is_refused(tiny_mixtral_ckpt, tmp_path):
    ck = tmp_path / "pickle"
    ck.mkdir()
    shutil.copy(tiny_mixtral_ckpt / "config.json", ck / "config.json")
    torch.save({"w": torch.zeros(2)}, ck / "pytorch_model.bin")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(ck), "--experts-from", str(_keep_file(tmp_path, {"0": [0]})),
                              "--out", str(out)])
    _assert_clean_failure(res, 3, out, "pickle")


def test_usage_errors_exit_2(tiny_mixtral_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--out", str(out)])
    _assert_clean_failure(res, 2, out, "experts-from")
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--out", str(out), "--experts-from",
                              str(_keep_file(tmp_path, {})), "--method", "reap"])
    _assert_clean_failure(res, 2, out, "not both")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", "someone/not-here", "--experts-from", str(_keep_file(tmp_path, {})),
                              "--out", str(out)])
    assert res.exit_code == 3 and "Traceback" not in res.output
    assert "hub" in res.output.lower()
