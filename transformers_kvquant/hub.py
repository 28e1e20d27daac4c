"""Finding `kvquant_config.json` (and its tensor file) in a local folder or a Hub repo, through huggingface_hub."""

from __future__ import annotations

import os
from pathlib import Path

from .config import CONFIG_NAME, KVQuantConfigError


def resolve_config_files(
    path_or_repo: str | os.PathLike,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
):
    """Return ``(config_path, tensors_locator)`` for a folder, a config file path or a Hub repo id."""
    p = Path(path_or_repo)
    if p.is_file():
        return p, lambda name: p.parent / name
    folder = p / subfolder if subfolder else p
    if folder.is_dir():
        cfg = folder / CONFIG_NAME
        if not cfg.is_file():
            raise KVQuantConfigError(
                f"no {CONFIG_NAME} in this folder",
                file=folder,
                remedy="run `kvquant calibrate MODEL -o DIR` to create one, or pass the folder that holds it",
            )
        return cfg, lambda name: folder / name
    if os.path.sep in str(path_or_repo) and not _looks_like_repo_id(str(path_or_repo)):
        raise KVQuantConfigError("no such file or folder", file=path_or_repo, remedy="check the path")
    return _download(str(path_or_repo), revision, subfolder, cache_dir, token, local_files_only)


def _looks_like_repo_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def _download(repo_id, revision, subfolder, cache_dir, token, local_files_only):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    def fetch(name):
        return hf_hub_download(
            repo_id,
            name,
            revision=revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )

    where = f"{repo_id}" + (f"@{revision}" if revision else "") + (f"/{subfolder}" if subfolder else "")
    try:
        cfg = fetch(CONFIG_NAME)
    except (EntryNotFoundError, RepositoryNotFoundError) as e:
        raise KVQuantConfigError(
            f"no {CONFIG_NAME} in Hub repo {where}", remedy="calibrate the model with `kvquant calibrate` and push it"
        ) from e
    except LocalEntryNotFoundError as e:
        raise KVQuantConfigError(
            f"{CONFIG_NAME} of {where} is not in the local Hub cache and downloads are off",
            remedy="run once online (or `kvquant pull REPO`) before using HF_HUB_OFFLINE=1",
        ) from e
    except HfHubHTTPError as e:
        raise KVQuantConfigError(f"cannot download {CONFIG_NAME} from {where}: {e}") from e

    def locate(name):
        try:
            return fetch(name)
        except (EntryNotFoundError, LocalEntryNotFoundError) as e:
            raise KVQuantConfigError(f"{name} is missing from {where}", file=cfg, field="tensors.file") from e

    return Path(cfg), locate
