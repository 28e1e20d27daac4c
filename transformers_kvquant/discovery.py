"""Choosing the calibrated config for a model: an explicit one, one beside the model, or a shipped one.

Order when none is named: ``kvquant_config.json`` beside the model (its local folder, or its Hub repo at the
requested revision), then the configs shipped in ``hub_configs/`` whose fingerprint matches the model. A config
is only ever used with a model its fingerprint matches.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .config import CONFIG_NAME, KVQuantConfig, KVQuantConfigError

logger = logging.getLogger("transformers_kvquant")
DEFAULT_BITS = 3
DEFAULT_OUTLIER_FRACTION = 0.01


def hub_configs_dir() -> Path:
    """Folder of the configs shipped with the package (the repository's ``hub_configs/``)."""
    return Path(str(resources.files("transformers_kvquant.hub_configs")))


@lru_cache(maxsize=1)
def shipped_index() -> tuple[dict, ...]:
    path = hub_configs_dir() / "index.json"
    if not path.is_file():
        return ()
    entries = json.loads(path.read_text())["configs"]
    return tuple(entries)


def load_for_model(model, config, revision=None, local_files_only=False) -> tuple[KVQuantConfig, str]:
    """Load an explicitly named config and check it belongs to ``model``."""
    if isinstance(config, KVQuantConfig):
        source = "the KVQuantConfig passed in"
        cfg = config
    else:
        source = str(config)
        cfg = KVQuantConfig.from_pretrained(config, revision=revision, local_files_only=local_files_only)
    cfg.check_model(model, source=source)
    return cfg, source


def _wanted(cfg: KVQuantConfig, bits, fraction) -> bool:
    return (bits is None or cfg.bits == bits) and (fraction is None or abs(cfg.outlier_fraction - fraction) < 1e-9)


def find_config(model, bits=None, outlier_fraction=None, revision=None, local_files_only=False) -> tuple[KVQuantConfig, str]:
    """Discover the config for ``model`` (see module docstring); raise with the calibrate command if none fits."""
    tried = []
    beside = _beside_model(model, revision, local_files_only)
    if beside is not None:
        cfg, source = beside
        if _wanted(cfg, bits, outlier_fraction):
            cfg.check_model(model, source=source)
            return cfg, source
        tried.append(f"{source} ({cfg.name}, not the requested bits/outliers)")

    want_bits = DEFAULT_BITS if bits is None else bits
    want_frac = DEFAULT_OUTLIER_FRACTION if outlier_fraction is None else outlier_fraction
    matching = []
    for entry in shipped_index():
        if entry["bits"] != want_bits or abs(entry["outlier_fraction"] - want_frac) > 1e-9:
            continue
        path = hub_configs_dir() / entry["path"]
        cfg = _load_shipped(str(path))
        if not cfg.fingerprint.mismatches(_fingerprint(model)):
            matching.append((cfg, f"hub_configs/{entry['path']}"))
    if matching:
        return matching[0]
    name = getattr(model, "name_or_path", "") or type(model).__name__
    where = "; ".join(tried) if tried else f"no {CONFIG_NAME} beside the model"
    raise KVQuantConfigError(
        f"no KVQuant config for {name} at {want_bits} bits with outlier_fraction={want_frac} ({where}, and none of "
        f"the shipped hub_configs matches this model)",
        remedy=(
            f"calibrate it: `kvquant calibrate {name} --bits {want_bits} --outliers {want_frac} -o DIR`, then pass "
            "cache_config={'config': DIR}; or use cache_config={'bits': 16} to run without quantization"
        ),
    )


def _fingerprint(model):
    from .config import ModelFingerprint

    return ModelFingerprint.from_model(model)


@lru_cache(maxsize=64)
def _load_shipped(path: str) -> KVQuantConfig:
    return KVQuantConfig.from_pretrained(path)


def _beside_model(model, revision, local_files_only):
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:
        return None
    folder = Path(name)
    if folder.is_dir():
        if (folder / CONFIG_NAME).is_file():
            return KVQuantConfig.from_pretrained(folder), str(folder / CONFIG_NAME)
        return None
    if os.path.exists(name) or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import is_offline_mode
    except ImportError:  # older huggingface_hub
        from huggingface_hub.constants import HF_HUB_OFFLINE

        def is_offline_mode():
            return HF_HUB_OFFLINE

    try:
        cfg = KVQuantConfig.from_pretrained(name, revision=revision, local_files_only=local_files_only or is_offline_mode())
    except KVQuantConfigError as e:
        if e.field is not None:  # the file exists but is broken: never fall through silently
            raise
        logger.info("no %s in %s: %s", CONFIG_NAME, name, e)
        return None
    return cfg, f"{name}/{CONFIG_NAME}"
