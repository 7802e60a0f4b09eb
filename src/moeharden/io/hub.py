"""Upload a finished output directory (checkpoint, reports) to the Hugging Face Hub.

Only the public API of ``huggingface_hub`` is used: ``HfApi.create_repo(exist_ok=True)`` then
``HfApi.upload_folder``. The repository is private unless asked otherwise, and the commit message
names the tool version (``moeharden <version>: <what>``) so a pushed artifact says what made it.

The token comes from the usual places (argument, ``HF_TOKEN``, the ``hf auth login`` cache) via
``huggingface_hub.get_token``. It is never printed, logged or put into an error message: every
message built here passes through :func:`_scrub`, which replaces the token by ``hf_***``.

Failures become typed errors (the CLI turns them into one paragraph, no traceback):
``NetworkError`` when the endpoint cannot be reached, offline mode is on, or the Hub answers 5xx;
``HubError`` when the Hub refuses the request (bad or missing token, no write access, bad repo id).
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from moeharden import __version__
from moeharden.errors import HubError, InputError, NetworkError

_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class PushResult:
    """Where an upload went.

    Attributes:
        repo_id: ``namespace/name`` of the target repository.
        repo_url: browser URL of the repository.
        commit_url: URL of the (last) commit the upload made.
        commit_oid: its git object id.
        commit_message: ``moeharden <version>: <what>``.
        private: whether the repository was asked for as private.
        files: repository paths of the files uploaded, sorted.
        endpoint: Hub endpoint used (``HF_ENDPOINT`` or huggingface.co).
    """

    repo_id: str
    repo_url: str
    commit_url: str
    commit_oid: str
    commit_message: str
    private: bool
    files: tuple[str, ...]
    endpoint: str

    def to_dict(self) -> dict:
        d = asdict(self)
        d["files"] = list(self.files)
        return d


def commit_message(what: str) -> str:
    """The commit message every push uses: ``moeharden <version>: <what>``."""
    return f"moeharden {__version__}: {what}"


def _endpoint() -> str:
    """The Hub endpoint, read at call time so ``HF_ENDPOINT`` set after import still counts."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _offline() -> bool:
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").strip().lower()
    return env in _TRUE or bool(constants.HF_HUB_OFFLINE)


def _offline_error(repo_id: str) -> NetworkError:
    return NetworkError(
        f"Cannot push to the Hub repository {repo_id}: offline mode is on (HF_HUB_OFFLINE).",
        hint="Unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) on a machine with network access, or push "
             "the output directory later with `hf upload`.")


def _scrub(text: str, token: str | None) -> str:
    """Remove the token from any text that may reach the user."""
    return text.replace(token, "hf_***") if token else text


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "could not talk to the endpoint" (socket- or client-level)."""
    import importlib

    errs: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for name in ("httpx2", "httpx"):          # huggingface_hub's HTTP client (the name moved across versions)
        try:
            errs.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errs)


def _local_files(folder: Path) -> tuple[str, ...]:
    """Repository paths upload_folder will send (same rule: every file, ``.git`` and HF cache skipped)."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and ".git" not in rel.parts and "/.cache/huggingface/" not in f"/{rel.as_posix()}":
            out.append(rel.as_posix())
    return tuple(out)


def _translate(err: BaseException, *, endpoint: str, repo_id: str, token: str | None) -> Exception:
    """Map a huggingface_hub / HTTP-client exception to NetworkError or HubError (token scrubbed)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return _offline_error(repo_id)
    if isinstance(err, _transport_errors()):
        kind = type(err).__name__
        return NetworkError(
            f"Cannot reach the Hugging Face Hub at {endpoint} to push {repo_id} ({kind}: "
            f"{_scrub(str(err), token) or 'no answer'}). The local output directory is complete and "
            "unaffected.",
            hint="Check the network connection, proxy settings and HF_ENDPOINT, then push again "
                 "(re-running the push resumes: unchanged files are skipped).")
    if isinstance(err, HFValidationError):
        return InputError(f"{repo_id!r} is not a valid Hub repository id: {_scrub(str(err), token)}",
                          hint="Use the form namespace/name, e.g. my-org/mixtral-hardened.")
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        server = _scrub(str(getattr(err, "server_message", "") or ""), token).strip()
        said = f" The Hub said: {server}" if server else ""
        if status == 401:
            return HubError(
                f"The Hub at {endpoint} rejected the token when pushing {repo_id} (HTTP 401).{said}",
                hint="Log in with `hf auth login` or set HF_TOKEN to a token with write access.")
        if status == 403:
            return HubError(
                f"The token has no write access to {repo_id} on {endpoint} (HTTP 403).{said}",
                hint="Use a token with the 'write' role, or push to a namespace you own.")
        if status == 404:
            return HubError(
                f"The Hub at {endpoint} found no repository or namespace for {repo_id} (HTTP 404).{said}",
                hint="Check the namespace (user or organisation) in the repo id and the token's access to it.")
        if status is not None and status >= 500:
            return NetworkError(
                f"The Hub at {endpoint} failed while pushing {repo_id} (HTTP {status}).{said}",
                hint="The service may be down; push again later (unchanged files are skipped).")
        return HubError(f"The Hub at {endpoint} refused the push to {repo_id} (HTTP {status}).{said}",
                        hint="Set MOEHARDEN_DEBUG=1 for the full exception.")
    return HubError(f"Pushing {repo_id} to {endpoint} failed: {type(err).__name__}: {_scrub(str(err), token)}",
                    hint="Set MOEHARDEN_DEBUG=1 for the full exception.")


def push_to_hub(folder: Path, repo_id: str, *, private: bool = True, what: str, token: str | None = None,
                path_in_repo: str | None = None, progress: bool = False) -> PushResult:
    """Create ``repo_id`` if needed (private by default) and upload every file of ``folder`` in one push.

    Args:
        folder: a finished output directory (checkpoint and/or reports).
        repo_id: ``namespace/name`` on the Hub (model repository).
        private: create the repository private (has no effect on an existing repository).
        what: what is pushed, for the commit message (``"entangled checkpoint"``, ``"verify report"``).
        token: a Hub token; ``None`` = ``HF_TOKEN`` or the ``hf auth login`` cache.
        path_in_repo: folder of the repository to upload into (``None`` = its root).
        progress: show huggingface_hub's own upload progress on stderr (the CLI passes
            ``not json_mode()``); off by default so the library stays silent.

    Returns:
        PushResult with the repository and commit URLs and the uploaded paths.

    Raises:
        InputError: ``folder`` is not a non-empty directory, or ``repo_id`` is malformed.
        NetworkError: offline mode is on, the endpoint cannot be reached, or it answers 5xx.
        HubError: no token, or the Hub refuses it (401), has no write access (403) or no namespace (404).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"Nothing to push: {folder} is not a directory.")
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo and path_in_repo.strip("/") else ""
    files = tuple(prefix + f for f in _local_files(folder))
    if not files:
        raise InputError(f"Nothing to push: {folder} is empty.")
    endpoint = _endpoint()
    if _offline():
        raise _offline_error(repo_id)

    from huggingface_hub import HfApi, get_token
    from huggingface_hub.utils import disable_progress_bars

    token = token if token is not None else get_token()
    if not token:
        raise HubError(f"No Hugging Face token found to push {repo_id}.",
                       hint="Run `hf auth login`, or set HF_TOKEN to a token with write access.")
    message = commit_message(what)
    api = HfApi(endpoint=endpoint, token=token, library_name="moeharden", library_version=__version__)
    quiet = None if progress else disable_progress_bars()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                 path_in_repo=prefix.rstrip("/") or None, commit_message=message,
                                 commit_description=f"Uploaded by moeharden {__version__} ({len(files)} files).")
    except Exception as err:  # everything from the client is mapped; the token never leaves here
        # not chained: a server may echo the credential in its error body, and a MOEHARDEN_DEBUG=1
        # traceback would print the raw exception; the translated message keeps type and (scrubbed) text
        raise _translate(err, endpoint=endpoint, repo_id=repo_id, token=token) from None
    finally:
        if quiet is not None:
            quiet.__exit__(None, None, None)
    return PushResult(repo_id=repo_id, repo_url=str(url), commit_url=str(info.commit_url),
                      commit_oid=str(info.oid), commit_message=message, private=private, files=files,
                      endpoint=endpoint)


# Commands whose output is a checkpoint go to the repository root (it loads with from_pretrained);
# the others are reports and go to their own folder, so they never overwrite the weights' files.
CHECKPOINT_COMMANDS = ("entangle", "lock", "prune")


def default_path_in_repo(what: str) -> str | None:
    """Repository folder for a command's output: root for checkpoints, ``moeharden/<what>`` otherwise."""
    return None if what in CHECKPOINT_COMMANDS else f"moeharden/{what}"


def push_output(out_dir: Path, repo_id: str, what: str, *, private: bool = True,
                progress: bool = False) -> PushResult:
    """What ``--push-to-hub REPO_ID`` runs after a command has written its output directory.

    Args:
        out_dir: the command's finished ``--out`` directory.
        repo_id: ``namespace/name``.
        what: the command's name (``"entangle"``, ``"lock"``, ``"verify"``, ``"report"``): it goes
            into the commit message and picks the folder (:func:`default_path_in_repo`):
            checkpoints at the repository root, ``verify``/``report`` output under ``moeharden/<what>/``.
        private: see :func:`push_to_hub`.
        progress: see :func:`push_to_hub`.

    Returns / Raises: as :func:`push_to_hub` (token from ``HF_TOKEN`` or the login cache).
    """
    return push_to_hub(Path(out_dir), repo_id, private=private, what=what, token=None,
                       path_in_repo=default_path_in_repo(what), progress=progress)
