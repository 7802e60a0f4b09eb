"""The integrity half of `moeharden verify`: a checkpoint against its signed manifest.

``verify_integrity`` checks the signature and every tensor hash and names each changed, missing
or extra tensor; for a suspect derivative (fewer experts, fine-tuned) it matches each of its
experts to the original's by fingerprint and reports the kept and removed experts per layer,
and which changes break the policy. The result is an
:class:`~moeharden.audit.verdict.IntegrityReport`; ``ok`` is its verdict (the caller decides the
exit code).
"""

from __future__ import annotations

import os
from pathlib import Path

from moeharden.audit.documents import load_document
from moeharden.audit.records import ManifestDocument
from moeharden.audit.verdict import Derivation, IntegrityReport, SignatureCheck, TensorCheck
from moeharden.errors import CheckpointError, InputError, IntegrityError, MoehardenError


def _layout(path: Path):
    from moeharden.model.checkpoint import checkpoint_layout

    return checkpoint_layout(path)


def _load_manifest(path: Path, *, given: bool = False) -> ManifestDocument:
    """The manifest at ``path``; ``given``: the user named it (``--manifest``), so a path that is not a
    readable document file (a FIFO, a device, a directory) is an input error, not a tamper."""
    if not os.path.lexists(path):
        raise (InputError if given else IntegrityError)(
            f"No moeharden manifest at {path}.",
            hint="Pass --manifest of the original release, or lock the checkpoint first.")
    return load_document(path, ManifestDocument, error=IntegrityError,
                         file_error=InputError if given else IntegrityError)


def verify_integrity(ckpt: Path, *, pubkey: Path | None, manifest: Path | None = None) -> IntegrityReport:
    """Check a checkpoint against its (or the original release's) signed manifest.

    Args:
        ckpt: the checkpoint directory.
        pubkey: the release's public key (``KEYDIR/moeharden.pub``).
        manifest: the manifest to check against (default: ``ckpt``'s own).
    Returns:
        what was found; ``ok`` is False when anything failed.
    Raises:
        CheckpointError: ``ckpt`` is not a directory (an input error, not a tamper).
        IntegrityError: no manifest, or one that is not a valid ``moeharden.manifest/1`` document.
    """
    from moeharden.defend.lock import MANIFEST_NAME
    from moeharden.defend.manifest import fingerprints, match_experts, tensor_sha256
    from moeharden.defend.signing import SIGNATURE_NAME, verify_directory
    from moeharden.io.shards import CheckpointFiles

    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a directory." if ckpt.exists() else f"{ckpt} does not exist.",
                              hint="Pass the released checkpoint directory.")
    man_path = Path(manifest) if manifest is not None else ckpt / MANIFEST_NAME
    man = _load_manifest(man_path, given=manifest is not None)
    res = IntegrityReport(checkpoint=str(ckpt), manifest=str(man_path))
    # 1. the signature: over the checkpoint itself when it carries one, else over the original
    #    release the manifest came from (it must be intact for the manifest to be trusted)
    signed_dir = ckpt if (ckpt / SIGNATURE_NAME).exists() else man_path.parent
    try:
        verify_directory(signed_dir, pubkey=pubkey)
        res.signature = SignatureCheck(checked=str(signed_dir), ok=True)
    except IntegrityError as err:
        res.signature = SignatureCheck(checked=str(signed_dir), ok=False, error=err.message)
        res.problems.append(f"signature: {err.message}")
    # 2. tensor hashes
    expected = man.tensors
    try:
        files = CheckpointFiles(ckpt)
        actual = dict(tensor_sha256(files))
    except (CheckpointError, EOFError) as err:
        msg = getattr(err, "message", str(err))
        bad_file = next((f for f in {t.file for t in expected.values()} if f in msg), None)
        names = sorted(n for n, t in expected.items() if t.file == bad_file) if bad_file else sorted(expected)
        res.tensors = TensorCheck(checked=0, unreadable=msg, changed=names, missing=[], extra=[])
        res.problems.append(f"unreadable weights ({msg}); tensors that cannot be checked: {', '.join(names[:8])}"
                            + (" …" if len(names) > 8 else ""))
        res.ok = False
        return res
    changed = sorted(n for n in expected if n in actual and actual[n] != expected[n].sha256)
    missing = sorted(n for n in expected if n not in actual)
    extra = sorted(n for n in actual if n not in expected)
    res.tensors = TensorCheck(checked=len(actual), changed=changed, missing=missing, extra=extra)
    derived = bool(missing or extra)
    renamed = _renamed(missing, extra, expected, actual)
    if renamed:
        res.problems.append("tensor(s) renamed: " + ", ".join(f"{a} → {b}" for a, b in renamed[:8])
                            + (" …" if len(renamed) > 8 else ""))
    if derived:
        res.problems.append(f"structure differs from the release: {len(missing)} tensor(s) missing"
                            + (f" ({_names(missing)})" if missing else "")
                            + f", {len(extra)} extra" + (f" ({_names(extra)})" if extra else ""))
        # 3. a derivative: match its experts to the original's by fingerprint. A tampered layout
        #    (an expert id the config does not have) is a failed check, not an unsupported model.
        try:
            cfg, spec, E, files, roles, layers = _layout(ckpt)
            res.derivation = Derivation.model_validate(
                {"layers": match_experts(man.fingerprints.experts, fingerprints(files, spec, cfg, roles)),
                 "num_experts": {"original": man.model.num_experts, "suspect": E}})
        except MoehardenError as err:
            res.problems.append(f"the tensors do not form a loadable model of the release's family ({err.message})")
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as err:   # a hostile manifest's fingerprints
            res.problems.append(f"the manifest's expert fingerprints cannot be compared ({type(err).__name__})")
    if changed:
        res.problems.append(f"{len(changed)} tensor(s) changed: {_names(changed)}")
    groups = {}
    if changed:
        from moeharden.defend.manifest import disk_groups

        try:
            cfg, spec, _, files, roles, _ = _layout(ckpt)
            groups = disk_groups(ckpt, files, spec, cfg, roles)
        except MoehardenError as err:
            res.problems.append(f"the tensors do not form a loadable model of the release's family ({err.message})")
    res.policy_violations = _policy_violations(man, changed, groups, derived, res.derivation)
    res.ok = not res.problems
    return res


def _names(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (" …" if len(names) > n else "")


def _renamed(missing: list[str], extra: list[str], expected, actual: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs ``(old name, new name)`` of a missing and an extra tensor with the same bytes (a rename)."""
    by_hash: dict[str, list[str]] = {}
    for name in extra:
        by_hash.setdefault(actual[name], []).append(name)
    pairs = []
    for name in missing:
        cands = by_hash.get(expected[name].sha256)
        if cands:
            pairs.append((name, cands.pop(0)))
    return pairs


def _policy_violations(man: ManifestDocument, changed: list[str], groups: dict[str, str], derived: bool,
                       derivation: Derivation | None) -> list[str]:
    """Which changes the release's policy forbids (tensor groups resolved through the registry)."""
    rules = man.policy.groups if man.policy is not None else {}
    out = []
    if derived and rules.get("experts", "frozen") != "trainable":
        removed = sum(len(v.removed) for v in (derivation.layers.values() if derivation else ()))
        if removed:
            out.append(f"experts removed ({removed} across layers): the policy keeps experts {rules.get('experts', 'frozen')}")
    for n in changed:
        group = groups.get(n, "other")
        if rules.get(group, "frozen") == "frozen":
            out.append(f"{n} changed, but the policy keeps {group} frozen")
    return out
