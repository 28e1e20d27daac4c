"""Moving ``kvquant_config.json`` and its tensor file to and from the Hugging Face Hub, through huggingface_hub.

Downloads go through huggingface_hub's cache (``hf_hub_download``), so they work offline (``HF_HUB_OFFLINE=1``)
once cached and honour ``HF_ENDPOINT`` (self-hosted hubs). Uploads add exactly the two files in one commit with
``HfApi.create_commit``: pushing into an existing model repo touches nothing else (never ModelHubMixin, whose
``save_pretrained`` deletes ``config.json``). See docs/hub.md.

This module moves files: :func:`resolve_config_files` finds (or downloads) them, :func:`upload_config_files` validates
and uploads a folder. It never builds a ``KVQuantConfig``; the functions that take or return one
(``KVQuantConfig.from_pretrained`` / ``push_to_hub``, ``push_config``, ``pull_config``) are in :mod:`.kvquant_config`,
which imports this module, never the other way round.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigNotFoundError, KVQuantConfigError
from .format import CONFIG_NAME, TENSORS_NAME, datatype_name, read_config_files

CALIBRATE_AND_PUSH = "calibrate the model with `kvquant calibrate MODEL -o DIR --push-to-hub REPO`"


def resolve_config_files(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
):
    """Return ``(config_path, tensors_locator)`` for a folder, a config file path or a Hub repo id.

    ``tensors_locator(name)`` returns the local path of the tensor file named in the config, downloading it (at
    the same commit as the config) for Hub repos.
    """
    p = Path(path_or_repo)
    if p.is_file():
        return p, lambda name: p.parent / name
    folder = p / subfolder if subfolder else p
    if folder.is_dir():
        cfg = folder / CONFIG_NAME
        if not cfg.is_file():
            raise ConfigNotFoundError(
                f"no {CONFIG_NAME} in this folder",
                file=folder,
                remedy="run `kvquant calibrate MODEL -o DIR` to create one, or pass the folder that holds it",
            )
        return cfg, lambda name: folder / name
    text = str(path_or_repo)
    if p.exists() or not looks_like_repo_id(text):
        raise ConfigNotFoundError(
            "no such file or folder, and not a Hub repo id (org/name)", file=text, remedy="check the path or the repo id"
        )
    return _download(text, revision, subfolder, cache_dir, token, local_files_only)


def looks_like_repo_id(text: str) -> bool:
    """``org/name`` (what the Hub accepts as a model repo id), not a relative path like ``./x`` or ``../x``."""
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and ".." not in text


def _download(repo_id, revision, subfolder, cache_dir, token, local_files_only):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}" + (f"@{revision}" if revision else "") + (f"/{subfolder}" if subfolder else "")

    def fetch(name, at_revision):
        return hf_hub_download(
            repo_id,
            name,
            revision=at_revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )

    def explain(error, name, file=None, field=None):
        # LocalEntryNotFoundError is an EntryNotFoundError: test it first.
        if isinstance(error, LocalEntryNotFoundError):
            return ConfigNotFoundError(
                f"{name} of Hub repo {where} is not in the local Hub cache and downloads are off (offline mode or "
                "local_files_only) or the Hub cannot be reached",
                file=file,
                field=field,
                remedy="download it once while online (`kvquant pull REPO`) before using HF_HUB_OFFLINE=1",
            )
        if isinstance(error, RevisionNotFoundError):
            return ConfigNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}", file=file, field=field, remedy="check --revision")
        if isinstance(error, RepositoryNotFoundError):
            return ConfigNotFoundError(
                f"Hub repo {repo_id} does not exist or is private",
                file=file,
                field=field,
                remedy="check the repo id; for a private repo log in (`hf auth login`) or set HF_TOKEN",
            )
        if isinstance(error, EntryNotFoundError):
            return ConfigNotFoundError(f"no {name} in Hub repo {where}", file=file, field=field, remedy=CALIBRATE_AND_PUSH)
        if isinstance(error, HFValidationError):
            return ConfigNotFoundError(f"{repo_id!r} is not a valid Hub repo id ({error})", remedy="check the repo id")
        return KVQuantConfigError(
            f"cannot download {name} from Hub repo {where} ({type(error).__name__}: {error})",
            file=file,
            field=field,
            remedy="check the network, HF_ENDPOINT and your token, or use the local cache with HF_HUB_OFFLINE=1",
        )

    try:
        cfg = Path(fetch(CONFIG_NAME, revision))
    except (OSError, ValueError) as e:  # huggingface_hub's errors derive from these
        raise explain(e, CONFIG_NAME) from e

    # Fetch the tensor file from the commit the config came from, even if the branch moved in between.
    commit = _snapshot_commit(cfg)

    def locate(name):
        try:
            return fetch(name, commit or revision)
        except (OSError, ValueError) as e:
            raise explain(e, name, file=cfg, field="tensors.file") from e

    return cfg, locate


def _snapshot_commit(path: Path) -> str | None:
    """The commit hash in a huggingface_hub cache path ``.../snapshots/<commit>/...``."""
    parts = path.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def upload_config_files(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    path_in_repo: str | None = None,
):
    """Upload the two files of a config folder to ``repo_id`` in one commit, after validating them.

    Options as :func:`~transformers_kvquant.push_config`. Returns huggingface_hub's ``CommitInfo``.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if create_pr and revision:
        raise ValueError("create_pr opens a pull request against the default branch: do not combine it with revision")
    prefix = ""
    if path_in_repo:
        prefix = path_in_repo.strip("/") + "/"
        if prefix.startswith("../") or "/../" in prefix:
            raise ValueError(f"path_in_repo must stay inside the repo, got {path_in_repo!r}")
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigNotFoundError(f"no {CONFIG_NAME} in this folder", file=folder, remedy="pass the folder `kvquant calibrate -o DIR` wrote")
    fields = read_config_files(folder / CONFIG_NAME)  # never upload a damaged or mismatched pair
    model = fields["fingerprint"].model_id or fields["fingerprint"].architecture
    datatype = datatype_name(fields["bits"], fields["outlier_fraction"])
    message = commit_message or f"Add KVQuant {datatype} config for {model} (kvquant_config.json)"
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    operations = [
        CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(folder / name))
        for name in (TENSORS_NAME, CONFIG_NAME)
    ]
    return api.create_commit(repo_id, operations, commit_message=message, revision=revision, create_pr=create_pr)
