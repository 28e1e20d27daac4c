"""Helpers for the Hub/format tests: editing saved configs on purpose, and laying out a huggingface_hub cache."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from functools import cache
from pathlib import Path

from tests.helpers import quick_config, tiny_llama
from transformers_kvquant.config import (
    CONFIG_NAME,
    TENSORS_NAME,
    KVQuantConfig,
    content_sha256,
)

CALIBRATION_METADATA = {
    "dataset": "C4 validation documents 0-149",
    "num_samples": 2,
    "seqlen": 64,
    "seed": 0,
    "fisher": False,
    "package_version": "0.1.0",
    "date": "2025-01-01",
    "duration_s": 1.5,
    "ppl": {"dataset": "wikitext2", "windows": 4, "seqlen": 128, "fp": 11.25, "quantized": 11.5, "change_pct": 2.2222},
}


def read_config_json(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG_NAME).read_text())


def write_config_json(folder: Path, data: dict, seal: bool = True) -> None:
    """Write ``data`` as the folder's kvquant_config.json; ``seal`` recomputes content_sha256 (a deliberate edit)."""
    if seal:
        data = dict(data, content_sha256=content_sha256(data))
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(data, indent=1))


def replace_tensor_file(folder: Path, tensors: dict) -> None:
    """Write new key ranges and update the JSON's tensors.sha256 and content_sha256 to match them."""
    from safetensors.torch import save_file

    path = Path(folder) / TENSORS_NAME
    save_file(tensors, str(path))
    data = read_config_json(folder)
    data["tensors"]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    write_config_json(folder, data)


def lay_out_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, Path], commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Put ``files`` into ``cache_dir`` exactly as huggingface_hub stores a downloaded model repo:
    ``models--org--name/blobs/<hash>``, ``snapshots/<commit>/<name>`` (relative symlinks) and ``refs/main``."""
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@cache
def _fitted(model_seed: int, options: tuple) -> KVQuantConfig:
    return quick_config(tiny_llama(seed=model_seed), **dict(options))


def tiny_config(model_seed: int = 0, metadata: bool = False, **options) -> KVQuantConfig:
    """``quick_config(tiny_llama(seed=model_seed), **options)``, fitted once per session (a forward pass is slow
    on a shared CPU); each call returns its own copy, with ``CALIBRATION_METADATA`` if ``metadata``."""
    base = _fitted(model_seed, tuple(sorted(options.items())))
    calibration = dict(CALIBRATION_METADATA) if metadata else {}
    return KVQuantConfig(**{**base.__dict__, "layers": list(base.layers), "fingerprint": replace(base.fingerprint), "calibration": calibration})
