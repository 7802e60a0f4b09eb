"""Shared fixtures: test data location, a tiny saved Mixtral checkpoint, quiet transformers."""

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


@pytest.fixture(scope="session")
def test_data() -> Path:
    """``$MOEHARDEN_TEST_DATA`` or ``../shared/data`` beside the repo; skips when absent."""
    root = Path(os.environ.get("MOEHARDEN_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not root.is_dir():
        pytest.skip(f"public test data not found at {root} (set MOEHARDEN_TEST_DATA)")
    return root


@pytest.fixture(scope="session")
def tiny_mixtral_ckpt(tmp_path_factory) -> Path:
    """A tiny real Mixtral saved as a safetensors checkpoint (sharded), with a tokenizer."""
    from families import build_tiny

    model, _ = build_tiny("mixtral")
    d = tmp_path_factory.mktemp("ckpt") / "mixtral"
    model.save_pretrained(d, max_shard_size="40KB")
    return d
