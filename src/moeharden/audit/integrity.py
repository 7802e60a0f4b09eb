"""The integrity half of `moeharden verify`: a checkpoint against its signed manifest.

``verify_integrity`` checks the signature and every tensor hash and names each changed, missing
or extra tensor; for a suspect derivative (fewer experts, fine-tuned) it matches each of its
experts to the original's by fingerprint and reports the kept and removed experts per layer,
and which changes break the policy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from moeharden.defend.lock import MANIFEST_NAME, SCHEMA
from moeharden.errors import CheckpointError, IntegrityError


def _layout(path: Path):
    from moeharden.model.checkpoint import checkpoint_layout

    return checkpoint_layout(path)


@dataclass
class IntegrityResult:
    """Everything the integrity check found; ``ok`` is False when anything failed."""

    checkpoint: str
    manifest: str
    ok: bool = True
    signature: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)
    derivation: dict | None = None
    policy_violations: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _load_manifest(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise IntegrityError(f"No moeharden manifest at {path}.",
                             hint="Pass --manifest of the original release, or lock the checkpoint first.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise IntegrityError(f"The manifest {path} is unreadable: {err}.") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise IntegrityError(f"{path} is not a moeharden manifest (schema {SCHEMA}).")
    return data


def verify_integrity(ckpt: Path, *, pubkey: Path | None, manifest: Path | None = None,
                     raise_on_fail: bool = True) -> IntegrityResult:
    """Check a checkpoint against its (or the original release's) signed manifest.

    Raises:
        IntegrityError: with the :class:`IntegrityResult` as ``.result``, when anything fails
            (if ``raise_on_fail``).
    """
    from moeharden.defend.manifest import fingerprints, match_experts, tensor_sha256
    from moeharden.defend.signing import SIGNATURE_NAME, verify_directory
    from moeharden.io.shards import CheckpointFiles

    ckpt = Path(ckpt)
    man_path = Path(manifest) if manifest is not None else ckpt / MANIFEST_NAME
    man = _load_manifest(man_path)
    res = IntegrityResult(str(ckpt), str(man_path))
    # 1. the signature: over the checkpoint itself when it carries one, else over the original
    #    release the manifest came from (it must be intact for the manifest to be trusted)
    signed_dir = ckpt if (ckpt / SIGNATURE_NAME).exists() else man_path.parent
    try:
        verify_directory(signed_dir, pubkey=pubkey)
        res.signature = {"checked": str(signed_dir), "ok": True}
    except IntegrityError as err:
        res.signature = {"checked": str(signed_dir), "ok": False, "error": err.message}
        res.problems.append(f"signature: {err.message}")
    # 2. tensor hashes
    expected = man["tensors"]
    try:
        files = CheckpointFiles(ckpt)
        actual = dict(tensor_sha256(files))
    except (CheckpointError, EOFError) as err:
        msg = getattr(err, "message", str(err))
        bad_file = next((f for f in {t["file"] for t in expected.values()} if f in msg), None)
        names = sorted(n for n, t in expected.items() if t["file"] == bad_file) if bad_file else sorted(expected)
        res.tensors = {"checked": 0, "unreadable": msg, "changed": names, "missing": [], "extra": []}
        res.problems.append(f"unreadable weights ({msg}); tensors that cannot be checked: {', '.join(names[:8])}"
                            + (" …" if len(names) > 8 else ""))
        res.ok = False
        return _finish(res, raise_on_fail)
    changed = sorted(n for n in expected if n in actual and actual[n] != expected[n]["sha256"])
    missing = sorted(n for n in expected if n not in actual)
    extra = sorted(n for n in actual if n not in expected)
    res.tensors = {"checked": len(actual), "changed": changed, "missing": missing, "extra": extra}
    derived = bool(missing or extra)
    if derived:
        # 3. a derivative: match its experts to the original's by fingerprint
        cfg, spec, E, files, roles, layers = _layout(ckpt)
        res.derivation = {"layers": match_experts(man["fingerprints"]["experts"],
                                                  fingerprints(files, spec, cfg, roles)),
                          "num_experts": {"original": man["model"]["num_experts"], "suspect": E}}
        res.problems.append(f"structure differs from the release: {len(missing)} tensor(s) missing, "
                            f"{len(extra)} extra (a derivative; see derivation)")
    if changed:
        res.problems.append(f"{len(changed)} tensor(s) changed: {', '.join(changed[:8])}" + (" …" if len(changed) > 8 else ""))
    groups = {}
    if changed:
        from moeharden.defend.manifest import disk_groups

        cfg, spec, _, files, roles, _ = _layout(ckpt)
        groups = disk_groups(ckpt, files, spec, cfg, roles)
    res.policy_violations = _policy_violations(man, changed, groups, derived, res.derivation)
    res.ok = not res.problems
    return _finish(res, raise_on_fail)


def _policy_violations(man: dict, changed: list[str], groups: dict[str, str], derived: bool,
                       derivation: dict | None) -> list[str]:
    """Which changes the release's policy forbids (tensor groups resolved through the registry)."""
    pol = man.get("policy") or {}
    rules = pol.get("groups", {})
    out = []
    if derived and rules.get("experts", "frozen") != "trainable":
        removed = sum(len(v["removed"]) for v in (derivation or {}).get("layers", {}).values())
        if removed:
            out.append(f"experts removed ({removed} across layers): the policy keeps experts {rules.get('experts', 'frozen')}")
    for n in changed:
        group = groups.get(n, "other")
        if rules.get(group, "frozen") == "frozen":
            out.append(f"{n} changed, but the policy keeps {group} frozen")
    return out


def _finish(res: IntegrityResult, raise_on_fail: bool) -> IntegrityResult:
    if not res.ok and raise_on_fail:
        err = IntegrityError("; ".join(res.problems) + ".", hint="The checkpoint is not the signed release.")
        err.result = res          # the CLI prints / emits the details before exiting 4
        raise err
    return res
