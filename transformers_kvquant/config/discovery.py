"""Choosing the calibrated config for a model: an explicit one, one beside the model, or a shipped one.

Order when none is named: ``kvquant_config.json`` beside the model (its local folder, or its Hub repo at the
requested revision, from the local cache when offline), then the configs shipped in ``hub_configs/`` whose
fingerprint (geometry, RoPE, model id and weights signature) matches the model. A config is only ever used with a
model its fingerprint matches. The choice is logged (logger ``transformers_kvquant``, INFO).

``hub_configs/index.json`` lists the shipped configs by model; :func:`update_index` adds or refreshes an entry
when a config is written into ``hub_configs/<model-slug>/<config-name>/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..calibration.fingerprint import ModelFingerprint
from .errors import ConfigNotFoundError, KVQuantConfigError
from .format import CONFIG_NAME
from .hub import looks_like_repo_id
from .kvquant_config import KVQuantConfig

logger = logging.getLogger("transformers_kvquant")
DEFAULT_BITS = 3
DEFAULT_OUTLIER_FRACTION = 0.01
INDEX_NAME = "index.json"
INDEX_VERSION = 1
GEOMETRY_FIELDS = ("model_type", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size")
_TABLE_BEGIN = "<!-- BEGIN CONFIG TABLE: written by transformers_kvquant.config.discovery.update_index; do not edit -->"
_TABLE_END = "<!-- END CONFIG TABLE -->"


def hub_configs_dir() -> Path:
    """Folder of the configs shipped with the package (the repository's ``hub_configs/``)."""
    return Path(str(resources.files("transformers_kvquant.hub_configs")))


# --------------------------------------------------------------------------------------------- explicit config
def load_for_model(model, config, revision=None, local_files_only=False) -> tuple[KVQuantConfig, str]:
    """Load an explicitly named config (object, folder, file or Hub id) and check it belongs to ``model``."""
    if isinstance(config, KVQuantConfig):
        source = "the KVQuantConfig passed in"
        cfg = config
    else:
        source = str(config)
        cfg = KVQuantConfig.from_pretrained(config, revision=revision, local_files_only=local_files_only)
    cfg.check_model(model, source=source)
    return cfg, source


# --------------------------------------------------------------------------------------------- discovery
def _wanted(cfg: KVQuantConfig, bits, fraction) -> bool:
    return (bits is None or cfg.bits == bits) and (fraction is None or abs(cfg.outlier_fraction - fraction) < 1e-9)


def find_config(model, bits=None, outlier_fraction=None, revision=None, local_files_only=False) -> tuple[KVQuantConfig, str]:
    """Discover the config for ``model`` (see module docstring); raise with the calibrate command if none fits.

    ``bits`` / ``outlier_fraction`` given: only configs with those values; not given: prefer 3 bits and 1%.
    """
    path = str(getattr(model, "name_or_path", "") or "")
    name = path or type(model).__name__  # for messages
    tried = []
    beside = _beside_model(model, revision, local_files_only)
    if beside is not None:
        cfg, source = beside
        if _wanted(cfg, bits, outlier_fraction):
            cfg.check_model(model, source=source)
            logger.info("KVQuant: using %s (%s), found beside the model %s", source, cfg.name, name)
            return cfg, source
        tried.append(f"{source} is {cfg.name}, not the requested bits/outliers")
        logger.info("KVQuant: %s", tried[-1])

    found = _shipped_for(model, bits, outlier_fraction)
    if found is not None:
        cfg, source = found
        logger.info("KVQuant: using the shipped config %s (%s) for %s", source, cfg.name, name)
        return cfg, source

    want = (
        f"{DEFAULT_BITS if bits is None else bits} bits with outlier_fraction="
        f"{DEFAULT_OUTLIER_FRACTION if outlier_fraction is None else outlier_fraction}"
    )
    where = "; ".join(tried) if tried else f"no {CONFIG_NAME} beside the model"
    raise KVQuantConfigError(
        f"no KVQuant config for {name} at {want} ({where}, and no shipped hub_configs entry matches this model)",
        remedy=(
            f"calibrate it: `kvquant calibrate {path or 'MODEL'} --bits {DEFAULT_BITS if bits is None else bits} --outliers "
            f"{DEFAULT_OUTLIER_FRACTION if outlier_fraction is None else outlier_fraction} -o DIR`, then pass "
            "cache_config={'config': DIR}; or use cache_config={'bits': 16} to run without quantization"
        ),
    )


def _beside_model(model, revision, local_files_only) -> tuple[KVQuantConfig, str] | None:
    """The config in the model's own folder or Hub repo; None when there is none. A broken one raises."""
    name = str(getattr(model, "name_or_path", "") or "")
    if not name:
        return None
    folder = Path(name)
    if folder.is_dir():
        if not (folder / CONFIG_NAME).is_file():
            return None
        return KVQuantConfig.from_pretrained(folder), str(folder / CONFIG_NAME)
    if os.path.exists(name) or not looks_like_repo_id(name):
        return None
    from huggingface_hub import is_offline_mode

    try:
        cfg = KVQuantConfig.from_pretrained(name, revision=revision, local_files_only=local_files_only or is_offline_mode())
    except ConfigNotFoundError as e:
        # Only "there is no config there" falls through; a damaged or unreachable one raises.
        logger.info("KVQuant: no config beside %s (%s)", name, e)
        return None
    return cfg, f"{name}/{CONFIG_NAME}" + (f"@{revision}" if revision else "")


def _shipped_for(model, bits, fraction) -> tuple[KVQuantConfig, str] | None:
    """Best shipped config whose fingerprint matches ``model``, weights signature included."""
    fingerprint = ModelFingerprint.from_model(model)
    if not fingerprint.weights_signature:
        return None  # without a signature, two checkpoints of one shape cannot be told apart: never guess
    root = hub_configs_dir()
    candidates = []
    for entry in shipped_index(root):
        if bits is not None and entry["bits"] != bits:
            continue
        if fraction is not None and abs(entry["outlier_fraction"] - fraction) > 1e-9:
            continue
        if entry["key_rope"] != "pre":
            continue  # post-RoPE ablations are for `kvquant eval-ppl`; the cache stores pre-RoPE keys
        if any(entry["fingerprint"][k] != getattr(fingerprint, k) for k in GEOMETRY_FIELDS):
            continue
        cfg = _load_shipped(str(root / entry["path"]), entry["sha256"])
        if not cfg.fingerprint.weights_signature or cfg.fingerprint.mismatches(fingerprint):
            continue
        # Prefer the default bit width, then the outlier fraction nearest the default, then more bits, then
        # Fisher-weighted codebooks over the ablations.
        rank = (
            cfg.bits != DEFAULT_BITS,
            abs(cfg.outlier_fraction - DEFAULT_OUTLIER_FRACTION),
            -cfg.bits,
            cfg.codebook_kind != "nuq",
            entry["path"],
        )
        candidates.append((rank, cfg, f"hub_configs/{entry['path']}"))
    if not candidates:
        return None
    _, cfg, source = min(candidates, key=lambda c: c[0])
    return cfg, source


@lru_cache(maxsize=64)
def _load_shipped(folder: str, sha256: str) -> KVQuantConfig:
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise KVQuantConfigError("listed in hub_configs/index.json but missing", file=path, remedy="reinstall the package or rebuild the index")
    actual = _file_sha256(path)
    if actual != sha256:
        raise KVQuantConfigError(
            f"sha256 is {actual[:12]}…, hub_configs/index.json expects {sha256[:12]}…",
            file=path,
            field="sha256",
            remedy="the index is stale: run transformers_kvquant.config.discovery.rebuild_index() (or reinstall the package)",
        )
    return KVQuantConfig.from_pretrained(folder)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------- the index
def shipped_index(root: str | os.PathLike | None = None) -> list[dict]:
    """Entries of ``hub_configs/index.json`` (each with its ``model_id`` key added); empty if there is none."""
    root = Path(root) if root is not None else hub_configs_dir()
    path = root / INDEX_NAME
    if not path.is_file():
        return []
    data = _read_index(path)
    return [dict(entry, model_id=model_id) for model_id, entries in data["models"].items() for entry in entries]


_ENTRY_FIELDS = {
    "path": str,
    "name": str,
    "bits": int,
    "outlier_fraction": (int, float),
    "key_rope": str,
    "codebook_kind": str,
    "sha256": str,
    "fingerprint": dict,
}


def _read_index(path: Path) -> dict:
    def fail(message, field=None):
        return KVQuantConfigError(message, file=path, field=field, remedy="rebuild it with transformers_kvquant.config.discovery.rebuild_index()")

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise fail(f"not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise fail("must be an object with a 'models' object", "models")
    if data.get("index_version") != INDEX_VERSION:
        raise fail(f"index_version must be {INDEX_VERSION}, got {data.get('index_version')!r}", "index_version")
    for model_id, entries in data["models"].items():
        if not isinstance(entries, list):
            raise fail("must be a list", f"models.{model_id}")
        for i, entry in enumerate(entries):
            where = f"models.{model_id}[{i}]"
            if not isinstance(entry, dict):
                raise fail("must be an object", where)
            for key, typ in _ENTRY_FIELDS.items():
                if not isinstance(entry.get(key), typ) or isinstance(entry.get(key), bool):
                    raise fail("is missing or has the wrong type", f"{where}.{key}")
            if any(not isinstance(entry["fingerprint"].get(k), (int, str)) for k in GEOMETRY_FIELDS):
                raise fail(f"must hold {', '.join(GEOMETRY_FIELDS)}", f"{where}.fingerprint")
            parts = Path(entry["path"]).parts
            if Path(entry["path"]).is_absolute() or ".." in parts or len(parts) != 2:
                raise fail("must be <model-slug>/<config-name> inside hub_configs", f"{where}.path")
    return data


def update_index(config_dir: str | os.PathLike, root: str | os.PathLike | None = None, *, model_id: str | None = None, require_ppl: bool = True) -> dict:
    """Add or refresh the index entry of the config in ``root/<model-slug>/<config-name>/``; return the entry.

    ``model_id`` keys the entry (default: the config's fingerprint model id, else the model-slug folder name).
    Shipped configs must carry their measured perplexity change (``calibration.ppl``) unless ``require_ppl`` is
    False. Also rewrites the table in ``root/README.md`` between its markers, if the README has them.
    """
    root = Path(root) if root is not None else hub_configs_dir()
    folder = Path(config_dir)
    try:
        rel = folder.resolve().relative_to(root.resolve())
    except ValueError:
        raise KVQuantConfigError(f"must be inside {root}", file=folder, remedy="write the config into hub_configs/<model-slug>/<config-name>/") from None
    if len(rel.parts) != 2:
        raise KVQuantConfigError("must be exactly <model-slug>/<config-name> below hub_configs", file=folder, remedy="write it one folder deeper or shallower")
    config = KVQuantConfig.from_pretrained(folder)
    ppl = config.calibration.get("ppl")
    if require_ppl and not ppl:
        raise KVQuantConfigError(
            "shipped configs carry their measured perplexity change",
            file=folder / CONFIG_NAME,
            field="calibration.ppl",
            remedy="measure it (fp and quantized perplexity) and store it in config.calibration['ppl'] before saving",
        )
    fp = config.fingerprint
    entry = {
        "path": rel.as_posix(),
        "name": config.name,
        "bits": config.bits,
        "outlier_fraction": config.outlier_fraction,
        "key_rope": config.key_rope,
        "codebook_kind": config.codebook_kind,
        "sha256": _file_sha256(folder / CONFIG_NAME),
        "fingerprint": {k: getattr(fp, k) for k in GEOMETRY_FIELDS},
        "ppl": ppl or None,
    }
    key = model_id or fp.model_id or rel.parts[0]
    index_path = root / INDEX_NAME
    data = _read_index(index_path) if index_path.is_file() else {"index_version": INDEX_VERSION, "models": {}}
    models = {m: [e for e in entries if e["path"] != entry["path"]] for m, entries in data["models"].items()}
    models.setdefault(key, []).append(entry)
    _write_index(root, models)
    return entry


def rebuild_index(root: str | os.PathLike | None = None, *, require_ppl: bool = True) -> dict:
    """Re-create ``index.json`` from every ``<model-slug>/<config-name>/kvquant_config.json`` under ``root``."""
    root = Path(root) if root is not None else hub_configs_dir()
    keys = {}
    index_path = root / INDEX_NAME
    if index_path.is_file():
        try:  # keep the model ids that the old index used as keys
            keys = {e["path"]: e["model_id"] for e in shipped_index(root)}
        except KVQuantConfigError:
            keys = {}
    _write_index(root, {})
    for cfg in sorted(root.glob(f"*/*/{CONFIG_NAME}")):
        rel = cfg.parent.relative_to(root).as_posix()
        update_index(cfg.parent, root, model_id=keys.get(rel), require_ppl=require_ppl)
    return _read_index(index_path)


def _write_index(root: Path, models: dict) -> None:
    models = {m: sorted(entries, key=lambda e: e["path"]) for m, entries in sorted(models.items()) if entries}
    data = {"index_version": INDEX_VERSION, "models": models}
    path = root / INDEX_NAME
    tmp = path.with_name(f".{INDEX_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    _write_readme_table(root, models)


def _write_readme_table(root: Path, models: dict) -> None:
    readme = root / "README.md"
    if not readme.is_file():
        return
    text = readme.read_text(encoding="utf-8")
    if _TABLE_BEGIN not in text or _TABLE_END not in text:
        return
    rows = [
        "| model | config | bits | outliers | codebooks, keys | perplexity fp → quantized | change | measured on | folder |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model_id, entries in models.items():
        for e in entries:
            ppl = e.get("ppl") or {}
            measured = ", ".join(str(x) for x in (ppl.get("dataset"), _windows(ppl)) if x) or "—"
            if ppl:
                values, change = f"{ppl['fp']:.3f} → {ppl['quantized']:.3f}", f"{ppl['change_pct']:+.2f}%"
            else:
                values, change = "—", "—"
            rows.append(
                f"| {model_id} | {e['name']} | {e['bits']} | {e['outlier_fraction'] * 100:g}% | {e['codebook_kind']}, "
                f"{e['key_rope']}-RoPE | {values} | {change} | "
                f"{measured} | `{e['path']}/` |"
            )
    head, rest = text.split(_TABLE_BEGIN, 1)
    tail = rest.split(_TABLE_END, 1)[1]
    readme.write_text(head + _TABLE_BEGIN + "\n" + "\n".join(rows) + "\n" + _TABLE_END + tail, encoding="utf-8")


def _windows(ppl: dict) -> str | None:
    if ppl.get("windows") and ppl.get("seqlen"):
        return f"{ppl['windows']} windows of {ppl['seqlen']} tokens"
    return None
