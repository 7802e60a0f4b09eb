"""`moeharden lock`: put the selective fine-tuning policy into the release and sign it.

``lock`` writes the checkpoint with the policy in (a) every safetensors file's metadata (shards
rewritten by streaming: header first, tensor bytes copied file to file), (b) ``config.json``
under ``moeharden``, (c) the model card ``README.md`` (YAML front matter and a readable
section), and (d) ``moeharden-manifest.json`` (tool version, policy, sha256 of every tensor, a
fingerprint of every expert; :class:`ManifestDocument`). Then the whole directory, manifest
included, is signed with OpenSSF model signing (``model.sig``). The output is written atomically.
:func:`lock_checkpoint` takes one :class:`LockSettings`, checked when it is built. Checking a locked
copy is :mod:`moeharden.audit.integrity`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml
from pydantic import Field

from moeharden import __version__
from moeharden.errors import ConfigFileError, InputError, UsageError
from moeharden.io.records import Record, ToolInfo

MANIFEST_NAME = "moeharden-manifest.json"
SCHEMA = "moeharden.manifest/1"
FINGERPRINT_METHOD = "P_a W r_b gaussian sketch"


class ManifestSource(Record):
    """What a release was locked from."""

    path: str = Field(description="The checkpoint passed to `lock` (local path or Hub id).")


class ManifestModel(Record):
    """The locked model's identity in a manifest."""

    family: str = Field(description="Registry family name.")
    model_type: str = Field(description="`config.json`'s `model_type`.")
    num_experts: int = Field(ge=1, description="Routed experts per MoE layer.")
    moe_layers: list[int] = Field(description="Decoder-layer indices of the MoE layers.")
    config_sha256: str = Field(description="sha256 of `config.json` in canonical form.")


class ManifestPolicy(Record):
    """The selective fine-tuning policy as written into the release."""

    version: int = Field(description="Policy format version.")
    license: str = Field(description="License of the release.")
    permitted_uses: str = Field(description="What licensees may do.")
    contact: str = Field(description="Who to ask.")
    groups: dict[str, str] = Field(description="`{parameter group: frozen | trainable | lora(max_rank: N)}`.")


class TensorEntry(Record):
    """One tensor of the release."""

    file: str = Field(description="The safetensors file holding it.")
    dtype: str = Field(description="Its dtype as stored.")
    shape: list[int] = Field(description="Its shape.")
    sha256: str = Field(description="sha256 of its bytes.")


class Fingerprints(Record):
    """Expert fingerprints, to recognise a release's experts in a derivative."""

    method: str = Field(description="How the sketches are computed.")
    dim: int = Field(ge=1, description="Sketch length.")
    experts: dict[str, dict[str, list[float]]] = Field(description="`{layer: {expert: unit-norm sketch}}`.")


class ManifestDocument(Record):
    """`moeharden-manifest.json`: every tensor's hash, expert fingerprints and the policy of a locked release."""

    SCHEMA: ClassVar[str] = SCHEMA
    schema_id: Literal["moeharden.manifest/1"] = Field(SCHEMA, alias="schema", description="`moeharden.manifest/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    model: ManifestModel = Field(description="The locked model's identity.")
    policy: ManifestPolicy | None = Field(description="The policy, or null.")
    tensors: dict[str, TensorEntry] = Field(description="`{tensor name: entry}`, sorted by name.")
    fingerprints: Fingerprints = Field(description="Expert fingerprints.")
    source: ManifestSource | None = Field(None, description="What the release was locked from.")


@dataclass(frozen=True)
class LockSettings:
    """Everything ``lock`` needs besides the checkpoint; the options are checked when this is built.

    Attributes:
        out: output directory (replaced only under :func:`moeharden.io.outputs.check_output_dir`'s rules).
        policy: the policy YAML.
        key: private key from ``moeharden keygen`` (``None`` with ``keyless``).
        keyless: sign with sigstore instead of a key.
        trust_remote_code: also download and carry the checkpoint's custom code (``*.py``).
    Raises:
        UsageError: no policy; neither or both of ``key`` and ``keyless``.
        InputError: a key that is not a file. (The policy's contents are checked by
            :func:`lock_checkpoint` first, before anything is written.)
    """

    out: Path
    policy: Path | None
    key: Path | None = None
    keyless: bool = False
    trust_remote_code: bool = False
    self_check: bool = True      # verify the family adapter on a tiny random model first

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.policy is None:
            raise UsageError("lock needs --policy P.yaml.", hint="See src/moeharden/data/policy-example.yaml.")
        if self.key is None and not self.keyless:
            raise UsageError("lock needs --key KEYDIR/moeharden.key (from `moeharden keygen`) or --keyless.")
        if self.key is not None and self.keyless:
            raise UsageError("Give either --key or --keyless, not both.")
        if self.key is not None and not Path(self.key).is_file():
            raise InputError(f"Private key {self.key} does not exist.",
                             hint="Create one with `moeharden keygen --out KEYDIR`.")


def _front_matter(text: str) -> tuple[dict, str]:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            from moeharden.errors import InputError
            from moeharden.io.files import load_yaml_data

            try:     # bounded: a README's front matter is the checkpoint's (untrusted) text
                meta = load_yaml_data(text[4:end], where="the model card's front matter") or {}
            except InputError:
                meta = {}
            return (meta if isinstance(meta, dict) else {}), text[end + 4:].lstrip("\n")
    return {}, text


def model_card(existing: str, policy, name: str) -> str:
    """The model card with the policy in its YAML front matter and a readable section."""
    meta, body = _front_matter(existing)
    meta["license"] = policy.license
    meta.setdefault("tags", [])
    if "moeharden-locked" not in meta["tags"]:
        meta["tags"] = list(meta["tags"]) + ["moeharden-locked"]
    meta["moeharden"] = {"version": __version__, "policy": policy.to_json()}
    rows = "\n".join(f"| {g} | {r} |" for g, r in policy.to_json()["groups"].items())
    section = (f"## Selective fine-tuning policy (moeharden)\n\n"
               f"This release of **{name}** is locked by moeharden {__version__}. Licensees may adapt only what "
               f"the policy allows; every tensor is listed with its sha256 in `{MANIFEST_NAME}`, and the "
               f"directory is signed (`model.sig`, OpenSSF model signing).\n\n"
               f"| parameter group | licensees may |\n|---|---|\n{rows}\n\n"
               f"- **License:** {policy.license}\n- **Permitted uses:** {policy.permitted_uses}\n"
               f"- **Contact:** {policy.contact}\n\n"
               "Check a copy with `moeharden verify DIR --pubkey moeharden.pub`; enforce the policy while "
               "fine-tuning with `moeharden.defend.policy.apply(model, policy)`.\n")
    marker = "## Selective fine-tuning policy (moeharden)"
    if marker in body:
        body = body[:body.index(marker)].rstrip() + "\n"
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + (body.rstrip() + "\n\n" if body.strip() else "") + section


def build_manifest(path: Path, policy, *, source: str | None = None) -> ManifestDocument:
    """The manifest of a checkpoint directory (tensor hashes, expert fingerprints, policy).

    Args:
        path: a local checkpoint directory (its safetensors are read one shard at a time).
        policy: the :class:`moeharden.defend.policy.Policy` locked in, or ``None``.
        source: what the release was locked from (recorded as ``source.path``), or ``None``.
    Returns:
        the :class:`ManifestDocument`.
    Raises:
        CheckpointError, UnsupportedModelError.
    """
    from moeharden.defend.manifest import SKETCH_DIM, fingerprints, tensor_sha256
    from moeharden.io.records import tool_info
    from moeharden.model.checkpoint import checkpoint_layout, config_hash

    cfg, spec, E, files, roles, layers = checkpoint_layout(path)
    tensors = {name: TensorEntry(file=files.tensors[name].file.name, dtype=files.tensors[name].dtype,
                                 shape=list(files.tensors[name].shape), sha256=h)
               for name, h in tensor_sha256(files)}
    return ManifestDocument(
        tool=tool_info(),
        model=ManifestModel(family=spec.name, model_type=cfg.model_type, num_experts=E, moe_layers=layers,
                            config_sha256=config_hash(path)),
        policy=ManifestPolicy(**policy.to_json()) if policy is not None else None,
        tensors=dict(sorted(tensors.items())),
        fingerprints=Fingerprints(method=FINGERPRINT_METHOD, dim=SKETCH_DIM,
                                  experts=fingerprints(files, spec, cfg, roles)),
        source=ManifestSource(path=source) if source is not None else None)


@dataclass
class LockResult:
    out: str
    manifest: str
    signature: str
    tensors: int
    policy: dict

    def to_dict(self) -> dict:
        return asdict(self)


def lock_checkpoint(ckpt: str, settings: LockSettings) -> LockResult:
    """Lock ``ckpt`` with ``settings.policy`` into ``settings.out`` (see the module docstring), atomically.

    Args:
        ckpt: checkpoint directory or Hub repo id.
        settings: output, policy, signing key and trust (:class:`LockSettings`).
    Returns:
        :class:`LockResult`.

    Raises:
        ConfigFileError: invalid policy, or a policy group that matches no tensor.
        InputError: an output directory that may not be replaced; CheckpointError; UnsupportedModelError.
    """
    from moeharden.defend.policy import load_policy
    from moeharden.io.outputs import check_output_dir
    from moeharden.model.adapter_check import AdapterCheck
    from moeharden.model.checkpoint import checkpoint_layout, resolve_checkpoint

    out, trust_remote_code = settings.out, settings.trust_remote_code
    pol = load_policy(settings.policy)
    inputs = [p for p in (ckpt, settings.policy, settings.key) if p is not None]
    check_output_dir(out, kind="lock", inputs=inputs)
    src = resolve_checkpoint(ckpt, trust_remote_code=trust_remote_code)
    cfg, spec, E, files, roles, layers = checkpoint_layout(src)
    with AdapterCheck(cfg, enabled=settings.self_check) as check:   # beside the work (model/adapter_check.py)
        manifest, pol = _lock_into(src, out, settings, cfg, spec, files, roles, pol, check, ckpt)
    return LockResult(str(out), str(out / MANIFEST_NAME), str(out / "model.sig"), len(manifest.tensors),
                      pol.to_json())


def _lock_into(src, out, settings, cfg, spec, files, roles, pol, check, ckpt):
    """The locked copy of ``src`` built in a temporary sibling of ``out`` and published once
    ``check`` (the family self-check) has passed."""
    from moeharden.defend.manifest import disk_groups
    from moeharden.defend.signing import SIGNATURE_NAME, sign_directory
    from moeharden.io.outputs import atomic_output_dir, record_files
    from moeharden.io.shards import INDEX_NAME, PlannedTensor, write_streaming_shards
    from moeharden.io.sidefiles import copy_side_files

    trust_remote_code = settings.trust_remote_code
    groups = disk_groups(src, files, spec, cfg, roles)
    present = set(groups.values())
    empty = [g for g in pol.groups if g not in present]
    if empty:
        raise ConfigFileError(f"Policy group(s) {', '.join(empty)} match no parameter of this {spec.name} checkpoint "
                              f"(its groups: {', '.join(sorted(present))}).",
                              hint="Remove them from the policy, or check that the policy is for this model.")
    meta = {"moeharden_version": __version__, "moeharden_policy": json.dumps(pol.to_json(), sort_keys=True)}
    with atomic_output_dir(out, kind="lock", inputs=[src]) as tmp:
        for shard in files.shards:                   # same shards and names, new metadata
            infos = sorted((i for i in files.tensors.values() if i.file == shard), key=lambda i: i.start)
            plan = [PlannedTensor(i.name, i.dtype, i.shape, i.end - i.start) for i in infos]
            with open(shard, "rb") as fh:
                ranges = {i.name: [(fh, i.start, i.end - i.start)] for i in infos}
                written = write_streaming_shards(tmp, plan, lambda p, r=ranges: r[p.name],
                                                 max_shard_bytes=1 << 62, metadata=meta)
            written[0].rename(tmp / shard.name)
        if (src / INDEX_NAME).exists():             # same shard names, so the source index still holds
            (tmp / INDEX_NAME).write_bytes((src / INDEX_NAME).read_bytes())
        # the source's manifest and signature are never carried (SIDE_FILE_SKIP); its model card is,
        # and is then rewritten from the copy (read from tmp: a symlink leaving the checkpoint was not copied)
        copy_side_files(src, tmp, trust_remote_code=trust_remote_code)
        config = json.loads((src / "config.json").read_text())
        config["moeharden"] = {**(config.get("moeharden") or {}), "version": __version__, "policy": pol.to_json()}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        readme = (tmp / "README.md").read_text() if (tmp / "README.md").exists() else ""
        (tmp / "README.md").write_text(model_card(readme, pol, Path(str(ckpt)).name))
        manifest = build_manifest(tmp, pol, source=str(ckpt))
        (tmp / MANIFEST_NAME).write_text(manifest.to_file_text(indent=1))
        record_files(tmp, also=(SIGNATURE_NAME,))     # the marker lists what lock wrote, before it is signed
        sign_directory(tmp, key=settings.key, keyless=settings.keyless)
        check.wait()                     # before the output is published: a failure discards it
    return manifest, pol


