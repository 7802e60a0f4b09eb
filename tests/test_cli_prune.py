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


def test_foreign_output_directory_is_left_alone(tiny_mixtral_ckpt, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0, 1], "1": [0, 1]})), "--out", str(out)])
    assert res.exit_code == 3 and "Traceback" not in res.output and "not written by moeharden" in res.output
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_bad_max_shard_size_is_an_input_error(tiny_mixtral_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0, 1], "1": [0, 1]})), "--out", str(out),
                              "--max-shard-size", "lots"])
    _assert_clean_failure(res, 3, out, "lots")


@pytest.fixture(scope="module")
def ckpt_with_task(tmp_path_factory):
    """tests/tiny_lm.py's Mixtral (4 experts, top-2) with its tokenizer and a perplexity task file."""
    from tiny_lm import _CORPUS, build_model, build_tokenizer

    tok = build_tokenizer()
    model = build_model(tok, seed=3)
    ck = tmp_path_factory.mktemp("withtask") / "ck"
    model.save_pretrained(ck)
    tok.save_pretrained(ck)
    (ck / "data").mkdir()
    rows = [{"text": line.strip()} for line in _CORPUS * 3]
    (ck / "data" / "lm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ck / "moeharden-tasks.yaml").write_text(
        "version: 1\ntasks:\n  - name: lm\n    kind: perplexity\n    data: {path: data/lm.jsonl}\n"
        "    split: {attribution: 10, evaluation: 4, seed: 0}\n")
    return ck, model


def test_prune_by_method_keeps_the_most_routed_experts(ckpt_with_task, tmp_path):
    """--method frequency keeps, per layer, the experts chosen most often on the task's attribution
    split; recomputed here from the router weights with plain hooks, one text at a time."""
    from moeharden.tasks.resolve import load_tasks

    ck, model = ckpt_with_task
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(ck), "--method", "frequency", "--task", "lm", "--keep", "2",
                              "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads((out / "moeharden-prune.json").read_text())["keep"]

    texts = load_tasks(None, checkpoint_dir=ck)[0].calibration_texts()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ck)
    counts = {i: torch.zeros(4, dtype=torch.long) for i in range(2)}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, i=i):
            h = args[0].reshape(-1, args[0].shape[-1])               # [T, H]
            top = (h @ mod.weight.T).topk(2, dim=-1).indices         # [T, 2] (softmax keeps the order)
            counts[i] += top.reshape(-1).bincount(minlength=4)
        hooks.append(layer.mlp.gate.register_forward_pre_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(input_ids=tok(text, return_tensors="pt")["input_ids"])
    for h in hooks:
        h.remove()
    expected = {str(i): sorted(sorted(range(4), key=lambda e, c=c: (-int(c[e]), e))[:2]) for i, c in counts.items()}
    assert got == expected, (got, counts)
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 2
    assert (out / "moeharden-tasks.yaml").is_file() and (out / "data" / "lm.jsonl").is_file()


def test_prune_by_method_usage_errors(ckpt_with_task, tmp_path):
    ck, _ = ckpt_with_task
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(ck), "--method", "frequency", "--out", str(out)])
    _assert_clean_failure(res, 2, out, "go together")
    res = runner.invoke(app, ["prune", str(ck), "--method", "astrology", "--task", "lm", "--keep", "2",
                              "--out", str(out)])
    _assert_clean_failure(res, 2, out, "unknown method")
    res = runner.invoke(app, ["prune", str(ck), "--method", "frequency", "--task", "lm", "--keep", "5",
                              "--out", str(out)])
    _assert_clean_failure(res, 3, out, "--keep 5")


@pytest.mark.parametrize("extra,code,words", [
    (["--recover-mode", "bogus"], 2, ["unknown recovery mode", "bogus"]),
    (["--recover-strategy", "psychic"], 2, ["unknown selection strategy", "psychic"]),
    (["--recover-budget", "-5"], 2, ["budget"]),
    (["--recover-budget", "0"], 2, ["budget"]),
    (["--max-shard-size", "0"], 2, ["max-shard-size"]),
])
def test_bad_recover_options_fail_before_anything_is_written(tiny_mixtral_ckpt, tmp_path, extra, code, words):
    """Every option is checked when the settings are built: a bad recovery option used to exit 2
    only after the pruned checkpoint had been written."""
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0, 1], "1": [0, 1]})), "--out", str(out),
                              "--recover", "--task", "anything", *extra])
    _assert_clean_failure(res, code, out, *words)


def test_bad_recover_options_are_refused_even_without_recover(tiny_mixtral_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0, 1], "1": [0, 1]})), "--out", str(out),
                              "--recover-mode", "bogus"])
    _assert_clean_failure(res, 2, out, "bogus")


def test_recover_with_an_unknown_task_leaves_no_output(tiny_mixtral_ckpt, tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prune", str(tiny_mixtral_ckpt), "--experts-from",
                              str(_keep_file(tmp_path, {"0": [0, 1], "1": [0, 1]})), "--out", str(out),
                              "--recover", "--task", "no-such-task"])
    _assert_clean_failure(res, 3, out, "no-such-task")


def test_prune_settings_check_every_option_when_built(tmp_path):
    from moeharden.attack.steal import PruneSettings
    from moeharden.errors import InputError, UsageError

    keep = tmp_path / "keep.json"
    ok = PruneSettings(out=tmp_path / "o", experts_from=keep)
    assert ok.out == tmp_path / "o" and ok.recover_budget == 64 and ok.max_shard_size == "2GB"
    with pytest.raises(UsageError, match="not both"):
        PruneSettings(out=tmp_path, experts_from=keep, method="reap", task="t", keep=2)
    with pytest.raises(UsageError, match="go together"):
        PruneSettings(out=tmp_path, method="reap", keep=2)
    with pytest.raises(UsageError, match="Unknown method"):
        PruneSettings(out=tmp_path, method="astrology", task="t", keep=2)
    with pytest.raises(UsageError, match="--keep"):
        PruneSettings(out=tmp_path, method="reap", task="t", keep=0)
    with pytest.raises(UsageError, match="--recover needs --task"):
        PruneSettings(out=tmp_path, experts_from=keep, recover=True)
    with pytest.raises(InputError, match="lots"):
        PruneSettings(out=tmp_path, experts_from=keep, max_shard_size="lots")
