"""`lock` and the integrity half of `verify`: round trip, tampering, derivation, policy, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from families import LOCK_POLICY as POLICY
from families import build_tiny
from typer.testing import CliRunner

from moeharden.cli import app

runner = CliRunner()


@pytest.fixture
def release(locked_release):
    """The session's locked tiny Mixtral (conftest.locked_release)."""
    return locked_release


def _verify(path, root, *extra):
    return runner.invoke(app, ["verify", str(path), "--pubkey", str(root / "keys" / "moeharden.pub"), *extra])


def test_keygen_writes_a_private_key_readable_only_by_its_owner(release):
    assert (release / "keys" / "moeharden.key").stat().st_mode & 0o777 == 0o600
    assert (release / "keys" / "moeharden.pub").read_text().startswith("-----BEGIN PUBLIC KEY-----")


def test_lock_writes_policy_everywhere_and_round_trips(release):
    from safetensors import safe_open

    locked = release / "locked"
    shards = sorted(locked.glob("*.safetensors"))
    assert len(shards) > 1
    for s in shards:
        with safe_open(str(s), "pt") as f:
            assert json.loads(f.metadata()["moeharden_policy"])["groups"]["experts"] == "frozen"
    assert json.loads((locked / "config.json").read_text())["moeharden"]["policy"]["license"] == "apache-2.0"
    card = (locked / "README.md").read_text()
    assert card.startswith("---\n") and "moeharden-locked" in card and "| experts | frozen |" in card
    manifest = json.loads((locked / "moeharden-manifest.json").read_text())
    assert manifest["tool"]["version"] and len(manifest["tensors"]) > 10
    assert len(manifest["fingerprints"]["experts"]["0"]) == 8
    res = _verify(locked, release, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] is True


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_flipped_weight_byte_names_the_tensor(release, tmp_path, where):
    from moeharden.io.shards import CheckpointFiles

    copy = tmp_path / "copy"
    shutil.copytree(release / "locked", copy)
    infos = sorted(CheckpointFiles(copy).tensors.values(), key=lambda i: (i.file.name, i.start))
    info = {"first": infos[0], "middle": infos[len(infos) // 2], "last": infos[-1]}[where]
    _flip(info.file, info.start + (info.end - info.start) // 2)
    res = _verify(copy, release, "--json")
    assert res.exit_code == 4, res.output
    doc = json.loads(res.stdout)
    assert doc["tensors"]["changed"] == [info.name]
    assert doc["signature"]["ok"] is False


def test_a_flipped_header_byte_fails_and_names_the_tensors(release, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(release / "locked", copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    raw = shard.read_bytes()
    header = raw[8:8 + int.from_bytes(raw[:8], "little")].decode("latin-1")
    _flip(shard, 8 + header.index('"shape"') + 2)       # corrupt a key inside the JSON header
    res = _verify(copy, release)
    assert res.exit_code == 4
    assert shard.name in res.output or "changed" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("what", ["manifest", "card"])
def test_editing_policy_in_manifest_or_card_breaks_the_signature(release, tmp_path, what):
    copy = tmp_path / "copy"
    shutil.copytree(release / "locked", copy)
    if what == "manifest":
        m = json.loads((copy / "moeharden-manifest.json").read_text())
        m["policy"]["groups"]["experts"] = "trainable"
        (copy / "moeharden-manifest.json").write_text(json.dumps(m))
    else:
        card = (copy / "README.md").read_text().replace("| experts | frozen |", "| experts | trainable |")
        (copy / "README.md").write_text(card)
    res = _verify(copy, release, "--json")
    assert res.exit_code == 4
    assert json.loads(res.stdout)["signature"]["ok"] is False


def _finetune_all(model, steps=3):
    """A brief fine-tune in which every weight changes (decoupled weight decay moves all of them)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, min(64, model.config.vocab_size), (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", ["demo", "qwen2_moe"])
def test_derivation_names_the_kept_experts_of_a_pruned_finetuned_model(family, tmp_path):
    from moeharden.model.registry import moe_layers

    root = tmp_path
    if family == "demo":                      # the embedded demo model's architecture and checkpoint layout
        from transformers import AutoModelForCausalLM

        from moeharden.demo.build import build_demo_model

        build_demo_model(root / "src", steps=30)
        model = AutoModelForCausalLM.from_pretrained(root / "src", dtype=torch.float32)
    else:
        model, _ = build_tiny(family, seed=3)
        model.save_pretrained(root / "src")
    (root / "policy.yaml").write_text(POLICY.replace("  attention: {lora: {max_rank: 8}}\n", ""))
    assert runner.invoke(app, ["lock", "keygen", "--out", str(root / "keys")]).exit_code == 0
    assert runner.invoke(app, ["lock", str(root / "src"), "--policy", str(root / "policy.yaml"), "--key",
                               str(root / "keys" / "moeharden.key"), "--out", str(root / "locked")]).exit_code == 0
    layers = [li.layer for li in moe_layers(model)]
    keep = {str(layer): sorted(torch.randperm(8, generator=torch.Generator().manual_seed(layer))[:4].tolist())
            for layer in layers}
    (root / "keep.json").write_text(json.dumps({"keep": keep}))
    res = runner.invoke(app, ["prune", str(root / "locked"), "--experts-from", str(root / "keep.json"),
                              "--out", str(root / "pruned")])
    assert res.exit_code == 0, res.output
    pruned = type(model).from_pretrained(root / "pruned", dtype=torch.float32)
    _finetune_all(pruned)
    pruned.save_pretrained(root / "suspect")
    res = runner.invoke(app, ["verify", str(root / "suspect"), "--manifest", str(root / "locked" /
                              "moeharden-manifest.json"), "--pubkey", str(root / "keys" / "moeharden.pub"), "--json"])
    assert res.exit_code == 4                                   # not the release: a derivative
    doc = json.loads(res.stdout)
    record = json.loads((root / "pruned" / "moeharden-prune.json").read_text())["keep"]
    got = {layer: d["kept"] for layer, d in doc["derivation"]["layers"].items()}
    assert got == record
    assert doc["signature"]["ok"] is True                       # the original release itself is intact
    assert any("experts removed" in v for v in doc["policy_violations"])


def test_policy_apply_stops_a_step_that_would_update_a_frozen_expert():
    from moeharden.defend.policy import apply, parse_policy
    from moeharden.errors import PolicyViolation
    from moeharden.model.registry import moe_layers

    model, _ = build_tiny("mixtral")
    import yaml

    guard = apply(model, parse_policy(yaml.safe_load(POLICY)))
    expert = moe_layers(model)[0].experts.gate_up_proj
    assert not expert.requires_grad
    norms = [p for n, p in model.named_parameters() if "norm" in n]
    assert all(p.requires_grad for p in norms)                  # trainable groups stay trainable
    ids = torch.randint(0, 64, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()            # an allowed step works
    expert.requires_grad_(True)                                 # someone unfreezes an expert
    with pytest.raises(PolicyViolation, match="gate_up_proj"):
        model(input_ids=ids, labels=ids)
    expert.requires_grad_(False)
    with torch.no_grad():
        expert.add_(0.01)                                       # or edits it in place
    with pytest.raises(PolicyViolation, match="changed"):
        guard.check()


@pytest.mark.parametrize("policy,code,words", [
    (POLICY + "bogus_key: 1\n", 3, ["bogus_key"]),
    (POLICY.replace("norms: trainable", "norms: sometimes"), 3, ["sometimes"]),
    (POLICY + "  shared_experts: frozen\n", 3, ["shared_experts", "match no parameter"]),
])
def test_bad_policies(release, tmp_path, policy, code, words):
    (tmp_path / "p.yaml").write_text(policy)
    res = runner.invoke(app, ["lock", str(release / "src"), "--policy", str(tmp_path / "p.yaml"), "--key",
                              str(release / "keys" / "moeharden.key"), "--out", str(tmp_path / "out")])
    assert res.exit_code == code, res.output
    for w in words:
        assert w in res.output
    assert not (tmp_path / "out").exists() and "Traceback" not in res.output


def test_wrong_key_missing_manifest_and_tampered_signature(release, tmp_path):
    assert runner.invoke(app, ["lock", "keygen", "--out", str(tmp_path / "other")]).exit_code == 0
    res = runner.invoke(app, ["verify", str(release / "locked"), "--pubkey", str(tmp_path / "other" / "moeharden.pub")])
    assert res.exit_code == 4 and "key" in res.output.lower()
    res = _verify(release / "src", release)                     # never locked: no manifest
    assert res.exit_code == 4 and "manifest" in res.output.lower()
    copy = tmp_path / "copy"
    shutil.copytree(release / "locked", copy)
    sig = copy / "model.sig"
    doc = json.loads(sig.read_text())
    sig_b64 = doc["dsseEnvelope"]["signatures"][0]["sig"]
    doc["dsseEnvelope"]["signatures"][0]["sig"] = ("B" if sig_b64[0] != "B" else "C") + sig_b64[1:]
    sig.write_text(json.dumps(doc))
    res = _verify(copy, release)
    assert res.exit_code == 4 and "Traceback" not in res.output


def test_policy_apply_limits_lora_to_allowed_groups_and_ranks():
    import yaml
    from peft import LoraConfig, get_peft_model

    from moeharden.defend.policy import apply, parse_policy
    from moeharden.errors import PolicyViolation

    policy = parse_policy(yaml.safe_load(POLICY))               # attention: lora up to rank 8
    ids = torch.randint(0, 64, (1, 5))
    ok = get_peft_model(build_tiny("mixtral")[0], LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    apply(ok, policy)
    ok(input_ids=ids)                                           # allowed: attention, rank 4 <= 8
    big = get_peft_model(build_tiny("mixtral")[0], LoraConfig(r=16, target_modules=["q_proj"]))
    apply(big, policy)
    with pytest.raises(PolicyViolation, match="rank 16"):
        big(input_ids=ids)
    head = get_peft_model(build_tiny("mixtral")[0], LoraConfig(r=4, target_modules=["lm_head"]))
    apply(head, policy)
    with pytest.raises(PolicyViolation, match="lm_head"):
        head(input_ids=ids)


def test_relocking_carries_data_files_but_no_code_stale_integrity_files_or_outside_links(release, tmp_path):
    """Lock a copy of the locked release that also holds custom code, a task file, and a model card
    linked to a file outside the checkpoint: the new release keeps the data, rewrites the card from
    nothing, replaces manifest and signature, and still verifies."""
    src = tmp_path / "src"
    shutil.copytree(release / "locked", src)
    (src / "modeling_evil.py").write_text("import os\n")
    (src / "moeharden-tasks.yaml").write_text("version: 1\ntasks: []\n")
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP SECRET")
    (src / "README.md").unlink()
    (src / "README.md").symlink_to(secret)
    out = tmp_path / "relocked"
    res = runner.invoke(app, ["lock", str(src), "--policy", str(release / "policy.yaml"), "--key",
                              str(release / "keys" / "moeharden.key"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "moeharden-tasks.yaml").read_text() == "version: 1\ntasks: []\n"
    assert not (out / "modeling_evil.py").exists()
    card = (out / "README.md").read_text()
    assert "TOP SECRET" not in card and "moeharden-locked" in card
    assert json.loads((out / "moeharden-manifest.json").read_text())["source"]["path"] == str(src)
    res = _verify(out, release, "--json")
    assert res.exit_code == 0, res.output


def test_lock_settings_check_every_option_before_anything_is_written(release, tmp_path):
    from moeharden.defend.lock import LockSettings
    from moeharden.errors import InputError, UsageError

    key = release / "keys" / "moeharden.key"
    ok = LockSettings(out=tmp_path / "o", policy=release / "policy.yaml", key=key)
    assert ok.out == tmp_path / "o" and not ok.keyless
    with pytest.raises(UsageError, match="--policy"):
        LockSettings(out=tmp_path / "o", policy=None, key=key)
    with pytest.raises(UsageError, match="--keyless"):
        LockSettings(out=tmp_path / "o", policy=release / "policy.yaml")
    with pytest.raises(UsageError, match="not both"):
        LockSettings(out=tmp_path / "o", policy=release / "policy.yaml", key=key, keyless=True)
    with pytest.raises(InputError, match="does not exist"):
        LockSettings(out=tmp_path / "o", policy=release / "policy.yaml", key=tmp_path / "nope.key")
    for argv, code in ((["--key", str(key), "--keyless"], 2), (["--policy", str(release / "policy.yaml")], 2),
                       (["--policy", str(release / "policy.yaml"), "--key", str(tmp_path / "nope.key")], 3)):
        res = runner.invoke(app, ["lock", str(release / "src"), "--out", str(tmp_path / "out"), *argv])
        assert res.exit_code == code and "Traceback" not in res.output, res.output
        assert not (tmp_path / "out").exists()


def test_the_written_manifest_is_exactly_its_model(release):
    from moeharden.audit.documents import load_document
    from moeharden.defend.lock import ManifestDocument
    from moeharden.io.shards import CheckpointFiles

    raw = json.loads((release / "locked" / "moeharden-manifest.json").read_text())
    assert set(raw) == set(ManifestDocument.model_json_schema(by_alias=True)["properties"])
    man = load_document(release / "locked" / "moeharden-manifest.json", ManifestDocument)
    assert set(man.tensors) == set(CheckpointFiles(release / "src").tensors)
    assert man.source.path == str(release / "src") and man.policy.groups["experts"] == "frozen"
    # a Mixtral expert is three matrices (w1, w2, w3), each sketched to `dim` numbers
    assert man.model.num_experts == 8 and len(man.fingerprints.experts["0"]["0"]) == 3 * man.fingerprints.dim
