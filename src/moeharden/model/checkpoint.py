"""Finding, checking and loading checkpoints — safetensors only, remote code only when asked.

A checkpoint is a local directory or a Hugging Face Hub repo id. Hub downloads are limited to
config, safetensors and tokenizer files. Untrusted checkpoints are data: pickle weights are
refused, headers are checked before anything is loaded, and ``trust_remote_code`` is off unless
the user passes the flag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeharden.errors import CheckpointError, NetworkError
from moeharden.model.config import load_config

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.yaml", "*.jsonl", "tasks/*",
                "README.md"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_checkpoint(ckpt: str | Path, *, revision: str | None = None, trust_remote_code: bool = False,
                       validate: bool = True) -> Path:
    """A local directory for ``ckpt`` (downloading a Hub repo id if needed), validated.

    Args:
        ckpt: an existing local directory, or a Hub repo id ``owner/name``.
        revision: Hub branch, tag or commit (Hub ids only).
        trust_remote_code: also download the repo's ``*.py`` files (only when the user asked for it).
        validate: run :func:`~moeharden.model.validate.validate_checkpoint` (``verify`` checks integrity first, so that a
            tampered release is an integrity failure, then validates).
    Returns:
        The checkpoint directory (for a Hub id, its snapshot in the local Hub cache).
    Raises:
        CheckpointError: missing directory/config, pickle-only or corrupt weights, unknown repo.
        NetworkError: a Hub id while offline or with the Hub unreachable.
    """
    path = Path(ckpt).expanduser()
    if path.exists():
        if validate:
            from moeharden.model.validate import validate_checkpoint

            validate_checkpoint(path)
        return path
    text = str(ckpt)
    if not _REPO_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointError(f"Checkpoint {text!r} is neither an existing directory nor a Hub repo id (owner/name).",
                              hint="Check the path.")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError:  # pragma: no cover - dependency
        raise CheckpointError("huggingface_hub is not installed.") from None
    try:
        local = Path(snapshot_download(
            text, revision=revision, allow_patterns=HUB_PATTERNS + (["*.py"] if trust_remote_code else [])))
    except (OfflineModeIsEnabled, LocalEntryNotFoundError) as err:
        raise NetworkError(
            f"There is no local directory {text!r}, and it cannot be downloaded from the Hugging Face Hub: "
            f"no network, or offline mode is on ({type(err).__name__}).",
            hint="Download it where there is network (hf download REPO --local-dir DIR) and pass the directory.") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"Repository {text!r} was not found on the Hub (or you lack access).") from None
    except Exception as err:  # network errors of requests/httpx
        raise NetworkError(f"Cannot reach the Hugging Face Hub to download {text!r}: {type(err).__name__}.",
                           hint="Check the network or pass a local directory.") from None
    if validate:
        from moeharden.model.validate import validate_checkpoint

        validate_checkpoint(local)
    return local


def load_model(path: Path, *, dtype: Any = None, device_map: Any = None, trust_remote_code: bool = False,
               in_place: bool = True):
    """Load a causal LM from safetensors: on GPU(s) via accelerate's device_map when CUDA is there, else CPU.

    The model family is checked against the registry first, so a dense or unsupported model fails
    before any weights are read. On CPU (no device map, no remote code) every stored tensor is read
    once straight into its place (:func:`moeharden.model.inplace.load_in_place`: peak memory about
    the weights, where ``from_pretrained`` holds mapped pages beside fused copies);
    ``from_pretrained`` loads whatever that loader cannot place exactly, and everything on GPUs.

    Args:
        in_place: ``False`` always uses ``from_pretrained`` (the benches' reference).

    Raises:
        CheckpointError, UnsupportedModelError.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from moeharden.model.registry import spec_for_config

    config = load_config(path, trust_remote_code=trust_remote_code)
    in_place = in_place and spec_for_config(config).load_in_place
    if in_place and device_map is None and not trust_remote_code and not torch.cuda.is_available():
        from moeharden.model.inplace import load_in_place

        model = load_in_place(Path(path), config, dtype or torch.float32)
        if model is not None:
            return model
    if device_map is None and torch.cuda.is_available():
        from moeharden.io.ranks import current

        # one process: one copy over every visible GPU; under `accelerate launch`: a copy per process,
        # on the process's own GPU (LOCAL_RANK)
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)
        device_map = "auto" if current().size == 1 else {"": local % torch.cuda.device_count()}
    if dtype is None:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"Could not load the model in {path}: {str(err).splitlines()[0]}") from None
    return model.eval()


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars inside the block ("Writing model shards", "Loading weights"):
    moeharden shows its own progress, and a bar from a save beside it (the self-check's child, the
    demo's entangle) was interleaved with it. The previous setting is restored afterwards."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            import warnings

            with warnings.catch_warnings():     # huggingface_hub warns when HF_HUB_DISABLE_PROGRESS_BARS
                warnings.simplefilter("ignore", UserWarning)        # is set (its own bars stay off)
                hf_logging.enable_progress_bar()


def load_tokenizer(path: Path, *, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, with a pad token (eos when it has none).

    Raises:
        CheckpointError: no loadable tokenizer files.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"Could not load a tokenizer from {path}: {str(err).splitlines()[0]}",
                              hint="The checkpoint needs its tokenizer files (tokenizer.json etc.).") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def checkpoint_digest(path: Path) -> str:
    """sha256 over every safetensors file's name, size and header (not the tensor data: cheap).

    Headers hold every tensor's dtype, shape and byte offsets, and with the sizes this identifies
    a checkpoint's layout; the signed manifest of ``lock`` hashes the data itself.
    """
    from moeharden.io.shards import CheckpointFiles

    h = hashlib.sha256()
    for shard in CheckpointFiles(Path(path)).shards:
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = f.read(n)
        h.update(shard.name.encode())
        h.update(str(shard.stat().st_size).encode())
        h.update(header)
    return h.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over every tensor of a loaded model's state, in order: each name, dtype, shape and
    its bytes (the weights a computation starts from, not a file's layout)."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))      # a view: no copy of the tensor
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 over a tokenizer's vocabulary, padding side and pad token id."""
    return hashlib.sha256(json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.padding_side,
                                      tokenizer.pad_token_id]).encode()).hexdigest()


def run_inputs_sha256(model, tokenizer, tasks, **more) -> str:
    """sha256 of what a run's result depends on: the weights, the tokenizer, every task's examples
    (``examples_sha256``), the versions of moeharden, torch and transformers, and ``more`` (JSON data:
    the plan, keep-sets, recipe...). A run resumes saved work only under the same value."""
    import torch
    import transformers

    from moeharden import __version__

    return hashlib.sha256(json.dumps({
        "versions": [__version__, torch.__version__, transformers.__version__],
        "tasks": [[t.name, t.examples_sha256()] for t in tasks],
        "tokenizer": tokenizer_sha256(tokenizer), "weights": weights_sha256(model), **more,
    }, sort_keys=True).encode()).hexdigest()


def config_hash(path: Path) -> str:
    """sha256 of config.json's canonical JSON form (key order and whitespace do not count)."""
    data = json.loads((Path(path) / "config.json").read_text())
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def checkpoint_layout(src: Path):
    """What every streaming rewrite of a checkpoint needs to know, without loading weights.

    Returns:
        ``(config, spec, num_experts, files, roles, moe_layers)``: the transformers config, the
        family's registry spec, the routed-expert count, the :class:`~moeharden.io.shards.CheckpointFiles`
        index, ``{tensor name: role or None}`` and the sorted indices of the MoE layers.
    Raises:
        CheckpointError, UnsupportedModelError.
    """
    from moeharden.io.shards import CheckpointFiles
    from moeharden.model.disk import classify_tensors
    from moeharden.model.registry import num_experts, spec_for_config
    from moeharden.model.validate import validate_checkpoint

    validate_checkpoint(Path(src))   # config present, safetensors only, headers sound, experts match (cheap)
    cfg = load_config(src)
    spec = spec_for_config(cfg)
    E = num_experts(cfg)
    files = CheckpointFiles(src)
    roles = classify_tensors(spec, cfg, {name: info.shape for name, info in files.tensors.items()})
    layers = sorted({r.layer for r in roles.values() if r is not None and r.kind == "expert"})
    return cfg, spec, E, files, roles, layers
