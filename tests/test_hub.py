"""Hub push against a loopback fake Hub (tests/fake_hub.py), and its failure messages.

Pushes run in a subprocess with ``HF_ENDPOINT`` / ``HF_TOKEN`` / ``HF_HOME`` set before
huggingface_hub is imported — the way a user's shell sets them — because the test process itself
runs with ``HF_HUB_OFFLINE=1`` (conftest) and huggingface_hub reads that at import.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_hub import FakeHub
from safetensors.torch import save_file

from moeharden import __version__
from moeharden.errors import EXIT_INPUT, HubError, InputError, NetworkError

TOKEN = "hf_moehardenTestSecret0123456789abcdef"

# Runs one push in a fresh interpreter; prints {"ok": result} or {"error": {...}} as the last line.
_SCRIPT = r"""
import json, sys
from moeharden.errors import MoehardenError
from moeharden.io.hub import push_output
folder, repo_id, what, private = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
try:
    r = push_output(folder, repo_id, what, private=private)
    print(json.dumps({"ok": r.to_dict()}))
except MoehardenError as e:
    print(json.dumps({"error": {"type": type(e).__name__, "title": e.title, "message": e.message,
                                "hint": e.hint, "exit_code": e.exit_code}}))
"""


def _push(folder: Path, repo_id: str, *, endpoint: str, home: Path, token: str | None = TOKEN,
          what: str = "entangle", private: bool = True, env: dict | None = None) -> tuple[dict, str]:
    """Run a push in a subprocess; returns (parsed last line, all of stdout + stderr)."""
    e = {k: v for k, v in os.environ.items()
         if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                      "HF_OIDC_RESOURCE", "HF_ENDPOINT")}
    e.update({"HF_ENDPOINT": endpoint, "HF_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost",
              "HF_HUB_DISABLE_TELEMETRY": "1"})
    if token is not None:
        e["HF_TOKEN"] = token
    e.update(env or {})
    p = subprocess.run([sys.executable, "-c", _SCRIPT, str(folder), repo_id, what, "1" if private else "0"],
                       env=e, capture_output=True, text=True, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return json.loads(p.stdout.strip().splitlines()[-1]), out


@pytest.fixture()
def out_dir(tmp_path) -> Path:
    """A small output directory like entangle/verify write: weights, JSON, a nested report, a card."""
    d = tmp_path / "out"
    (d / "verify").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"model.layers.0.mlp.experts.gate_up_proj": torch.randn(4, 16, 8, generator=g),
               "model.layers.0.mlp.gate.weight": torch.randn(4, 8, generator=g)},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_local_experts": 4}))
    (d / "verify" / "verify.json").write_text(json.dumps({"schema": "moeharden.verify/1", "passed": True}))
    (d / "README.md").write_text("---\nlicense: apache-2.0\ntags: [moeharden]\n---\n# hardened\n")
    (d / "empty.txt").write_bytes(b"")
    return d


def _local(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_push_uploads_every_file_private_with_version(out_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        res, out = _push(out_dir, "org/mixtral-hardened", endpoint=hub.endpoint, home=tmp_path / "hf")
        assert "ok" in res, res
        repo = hub.repos["org/mixtral-hardened"]
        # byte-for-byte: every local file arrived, nothing else did
        assert repo.files == _local(out_dir)
        assert sorted(res["ok"]["files"]) == sorted(_local(out_dir))
        assert repo.private is True and hub.create_payloads[0]["visibility"] == "private"
        assert len(repo.commits) == 1
        assert repo.commits[0]["summary"] == f"moeharden {__version__}: entangle"
        assert res["ok"]["commit_message"] == f"moeharden {__version__}: entangle"
        assert res["ok"]["commit_oid"] == repo.commits[0]["oid"]
        # every request carried the token, and the token appears nowhere in what the process wrote
        assert hub.requests and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in hub.requests)
        assert TOKEN not in out
        # second push to the same repo (exist_ok): a verify report lands under moeharden/verify/,
        # leaving the checkpoint's files as they were
        rep = tmp_path / "verify-out"
        rep.mkdir()
        (rep / "verify.json").write_text('{"schema": "moeharden.verify/1", "passed": false}')
        (rep / "report.md").write_text("# report\n")
        res2, out2 = _push(rep, "org/mixtral-hardened", endpoint=hub.endpoint, home=tmp_path / "hf",
                           what="verify")
        assert "ok" in res2, res2
        expected = {**_local(out_dir), **{f"moeharden/verify/{k}": v for k, v in _local(rep).items()}}
        assert repo.files == expected
        assert sorted(res2["ok"]["files"]) == ["moeharden/verify/report.md", "moeharden/verify/verify.json"]
        assert [c["summary"] for c in repo.commits] == [f"moeharden {__version__}: entangle",
                                                        f"moeharden {__version__}: verify"]
        assert len(hub.create_payloads) == 2 and repo.private is True
        assert TOKEN not in out2


def test_push_public_when_asked(out_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        res, _ = _push(out_dir, "org/public", endpoint=hub.endpoint, home=tmp_path / "hf", private=False)
        assert "ok" in res, res
        assert hub.repos["org/public"].private is False


def test_rejected_token_gives_hub_error_without_the_token(out_dir, tmp_path):
    wrong = "hf_wrongTokenThatMustNotLeak987654321"
    with FakeHub(TOKEN) as hub:   # the fake echoes the sent credential in its 401 body
        res, out = _push(out_dir, "org/x", endpoint=hub.endpoint, home=tmp_path / "hf", token=wrong)
        assert hub.requests, "the server was never asked"
    err = res["error"]
    assert err["type"] == "HubError" and err["exit_code"] == EXIT_INPUT
    assert "401" in err["message"] and "hf auth login" in err["hint"]
    assert wrong not in out and "hf_***" in err["message"]   # echoed credential scrubbed


def test_no_token_anywhere(out_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        res, _ = _push(out_dir, "org/x", endpoint=hub.endpoint, home=tmp_path / "empty-home", token=None)
        assert hub.requests == []
    assert res["error"]["type"] == "HubError"
    assert "No Hugging Face token" in res["error"]["message"]


def test_token_from_login_cache(out_dir, tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text(TOKEN)     # what `hf auth login` writes under HF_HOME
    with FakeHub(TOKEN) as hub:
        res, out = _push(out_dir, "org/cached", endpoint=hub.endpoint, home=home, token=None)
        assert "ok" in res, res
        assert hub.repos["org/cached"].files == _local(out_dir)
    assert TOKEN not in out


def test_unreachable_endpoint_is_network_error(out_dir, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # nothing listens there now
    endpoint = f"http://127.0.0.1:{port}"
    res, out = _push(out_dir, "org/x", endpoint=endpoint, home=tmp_path / "hf")
    err = res["error"]
    assert err["type"] == "NetworkError" and err["exit_code"] == EXIT_INPUT
    assert endpoint in err["message"] and "Cannot reach" in err["message"]
    assert "Traceback" not in out and TOKEN not in out


def test_offline_mode_is_network_error(out_dir, tmp_path):
    with FakeHub(TOKEN) as hub:
        res, out = _push(out_dir, "org/x", endpoint=hub.endpoint, home=tmp_path / "hf",
                         env={"HF_HUB_OFFLINE": "1"})
        assert hub.requests == []        # refused before any request
    assert res["error"]["type"] == "NetworkError"
    assert "HF_HUB_OFFLINE" in res["error"]["message"]
    assert "Traceback" not in out


def test_offline_in_process_and_bad_folder(tmp_path, monkeypatch):
    from moeharden.io.hub import push_to_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d = tmp_path / "o"
    d.mkdir()
    (d / "a.json").write_text("{}")
    with pytest.raises(NetworkError, match="offline"):
        push_to_hub(d, "org/x", what="lock", token=TOKEN)
    with pytest.raises(InputError, match="not a directory"):
        push_to_hub(tmp_path / "missing", "org/x", what="lock", token=TOKEN)
    empty = tmp_path / "e"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        push_to_hub(empty, "org/x", what="lock", token=TOKEN)


def test_translate_scrubs_token_from_any_message():
    from moeharden.io.hub import _translate

    err = _translate(ConnectionRefusedError(f"refused for Bearer {TOKEN}"), endpoint="http://h",
                     repo_id="o/x", token=TOKEN)
    assert isinstance(err, NetworkError) and TOKEN not in err.message and "hf_***" in err.message
    other = _translate(RuntimeError(f"boom {TOKEN}"), endpoint="http://h", repo_id="o/x", token=TOKEN)
    assert isinstance(other, HubError) and TOKEN not in str(other)
