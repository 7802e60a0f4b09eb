"""Load a checkpoint by reading every stored tensor once, straight into its place in the model.

``from_pretrained`` maps the shards and, for the families whose experts are stored one tensor per
expert but held fused in the model (``[E, 2I, H]``), builds each fused tensor with
``torch.stack``/``torch.cat`` from the mapped sources: the mapped pages stay resident beside the
private fused copies, so ``scan``'s peak RSS reaches about twice the weights (measured in
docs/attacks-and-defenses.md §1.1). This loader instead

1. builds the model with its parameters on the meta device and its buffers real
   (``accelerate.init_empty_weights(include_buffers=False)``): nothing is randomly initialised, and
   the non-persistent buffers (rotary ``inv_freq``) are computed by the modules themselves;
2. learns where every stored row goes by running transformers' own conversion table
   (``get_model_conversion_mapping``, the table ``from_pretrained`` loads and ``save_pretrained``
   saves with) on small integer *index* tensors, one code ``source << 32 | row`` per row: no
   family's layout is written down twice;
3. reads each run of consecutive rows with a positioned read into the parameter's memory (through
   a bounded buffer when the stored dtype is not the model's), shard by shard in file order.

It proves its plan exact before it reads a byte: every code a valid row, every stored row placed
at most once, every destination's last dimension untouched by the conversion, every parameter
filled. Anything else — an operation that moves the last dimension or does arithmetic, a
parameter the checkpoint does not fill (``from_pretrained`` would initialise it), a sub-byte dtype,
a keep-in-fp32 module — returns ``None`` and the caller falls back to ``from_pretrained``.
Stored tensors the model does not hold are skipped, as ``from_pretrained`` skips them.

The conversion helpers are transformers internals (``core_model_loading``; PEFT uses the same
table); ``tests/test_inplace.py`` pins the result to ``from_pretrained``'s, tensor for tensor and
logit for logit, on every discovered family, in float32 and bfloat16.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from moeharden.io.byteio import read_into
from moeharden.io.shards import CheckpointFiles, TensorInfo, torch_dtype

_ROW_BITS = 32
_ROW_MASK = (1 << _ROW_BITS) - 1
_CHUNK_BYTES = 64 << 20      # bounded scratch for reads that change dtype


@dataclass(frozen=True)
class _Run:
    """One positioned read: ``count`` units of ``source`` from ``row`` into ``dest`` from unit ``at``."""

    source: TensorInfo
    row: int
    count: int
    dest: str
    at: int


def _units(info: TensorInfo) -> tuple[tuple[int, ...], int]:
    """The index shape of a stored tensor and the elements per index entry: rows of the last
    dimension for a tensor of 2 or more dimensions, single elements otherwise."""
    if len(info.shape) >= 2:
        return tuple(info.shape[:-1]) + (1,), int(info.shape[-1])
    return tuple(info.shape), 1


def _rows(info: TensorInfo) -> int:
    """How many index entries (rows or elements, see :func:`_units`) a stored tensor has."""
    return math.prod(_units(info)[0])


def _index_tensor(i: int, info: TensorInfo) -> torch.Tensor:
    """``[*shape[:-1], 1]`` int64 codes ``i << 32 | row`` of stored tensor ``i`` (``[*shape]`` below 2-D)."""
    return (torch.arange(_rows(info), dtype=torch.int64) + (i << _ROW_BITS)).reshape(_units(info)[0])


def empty_model(config: Any, dtype: torch.dtype):
    """The causal LM of ``config``: parameters on the meta device, buffers computed on CPU."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _plan(model, files: CheckpointFiles, names: list[str]):
    """``{destination name: int64 codes}`` for every tensor of the state dict the checkpoint fills,
    or ``None`` when transformers' conversion cannot be replayed on index tensors."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    targets = model.state_dict(keep_vars=True)
    mapping = get_model_conversion_mapping(model)
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix
    plain: dict[str, torch.Tensor] = {}
    groups: dict[str, Any] = {}
    for i, name in enumerate(names):
        renamed, pattern = rename_source_key(name, renamings, converters, prefix, targets)
        if renamed not in targets and name in targets:
            renamed, pattern = rename_source_key(name, [], [], base_model_prefix=prefix, meta_state_dict=targets)
        if renamed not in targets:
            continue          # a stored tensor the model does not hold: from_pretrained skips it too
        if pattern is None:
            if renamed in plain:
                return None
            plain[renamed] = _index_tensor(i, files.tensors[name])
        else:
            group = groups.setdefault(renamed, copy.deepcopy(by_pattern[pattern]))
            group.add_tensor(renamed, name, pattern, partial(_index_tensor, i, files.tensors[name]))
    out = dict(plain)
    for first, group in groups.items():
        converted = group.convert(first, model=model, config=model.config)
        for target, value in converted.items():
            value = value[0] if isinstance(value, list) else value
            if target in out or target not in targets or not isinstance(value, torch.Tensor):
                return None
            out[target] = value
    model._weight_conversions = [m for m in mapping if m.was_used()]   # save_pretrained reverts them
    return out


def _runs(model, files: CheckpointFiles, names: list[str], plan: dict[str, torch.Tensor]) -> list[_Run] | None:
    """The positioned reads that carry out ``plan``, or ``None`` where it is not an exact placement."""
    targets = model.state_dict(keep_vars=True)
    infos = [files.tensors[n] for n in names]
    runs: list[_Run] = []
    seen: list[torch.Tensor] = []
    for dest, codes in plan.items():
        want = targets[dest]
        if codes.dtype != torch.int64 or codes.numel() == 0 and want.numel() != 0:
            return None
        if tuple(codes.shape) == tuple(want.shape):
            unit = 1                                        # element by element (1-D, or stacked 1-D)
        elif want.dim() >= 1 and tuple(codes.shape) == tuple(want.shape[:-1]) + (1,):
            unit = int(want.shape[-1])                      # whole rows of the last dimension
        else:
            return None
        flat = codes.reshape(-1)
        if flat.numel() == 0:
            continue
        src, row = flat >> _ROW_BITS, flat & _ROW_MASK
        if int(src.min()) < 0 or int(src.max()) >= len(infos):
            return None
        for s in torch.unique(src).tolist():
            info = infos[s]
            if _units(info)[1] != unit or int(row[src == s].max()) >= _rows(info) or torch_dtype(info.dtype) is None:
                return None
        seen.append(flat)
        # a run breaks wherever the next unit is not the next row of the same stored tensor
        starts = torch.nonzero(torch.diff(flat, prepend=flat[:1] - 2) != 1).reshape(-1).tolist()
        ends = starts[1:] + [flat.numel()]
        for a, b in zip(starts, ends, strict=True):
            runs.append(_Run(infos[int(src[a])], int(row[a]), b - a, dest, a))
    if seen:
        every = torch.cat(seen)
        if torch.unique(every).numel() != every.numel():   # a stored row placed twice: not a plain load
            return None
    runs.sort(key=lambda r: (str(r.source.file), r.source.start + r.row))
    return runs


def _materialise(model, plan: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Real, uninitialised storage for every planned destination still on meta: ``{name: tensor}``."""
    dests = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if name not in plan:
            continue
        if value.device.type == "meta":
            module_name, _, leaf = name.rpartition(".")
            module = model.get_submodule(module_name)
            real = torch.empty(value.shape, dtype=value.dtype)
            if leaf in module._parameters:
                module._parameters[leaf] = torch.nn.Parameter(real, requires_grad=value.requires_grad)
            else:
                module._buffers[leaf] = real
            value = real
        dests[name] = value.data
    return dests


def _execute(runs: list[_Run], dests: dict[str, torch.Tensor]) -> None:
    """Every run's bytes into its destination, one shard open at a time.

    Raises:
        CheckpointError: a shard that ends early (changed since its header was read).
    """
    handle, open_path = None, None
    try:
        for run in runs:
            if run.source.file != open_path:
                if handle is not None:
                    handle.close()
                handle, open_path = open(run.source.file, "rb", buffering=0), run.source.file
            dest = dests[run.dest].view(-1)
            _, unit = _units(run.source)
            src_dtype = torch_dtype(run.source.dtype)
            item = src_dtype.itemsize
            offset = run.source.start + run.row * unit * item
            out = dest[run.at * unit:(run.at + run.count) * unit]
            if src_dtype == dest.dtype:
                read_into(run.source, offset, out, handle)
                continue
            step = max(1, _CHUNK_BYTES // (unit * item)) * unit
            scratch = torch.empty(min(step, out.numel()), dtype=src_dtype)
            for a in range(0, out.numel(), step):
                part = out[a:a + step]
                buf = scratch[:part.numel()]
                read_into(run.source, offset + a * item, buf, handle)
                part.copy_(buf)
    finally:
        if handle is not None:
            handle.close()


def load_in_place(path: Path, config: Any, dtype: torch.dtype):
    """The model of checkpoint ``path``, each stored row read once into place; ``None`` when the
    checkpoint's conversion cannot be replayed exactly (the caller then uses ``from_pretrained``).

    Raises:
        CheckpointError: a shard that ends early.
    """
    files = CheckpointFiles(Path(path))
    if len(files.tensors) >= 1 << 31 or any(_rows(i) >= _ROW_MASK for i in files.tensors.values()):
        return None                    # the codes would not fit their 32 bits
    from transformers.core_model_loading import dot_natural_key

    names = sorted(files.tensors, key=dot_natural_key)
    try:
        model = empty_model(config, dtype)   # keep-in-fp32 modules are float32 here, as from_pretrained makes them
        plan = _plan(model, files, names)
        runs = None if plan is None else _runs(model, files, names, plan)
    except Exception:   # noqa: BLE001 - a conversion this replay cannot follow: from_pretrained can
        return None
    if runs is None:
        return None
    dests = _materialise(model, plan)
    model.tie_weights()                # tied parameters now share the planned storage
    if any(t.device.type == "meta" for t in model.state_dict(keep_vars=True).values()):
        return None                    # a parameter the checkpoint does not hold: from_pretrained initialises it
    _execute(runs, dests)              # only now read: a fallback above has read nothing
    model.config.name_or_path = str(path)
    _generation_config(model, Path(path))
    return model.eval()


def _generation_config(model, path: Path) -> None:
    """The checkpoint's generation config, as ``from_pretrained`` attaches it (when there is one)."""
    if not (path / "generation_config.json").is_file() or not model.can_generate():
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        pass                          # from_pretrained also keeps the config-derived one then

