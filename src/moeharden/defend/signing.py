"""Signing with the ecosystem's standard: OpenSSF model signing (``model-signing``, sigstore bundles).

Offline, bring-your-own-key: an elliptic-curve (P-256) key pair from :func:`keygen`. Online,
sigstore keyless signing is available with ``keyless=True``. The signature (``model.sig``) lies
beside the weights and covers every file of the directory — the manifest, the ``.moeharden-output``
marker, ``.git*`` files included — except itself, so any added, removed or changed file is a tamper.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from moeharden.errors import InputError, IntegrityError, NetworkError
from moeharden.io.files import MAX_DOCUMENT, read_small_bytes

SIGNATURE_NAME = "model.sig"
PRIVATE_NAME, PUBLIC_NAME = "moeharden.key", "moeharden.pub"


def _ms():
    try:
        import model_signing
        from model_signing import hashing, signing, verifying
    except ImportError:
        raise InputError("Signing needs the model-signing package.",
                         hint='pip install "moeharden[sign]" (model-signing>=1.1).') from None
    return model_signing, hashing, signing, verifying


def keygen(out: Path) -> dict[str, str]:
    """Write ``moeharden.key`` (PEM, P-256 private key, mode 0600) and ``moeharden.pub`` into ``out``.

    Raises:
        InputError: ``out`` is a file, or already holds a key (never overwritten).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a directory; keygen writes a key pair into a directory.",
                         hint="Choose a new or existing directory for --out.")
    if os.path.lexists(out / PRIVATE_NAME) or os.path.lexists(out / PUBLIC_NAME):   # a dangling link counts
        raise InputError(f"{out} already holds a moeharden key pair (or a link where one goes); refusing to "
                         "overwrite it.", hint="Choose another --out directory.")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:                       # O_EXCL: never through a link (even a dangling one) nor over a file
        for name, data, mode in ((PRIVATE_NAME, priv, 0o600), (PUBLIC_NAME, pub, 0o644)):
            fd = os.open(out / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
            written.append(out / name)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
    except BaseException:      # never half a key pair: remove what this call wrote
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return {"private_key": str(out / PRIVATE_NAME), "public_key": str(out / PUBLIC_NAME)}


def _hashing_config(hashing):
    # every file but the signature itself is covered: the output marker (written before signing),
    # and .git/ and .gitattributes too, so a file added to a release is a tamper, not "ignored"
    return hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME], ignore_git_paths=False)


def sign_directory(model_dir: Path, *, key: Path | None = None, keyless: bool = False) -> Path:
    """Sign every file of ``model_dir`` into ``model_dir/model.sig``.

    Raises:
        InputError: no key given (and not keyless), or an unreadable key.
        NetworkError: keyless signing without network.
    """
    _, hashing, signing, _ = _ms()
    cfg = signing.Config().set_hashing_config(_hashing_config(hashing))
    if keyless:
        cfg.use_sigstore_signer()
    elif key is None:
        raise InputError("Signing needs --key (a private key from `moeharden lock keygen`) or --keyless.")
    else:
        if not Path(key).is_file():
            raise InputError(f"Private key {key} does not exist.")
        try:
            cfg.use_elliptic_key_signer(private_key=Path(key))
        except (ValueError, TypeError) as err:
            raise InputError(f"Cannot use {key} as a signing key: {err}.",
                             hint="Use the moeharden.key written by `moeharden lock keygen`.") from None
    sig = Path(model_dir) / SIGNATURE_NAME
    try:
        cfg.sign(Path(model_dir), sig)
    except OSError as err:
        if keyless:
            raise NetworkError(f"Sigstore keyless signing needs the network: {err}.") from None
        raise
    return sig


def verify_directory(model_dir: Path, *, pubkey: Path | None = None, keyless_identity: str | None = None,
                     keyless_issuer: str | None = None) -> None:
    """Check ``model_dir/model.sig`` against every file of the directory.

    The signature is read here, bounded and never through a link, and model-signing checks that copy:
    a FIFO or device planted as ``model.sig`` can neither hang verify nor exhaust its memory, a link
    cannot make it read a file outside the release, and the file cannot be swapped after the check.

    Raises:
        IntegrityError: missing, tampered or non-regular signature (a FIFO, device, directory or
            symlink), wrong key, or any file changed/added/removed.
        InputError: neither a public key nor a keyless identity given, or an unreadable key.
    """
    _, hashing, _, verifying = _ms()
    sig = Path(model_dir) / SIGNATURE_NAME
    if not os.path.lexists(sig):
        raise IntegrityError(f"{model_dir} carries no signature ({SIGNATURE_NAME}).",
                             hint="Sign it with `moeharden lock`, or verify the right directory.")
    signature = read_small_bytes(sig, what="signature", max_bytes=MAX_DOCUMENT, error=IntegrityError,
                                 follow_links=False)
    cfg = verifying.Config().set_hashing_config(_hashing_config(hashing))
    if pubkey is not None:
        if not Path(pubkey).is_file():
            raise InputError(f"Public key {pubkey} does not exist.")
        try:
            cfg.use_elliptic_key_verifier(public_key=Path(pubkey))
        except (ValueError, TypeError) as err:
            raise InputError(f"Cannot read {pubkey} as a public key: {err}.") from None
    elif keyless_identity and keyless_issuer:
        cfg.use_sigstore_verifier(identity=keyless_identity, oidc_issuer=keyless_issuer)
    else:
        raise InputError("Verifying a signature needs --pubkey (or a keyless identity and issuer).")
    with tempfile.TemporaryDirectory(prefix="moeharden-sig-") as tmp:
        copy = Path(tmp) / SIGNATURE_NAME
        copy.write_bytes(signature)
        try:
            cfg.verify(Path(model_dir), copy)
        except Exception as err:  # model_signing raises ValueError and crypto errors of several kinds
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise IntegrityError(f"The signature of {model_dir} does not verify: {first[:400]}",
                                 hint="A file was changed after signing, or the wrong public key was used.") \
                from None
