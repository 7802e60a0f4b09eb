"""Property-based hostile input (issue 14): generated safetensors headers, index files and
task/policy/gate YAML — valid, truncated and mutated.

For every generated input: the exit code is one of 0, 2, 3, 4 (a library call raises only a typed
:class:`~moeharden.errors.MoehardenError` with such a code), no traceback is printed, a failed run
leaves no output (not even a temporary sibling), and no file outside the input is opened (every
``open`` is watched through an audit hook; a canary file beside the checkpoint must stay unread).
Kept fast for CI on 2 cores: tiny checkpoints, at most 60 examples per property, no deadline.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from moeharden.cli import app
from moeharden.errors import MoehardenError

runner = CliRunner()
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KEEP = {"keep": {"0": [0, 1, 2, 3], "1": [0, 1, 2, 3]}}

# ---------------------------------------------------------------- watching every open()

_WATCH: dict = {"root": None, "opened": []}


def _audit(event, args):
    if event == "open" and _WATCH["root"] is not None and args and isinstance(args[0], (str, bytes, Path)):
        path = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
        if path.startswith(_WATCH["root"]):
            _WATCH["opened"].append(path)


sys.addaudithook(_audit)        # audit hooks cannot be removed; it records only while a sandbox is watched


@contextmanager
def _sandbox(ckpt: Path):
    """A fresh directory holding a copy of ``ckpt`` (``ck/``), a canary outside it and a keep-set."""
    root = Path(tempfile.mkdtemp(prefix="hostile-"))
    try:
        shutil.copytree(ckpt, root / "ck")
        (root / "canary.safetensors").write_bytes(b"never read me")
        (root / "canary.jsonl").write_text('{"text": "never read me"}\n')
        (root / "keep.json").write_text(json.dumps(KEEP))
        yield root
    finally:
        _WATCH["root"] = None
        shutil.rmtree(root, ignore_errors=True)


def _invoke(root: Path, *args):
    """Run the CLI with every open() under ``root`` recorded; returns the result."""
    _WATCH["root"], _WATCH["opened"] = str(root), []
    try:
        res = runner.invoke(app, [str(a) for a in args])
    finally:
        _WATCH["root"] = None
    return res


def _check(res, root: Path, out: Path):
    assert res.exit_code in (0, 2, 3, 4), (res.exit_code, res.output)
    assert "Traceback" not in res.output and "Internal error" not in res.output, res.output
    if res.exit_code != 0:
        assert not out.exists(), f"a failed run left {out}"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers
    canaries = [p for p in _WATCH["opened"] if Path(p).name.startswith("canary")]
    assert not canaries, f"read outside the checkpoint: {canaries}"


# ---------------------------------------------------------------- safetensors headers

def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _pack(header: dict | bytes, data: bytes) -> bytes:
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.text(max_size=8),
                  st.lists(st.integers(-5, 5000), max_size=4))
_FIELD_EDIT = st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]),
                        st.one_of(_JUNK, st.sampled_from(["F16", "F32", "BF16", "I8", "F4", "XX"]),
                                  st.lists(st.integers(0, 64), min_size=1, max_size=3)))
_HEADER_MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("bytes"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=4)),
    st.tuples(st.just("field"), st.tuples(st.integers(0, 50), _FIELD_EDIT)),
    st.tuples(st.just("header"), _JUNK),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=32)),
    st.tuples(st.just("valid"), st.none()),
)


def _mutate_shard(shard: Path, how, what) -> None:
    raw = shard.read_bytes()
    if how == "truncate":
        shard.write_bytes(raw[:int(len(raw) * what)])
    elif how == "bytes":
        buf = bytearray(raw)
        for pos, val in what:
            buf[min(int(pos * 200), len(buf) - 1)] = val       # mostly inside the length and header
        shard.write_bytes(bytes(buf))
    elif how == "field":
        header, data = _split(raw)
        names = sorted(k for k in header if k != "__metadata__")
        i, (key, value) = what
        header[names[i % len(names)]][key] = value
        shard.write_bytes(_pack(header, data))
    elif how == "header":
        shard.write_bytes(_pack(json.dumps(what).encode(), _split(raw)[1]))
    elif how == "append":
        shard.write_bytes(raw + what)


@FAST
@given(mutation=_HEADER_MUTATION, which=st.integers(0, 7))
def test_generated_safetensors_headers(tiny_mixtral_ckpt, mutation, which):
    with _sandbox(tiny_mixtral_ckpt) as root:
        shards = sorted((root / "ck").glob("*.safetensors"))
        _mutate_shard(shards[which % len(shards)], *mutation)
        out = root / "out"
        res = _invoke(root, "prune", root / "ck", "--experts-from", root / "keep.json", "--out", out)
        _check(res, root, out)
        if mutation[0] == "valid":
            assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- index files

def _shard_value(root: Path):
    return st.one_of(
        st.sampled_from(["../canary.safetensors", str(root / "canary.safetensors"), "sub/x.safetensors", "",
                         ".", "..", "model.safetensors", "nope.safetensors"]),
        _JUNK,
    )


@FAST
@given(data=st.data())
def test_generated_index_files(tiny_mixtral_ckpt, data):
    with _sandbox(tiny_mixtral_ckpt) as root:
        index = root / "ck" / "model.safetensors.index.json"
        doc = json.loads(index.read_text())
        names = sorted(doc["weight_map"])
        kind = data.draw(st.sampled_from(["entry", "entries", "whole", "truncate", "valid", "link"]))
        if kind in ("entry", "entries"):
            for _ in range(1 if kind == "entry" else data.draw(st.integers(2, 5))):
                name = data.draw(st.sampled_from(names + ["extra.tensor"]))
                doc["weight_map"][name] = data.draw(_shard_value(root))
            index.write_text(json.dumps(doc))
        elif kind == "whole":
            doc = data.draw(st.recursive(_JUNK, lambda c: st.one_of(st.lists(c, max_size=3),
                                                                     st.dictionaries(st.text(max_size=6), c,
                                                                                     max_size=3)), max_leaves=8))
            index.write_text(json.dumps({"weight_map": doc} if data.draw(st.booleans()) else doc))
        elif kind == "truncate":
            text = index.read_text()
            index.write_text(text[:data.draw(st.integers(0, len(text) - 1))])
        elif kind == "link":                 # a shard replaced by a link to the canary outside
            shard = root / "ck" / doc["weight_map"][names[0]]
            shard.unlink()
            shard.symlink_to(root / "canary.safetensors")
        out = root / "out"
        res = _invoke(root, "prune", root / "ck", "--experts-from", root / "keep.json", "--out", out)
        _check(res, root, out)
        if kind == "valid":
            assert res.exit_code == 0, res.output


# ---------------------------------------------------------------- task / policy / gate YAML

_VALID_TASKS = {"version": 1, "tasks": [
    {"name": "sent", "kind": "multiple_choice", "data": {"path": "rows.jsonl"}, "prompt": "{text} ->",
     "choices": [" neg", " pos"], "label_field": "label", "split": {"attribution": 3, "train": 2, "seed": 1}}]}
_VALID_POLICY = {"version": 1, "license": "apache-2.0", "permitted_uses": "research", "contact": "a@b.c",
                 "groups": {"experts": "frozen", "router": "frozen", "attention": {"lora": {"max_rank": 8}}}}
_VALID_GATE = {"version": 1, "full_metric_min_fraction": 0.9}


def _yaml_text(valid: dict, root: Path):
    """Valid, truncated, mutated, alias-bombed, binary or random YAML documents around ``valid``."""
    text = yaml.safe_dump(valid, sort_keys=False)
    bomb = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    random_doc = st.recursive(_JUNK, lambda c: st.one_of(st.lists(c, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), c, max_size=4)),
                              max_leaves=10).map(lambda d: yaml.safe_dump(d))
    field_swap = st.tuples(st.sampled_from(sorted(_flat_keys(valid))), _JUNK).map(
        lambda kv: yaml.safe_dump(_set_path(valid, kv[0], kv[1]), sort_keys=False))
    return st.one_of(
        st.just(text),
        st.integers(0, len(text) - 1).map(lambda n: text[:n]),
        st.tuples(st.integers(0, len(text)), st.text(max_size=4)).map(lambda t: text[:t[0]] + t[1] + text[t[0]:]),
        field_swap,
        random_doc,
        st.just(bomb),
        st.just("[" * 3000 + "]" * 3000),
        st.just("\x00\x01binary\xff"),
        st.just(text.replace("rows.jsonl", "../canary.jsonl")),
        st.just(text.replace("rows.jsonl", str(root / "canary.jsonl"))),
        st.just("x: !!python/object/apply:os.system ['echo hi']\n"),
    )


def _flat_keys(d, prefix=()):
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            out.append((*prefix, k))
            out += _flat_keys(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _flat_keys(v, (*prefix, i))
    return out


def _set_path(d, path, value):
    d = json.loads(json.dumps(d))
    node = d
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return d


def _typed(fn, *args, **kwargs):
    """Call ``fn``; success, or a typed error whose exit code is 2, 3 or 4."""
    try:
        fn(*args, **kwargs)
    except MoehardenError as err:
        assert err.exit_code in (2, 3, 4), err


@FAST
@given(data=st.data())
def test_generated_task_files(tiny_mixtral_ckpt, data):
    from moeharden.tasks.resolve import load_tasks
    from moeharden.tasks.spec import TASK_FILE_NAME

    with _sandbox(tiny_mixtral_ckpt) as root:
        ck = root / "ck"
        rows = [{"text": f"t{i}", "label": i % 2} for i in range(8)]
        (ck / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if data.draw(st.booleans()):          # a data file that is a link out of the checkpoint
            (ck / "rows.jsonl").unlink()
            (ck / "rows.jsonl").symlink_to(root / "canary.jsonl")
        text = data.draw(_yaml_text(_VALID_TASKS, root))
        (ck / TASK_FILE_NAME).write_text(text, encoding="utf-8", errors="surrogateescape")
        _WATCH["root"], _WATCH["opened"] = str(root), []
        try:
            _typed(load_tasks, None, checkpoint_dir=ck)
        finally:
            _WATCH["root"] = None
        canaries = [p for p in _WATCH["opened"] if Path(p).name.startswith("canary")]
        assert not canaries, f"a checkpoint's task file read outside it: {canaries}"


@FAST
@given(data=st.data())
def test_generated_policy_and_gate_files(tmp_path_factory, data):
    from moeharden.audit.gate import load_gate
    from moeharden.defend.policy import load_policy

    root = tmp_path_factory.mktemp("yaml")
    for valid, loader in ((_VALID_POLICY, load_policy), (_VALID_GATE, load_gate)):
        path = root / "file.yaml"
        path.write_text(data.draw(_yaml_text(valid, root)), encoding="utf-8", errors="surrogateescape")
        _typed(loader, path)


def test_a_policy_through_the_cli_locks_or_fails_cleanly(tiny_mixtral_ckpt):
    """The CLI end of the YAML property: a valid, an alias-bombed and a device policy given to `lock`."""
    with _sandbox(tiny_mixtral_ckpt) as root:
        assert runner.invoke(app, ["lock", "keygen", "--out", str(root / "keys")]).exit_code == 0
        bomb = "a: &a [x, x]\nb: [*a, *a]\n"
        for i, text in enumerate([yaml.safe_dump(_VALID_POLICY), bomb, None]):
            policy = Path("/dev/zero") if text is None else root / f"p{i}.yaml"
            if text is not None:
                policy.write_text(text)
            out = root / f"locked{i}"
            res = _invoke(root, "lock", root / "ck", "--policy", policy, "--key", root / "keys" / "moeharden.key",
                          "--out", out)
            _check(res, root, out)
            assert res.exit_code == (0 if i == 0 else 3), res.output
