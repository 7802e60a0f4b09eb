"""Shared fixtures: test data location, a tiny saved Mixtral checkpoint and its locked release, quiet
transformers."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))          # tests/families.py, tests/tiny_lm.py

os.environ.setdefault("HF_HUB_OFFLINE", "1")             # tests never reach the Hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Files that take minutes, slowest first (measured with --durations on 2 cores: the demo pipeline,
# the demo model's accuracy, the paper's finding, the two-process runs, the honest gate). They start
# first, so that under pytest-xdist (--dist loadfile, scripts/test.sh) no worker is left running one
# of them alone at the end while the other is idle.
HEAVY_FIRST = ("test_pipeline.py", "test_demo.py", "test_scan.py", "test_distributed.py", "test_gate_honest.py",
               "test_journal.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: the rest keep their order


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``$MOEHARDEN_TEST_DATA`` or ``../shared/data`` beside the repo; skips when absent."""
    root = Path(os.environ.get("MOEHARDEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"public test data not found at {root} (set MOEHARDEN_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory) -> Path:
    """A temporary directory shared by the whole session (for fixtures built once)."""
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def tiny_mixtral_ckpt(session_tmp) -> Path:
    """A tiny real Mixtral (``families.build_tiny("mixtral")``: 2 MoE layers, 8 experts, top-2, vocab 64)
    saved as a sharded safetensors checkpoint. Treat it as read-only; copy it to modify it."""
    from families import build_tiny

    model, _ = build_tiny("mixtral")
    d = session_tmp / "mixtral"
    model.save_pretrained(d, max_shard_size="40KB")
    return d


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    """The demo model, briefly trained (30 steps; cached like the demo's own), for the tests that run
    the CLI on it in other processes."""
    from moeharden.demo import build as demo

    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model", steps=30)


@pytest.fixture(scope="session")
def locked_release(session_tmp) -> Path:
    """A tiny Mixtral in two or more shards (``src/``), a key pair (``keys/``), ``policy.yaml``
    (``families.LOCK_POLICY``) and the release ``moeharden lock`` made of them (``locked/``). Read-only:
    copy what a test tampers with."""
    from families import LOCK_POLICY, build_tiny
    from typer.testing import CliRunner

    from moeharden.cli import app

    runner, root = CliRunner(), session_tmp / "lock"
    model, _ = build_tiny("mixtral")
    model.save_pretrained(root / "src", max_shard_size="60KB")
    (root / "policy.yaml").write_text(LOCK_POLICY)
    assert runner.invoke(app, ["lock", "keygen", "--out", str(root / "keys")]).exit_code == 0
    res = runner.invoke(app, ["lock", str(root / "src"), "--policy", str(root / "policy.yaml"), "--key",
                              str(root / "keys" / "moeharden.key"), "--out", str(root / "locked")])
    assert res.exit_code == 0, res.output
    return root
