"""The demo model cache under concurrency: two builders that miss the cache at once train once.

Parallel test workers (pytest-xdist) and two ``moeharden demo`` runs share ``~/.cache/moeharden``.
Training is replaced by a slow fake that writes a complete cache entry, so the test counts how
many times an entry was built and checks both outputs are whole copies of it.
"""

from __future__ import annotations

import json
import threading
import time

import moeharden.demo.build as build
from moeharden.demo.synthetic import TASK_FILE_NAME
from moeharden.demo.train import load_recipe
from moeharden.io.outputs import OUTPUT_MARKER


def _fake_train(calls):
    def train_into(cache_dir, recipe, steps):
        calls.append(cache_dir)
        tmp = build.temp_sibling(cache_dir)
        time.sleep(0.5)                                   # long enough for the other thread to miss the cache
        for name in ("config.json", "model.safetensors", "tokenizer.json", TASK_FILE_NAME):
            (tmp / name).write_text(name)
        (tmp / build.RECIPE_FILE_NAME).write_text(json.dumps({"recipe_hash": recipe.hash()}))
        build.replace_dir(tmp, cache_dir)
    return train_into


def test_concurrent_builders_train_once_and_both_get_whole_copies(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEHARDEN_CACHE", str(tmp_path / "cache"))
    calls: list = []
    monkeypatch.setattr(build, "_train_into", _fake_train(calls))
    recipe, errors = load_recipe(), []

    def run(i):
        try:
            build.build_demo_model(tmp_path / f"out{i}", recipe=recipe)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(calls) == 1
    for i in range(2):
        out = tmp_path / f"out{i}"
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["config.json", "model.safetensors", "tokenizer.json", TASK_FILE_NAME, build.RECIPE_FILE_NAME,
             OUTPUT_MARKER])
    # nothing half-built left in the cache: the entry and its lock file only
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [f"demo-{recipe.hash()}",
                                                                      f"demo-{recipe.hash()}.lock"]
