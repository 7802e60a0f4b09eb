"""On a GPU: scan, prune, entangle (bf16) and verify on a real-shape checkpoint placed with device_map.

The checkpoint is Qwen3-30B-A3B's released config (every width, 128 experts, top-8, the real
vocabulary) truncated to two decoder layers, random weights in bf16 (``bench/scale.py`` builds the
same), with the demo's tokenizer and synthetic task file, so that the whole pipeline runs without
downloads. Skipped without CUDA (the project's CI has none); run with ``pytest -m gpu``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BENCH = Path(__file__).resolve().parents[1] / "bench" / "scale.py"


def _scale():
    spec = importlib.util.spec_from_file_location("moeharden_bench_scale", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_shape(tmp_path_factory) -> Path:
    from moeharden.demo.synthetic import write_task_file
    from moeharden.demo.train import build_tokenizer, load_recipe

    scale = _scale()
    path = tmp_path_factory.mktemp("real") / "qwen3-30b-a3b-L2"
    cls, kw = scale._config("qwen3-30b-a3b", 2, None)
    res = subprocess.run([sys.executable, "-c", scale.CHILD_BUILD, cls, json.dumps(kw), str(path), "2GB"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    build_tokenizer().save_pretrained(path)
    recipe = load_recipe()
    write_task_file(path, recipe.data.rows_per_task, recipe.data.split)
    return path


def _cli(*args) -> dict:
    from moeharden.cli import app

    res = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert res.exit_code in (0, 1), res.output[-3000:]      # 1: a gate that fails is a result here
    return json.loads(res.stdout)


def test_the_model_is_placed_on_the_gpu_in_bf16(real_shape):
    from moeharden.model.checkpoint import load_model

    model = load_model(real_shape)
    devices = {p.device.type for p in model.parameters()}
    assert devices == {"cuda"} and next(model.parameters()).dtype == torch.bfloat16
    assert model.config.num_experts == 128 and model.config.hidden_size == 2048


def test_scan_prune_entangle_verify_on_a_real_shape_checkpoint(real_shape, tmp_path):
    from safetensors import safe_open

    scan = _cli("scan", real_shape, "--out", tmp_path / "scan", "--limit", 64, "--keep", 32, "--keep", 8,
                "--no-recover", "--no-ladder")
    doc = json.loads((tmp_path / "scan" / "scan.json").read_text())
    assert doc["model"]["num_experts"] == 128 and scan["headline"]
    keep = doc["keep_sets"]["reap"][doc["tasks"][0]["name"]]["8"]
    (tmp_path / "keep.json").write_text(json.dumps({"keep": keep}))
    _cli("prune", real_shape, "--out", tmp_path / "pruned", "--experts-from", tmp_path / "keep.json")
    cfg = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert cfg.get("num_local_experts", cfg.get("num_experts")) == 8 and cfg["num_experts_per_tok"] == 8
    names = set()
    for f in (tmp_path / "pruned").glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            names |= set(h.keys())
    assert not any(".experts.8." in n for n in names)
    ent = _cli("entangle", real_shape, "--out", tmp_path / "hardened", "--steps", 4, "--batch-size", 4,
               "--mixed-precision", "bf16", "--limit", 32)
    assert ent["completed"]
    ver = _cli("verify", tmp_path / "hardened", "--baseline", tmp_path / "scan" / "scan.json", "--out",
               tmp_path / "verify")
    assert "passed" in ver
    vdoc = json.loads((tmp_path / "verify" / "verify.json").read_text())
    assert vdoc["gate"] and all("pass" in r for r in vdoc["gate"])
