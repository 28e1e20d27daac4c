"""The ``kvquant_config.json`` format: file names, writing, and validating on load.

The JSON holds everything small (settings, per-layer codebooks and Q-Norm, the model fingerprint, calibration
metadata); the per-channel key ranges live in ``kvquant_calibration.safetensors`` beside it, named in the JSON
with its sha256, and the JSON carries the sha256 of its own canonical content, so no change to either file goes
unnoticed. Loading validates every field and raises :class:`KVQuantConfigError`, which names the file, the field
and the remedy. docs/format.md describes every field; docs/kvquant_config.schema.json is its JSON Schema.

This module moves between files and plain values (``KVQuantConfig``'s fields); the config type itself is
:mod:`.kvquant_config`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
from pathlib import Path

import torch

from ..calibration.fingerprint import ModelFingerprint
from ..calibration.fit import LayerCalibration
from ..kernels.layout import SUPPORTED_BITS
from ..quant.codebook import Codebook
from .errors import RECALIBRATE, KVQuantConfigError

FORMAT_VERSION = 1
CONFIG_NAME = "kvquant_config.json"
TENSORS_NAME = "kvquant_calibration.safetensors"


def datatype_name(bits: int, outlier_fraction: float) -> str:
    """``nuq3-1%``: how configs are named in tables, logs and commit messages."""
    pct = f"{outlier_fraction * 100:g}%"
    return f"nuq{bits}" + (f"-{pct}" if outlier_fraction else "")


def write_config_files(folder: str | os.PathLike, data: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write the JSON content ``data`` (its sha256 fields are filled in here) and the key-range ``tensors``.

    Refuses (with :class:`KVQuantConfigError`) values that loading would reject, so every written config loads.
    Each file is written under a temporary name and renamed, so a crash never leaves a half-written config.
    """
    from safetensors.torch import save_file

    out = Path(folder)
    cpath = out / CONFIG_NAME
    fix = "fix the value before saving (non-finite ranges or codebooks come from non-finite activations)"

    def fail(message, field):
        return KVQuantConfigError(message, file=cpath, field=field, remedy=fix)

    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise fail(f"tensor {name} holds NaN or inf", name)
        if name.endswith("key_scale") and (t <= 0).any():
            raise fail(f"tensor {name} must be positive", name)
    data = _normalized_json(data, fail)
    bad = _find_non_finite(data)
    if bad is not None:
        raise fail(f"holds {bad[1]}", bad[0])
    _check_calibration(data["calibration"], lambda m, f, r: fail(m, f))

    out.mkdir(parents=True, exist_ok=True)
    tpath = out / TENSORS_NAME
    # One metadata key only: safetensors writes several in a random order, and the same config must always
    # give the same bytes (and sha256).
    _write_atomically(tpath, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    data["tensors"]["sha256"] = _sha256(tpath)
    data[CHECKSUM_FIELD] = content_sha256(data)
    text = json.dumps(data, indent=1, allow_nan=False) + "\n"
    _write_atomically(cpath, lambda p: p.write_text(text, encoding="utf-8"))
    return cpath


def read_config_files(config_path: str | os.PathLike, tensors_locator=None) -> dict:
    """Parse and validate a ``kvquant_config.json`` and its tensor file; return ``KVQuantConfig``'s fields.

    ``tensors_locator(name) -> path`` finds the tensor file (default: beside the JSON). Every problem raises
    :class:`KVQuantConfigError` naming the file, the field and the remedy.
    """
    path = Path(config_path)
    fail = _failer(path)
    try:
        return _load(path, tensors_locator, fail)
    except KVQuantConfigError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError, RuntimeError) as e:
        # The checks in _load are meant to catch every bad input first; this keeps the one-exception-type promise.
        raise fail(f"invalid content ({type(e).__name__}: {e})", None, RECALIBRATE) from e


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(data: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, ASCII) of every field except ``content_sha256``.

    Any change to a value, however small, changes it; re-indenting or reordering the file does not.
    """
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _write_atomically(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(value):
    # numpy scalars/arrays and tensors in calibration metadata become plain numbers and lists
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _normalized_json(data: dict, fail) -> dict:
    """``data`` as it will read back from JSON (tuples become lists, numpy numbers plain ones)."""
    try:
        return json.loads(json.dumps(data, default=_json_default, allow_nan=True))
    except (TypeError, ValueError) as e:
        raise fail(f"cannot be written as JSON ({e})", "calibration") from e


# --------------------------------------------------------------------------------------------- loading
CHECKSUM_FIELD = "content_sha256"
CODEBOOK_KINDS = ("nuq", "nuq-unweighted", "uniform")
_NUMBER = (int, float)

_REQUIRED = {
    "format_version": int,
    "bits": int,
    "outlier_fraction": _NUMBER,
    "sink_tokens": int,
    "recent_window": int,
    "qnorm": bool,
    "key_rope": str,
    "codebook_kind": str,
    "fingerprint": dict,
    "layers": list,
    "calibration": dict,
    "tensors": dict,
    CHECKSUM_FIELD: str,
}
_FINGERPRINT_REQUIRED = {
    "architecture": str,
    "model_type": str,
    "num_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int,
    "head_dim": int,
    "hidden_size": int,
    "rope": dict,
}
_FINGERPRINT_OPTIONAL = {"model_id": str, "revision": str, "weights_signature": list}
_LAYER_REQUIRED = {"key_centroids": list, "value_centroids": list, "key_qnorm": list, "value_qnorm": list}
_TENSORS_REQUIRED = {"file": str, "sha256": str}

# Calibration metadata: these keys, when present, must have these types; other keys may hold any JSON value.
CALIBRATION_FIELDS = {
    "dataset": str,
    "num_samples": int,
    "seqlen": int,
    "seed": int,
    "fisher": bool,
    "package_version": str,
    "date": str,
    "duration_s": _NUMBER,
    "ppl": dict,
}
PPL_FIELDS = {"dataset": str, "windows": int, "seqlen": int, "fp": _NUMBER, "quantized": _NUMBER, "change_pct": _NUMBER}
PPL_REQUIRED = ("fp", "quantized", "change_pct")

_HAND_EDITED = (
    "download or copy the file again; to change a config, load it with KVQuantConfig.from_pretrained, edit the "
    "object and save_pretrained it (sink_tokens and recent_window can be overridden in cache_config instead)"
)


class _NonFinite:
    """Stands in for NaN/Infinity while parsing, so the error can name the field that holds it."""

    def __init__(self, text: str):
        self.text = text


def _parse_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _find_non_finite(value, path: str = "") -> tuple[str, str] | None:
    """``(field path, text)`` of the first NaN/inf in parsed JSON, or None."""
    if isinstance(value, _NonFinite):
        return path, value.text
    if isinstance(value, float) and not math.isfinite(value):
        return path, repr(value)
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _find_non_finite(v, sub)
        if found is not None:
            return found
    return None


def _field_near(text: str, pos: int) -> str | None:
    """The last JSON key before ``pos``: where a truncated or garbled file stops making sense."""
    keys = re.findall(r'"([A-Za-z_][A-Za-z0-9_]{0,63})"\s*:', text[:pos])
    return keys[-1] if keys else None


def _load(path: Path, tensors_locator, fail) -> dict:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror or e})", None, "check the path") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise fail(f"not UTF-8 text (byte {e.start}); the file is corrupted", None, "download or " + RECALIBRATE) from e
    try:
        data = json.loads(text, parse_constant=_NonFinite, parse_float=_parse_float)
    except json.JSONDecodeError as e:
        near = _field_near(text, e.pos)
        raise fail(
            f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); the file is truncated or corrupted",
            near,
            "download or " + RECALIBRATE,
        ) from e
    except (ValueError, RecursionError) as e:  # e.g. an integer with thousands of digits, absurd nesting
        raise fail(f"not valid JSON ({e}); the file is corrupted", None, "download or " + RECALIBRATE) from e
    if not isinstance(data, dict):
        raise fail("the top level must be a JSON object", None, RECALIBRATE)

    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise fail(
            f"format_version {version} is newer than this package reads ({FORMAT_VERSION})",
            "format_version",
            "upgrade transformers-kvquant (`pip install -U transformers-kvquant`)",
        )
    bad = _find_non_finite(data)
    if bad is not None:
        raise fail(f"holds {bad[1]}; configs hold finite numbers only", bad[0], RECALIBRATE)

    # 1. Structure: every field present with its JSON type, nothing unknown (names the field even in a damaged file).
    _check_fields(data, _REQUIRED, "", fail)
    fp = data["fingerprint"]
    _check_fields(fp, _FINGERPRINT_REQUIRED, "fingerprint.", fail)
    _reject_unknown(fp, {**_FINGERPRINT_REQUIRED, **_FINGERPRINT_OPTIONAL}, "fingerprint.", fail)
    for name, typ in _FINGERPRINT_OPTIONAL.items():
        if fp.get(name) is not None:
            _check_type(fp[name], typ, "fingerprint." + name, fail)
    _check_fields(data["tensors"], _TENSORS_REQUIRED, "tensors.", fail)
    _reject_unknown(data["tensors"], _TENSORS_REQUIRED, "tensors.", fail)
    for i, lj in enumerate(data["layers"]):
        if not isinstance(lj, dict):
            raise fail("must be an object", f"layers[{i}]", RECALIBRATE)
        _check_fields(lj, _LAYER_REQUIRED, f"layers[{i}].", fail)
        _reject_unknown(lj, _LAYER_REQUIRED, f"layers[{i}].", fail)
    _reject_unknown(data, _REQUIRED, "", fail)

    # 2. Integrity: any change to any value since the file was written.
    if data[CHECKSUM_FIELD] != content_sha256(data):
        raise fail("does not match the file's content: the file was changed or damaged after it was written", CHECKSUM_FIELD, _HAND_EDITED)

    # 3. Values.
    if version < 1:
        raise fail(f"format_version must be >= 1, got {version}", "format_version", RECALIBRATE)
    bits = data["bits"]
    if bits not in SUPPORTED_BITS:
        raise fail(f"bits must be one of {SUPPORTED_BITS}, got {bits}", "bits", RECALIBRATE)
    frac = float(data["outlier_fraction"])
    if not (0.0 <= frac < 0.5):
        raise fail(f"outlier_fraction must be in [0, 0.5), got {frac}", "outlier_fraction", RECALIBRATE)
    for name in ("sink_tokens", "recent_window"):
        if data[name] < 0:
            raise fail(f"must be >= 0, got {data[name]}", name, RECALIBRATE)
    if data["key_rope"] not in ("pre", "post"):
        raise fail(f"must be 'pre' or 'post', got {data['key_rope']!r}", "key_rope", RECALIBRATE)
    if data["codebook_kind"] not in CODEBOOK_KINDS:
        raise fail(f"must be one of {CODEBOOK_KINDS}, got {data['codebook_kind']!r}", "codebook_kind", RECALIBRATE)
    for name in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"):
        if fp[name] <= 0:
            raise fail(f"must be positive, got {fp[name]}", f"fingerprint.{name}", RECALIBRATE)
    signature = fp.get("weights_signature")
    if signature is not None:
        signature = _float_list(signature, "fingerprint.weights_signature", fail)
    fingerprint = ModelFingerprint(
        **{k: fp[k] for k in _FINGERPRINT_REQUIRED},
        model_id=fp.get("model_id"),
        revision=fp.get("revision"),
        weights_signature=signature,
    )
    layers_json = data["layers"]
    if len(layers_json) != fingerprint.num_layers:
        raise fail(f"has {len(layers_json)} entries, fingerprint.num_layers is {fingerprint.num_layers}", "layers", RECALIBRATE)
    _check_calibration(data["calibration"], fail)

    tensors = _read_tensor_file(path, data["tensors"], tensors_locator, fail)
    shape = (fingerprint.num_key_value_heads, fingerprint.head_dim)
    layers = []
    for i, lj in enumerate(layers_json):
        prefix = f"layers[{i}]."
        books = []
        for kind in ("key", "value"):
            cents = _float_list(lj[f"{kind}_centroids"], prefix + f"{kind}_centroids", fail)
            if len(cents) != 2**bits:
                raise fail(f"has {len(cents)} centroids, {bits} bits need {2**bits}", prefix + f"{kind}_centroids", RECALIBRATE)
            if any(b < a for a, b in itertools.pairwise(cents)):
                raise fail("centroids must be sorted ascending", prefix + f"{kind}_centroids", RECALIBRATE)
            qn = _float_list(lj[f"{kind}_qnorm"], prefix + f"{kind}_qnorm", fail)
            if len(qn) != 2:
                raise fail("must be [scale, offset]", prefix + f"{kind}_qnorm", RECALIBRATE)
            books.append(Codebook(torch.tensor(cents, dtype=torch.float32), qn[0], qn[1]))
        ranges = []
        for name in ("key_zero", "key_scale"):
            tname = f"layers.{i}.{name}"
            if tname not in tensors:
                raise fail(f"tensor {tname} is missing from {data['tensors']['file']}", tname, RECALIBRATE)
            t = tensors[tname]
            if not t.is_floating_point():
                raise fail(f"tensor {tname} has dtype {t.dtype}, expected float32", tname, RECALIBRATE)
            t = t.float()
            if tuple(t.shape) != shape:
                raise fail(f"tensor {tname} has shape {tuple(t.shape)}, expected {shape}", tname, RECALIBRATE)
            if not torch.isfinite(t).all():
                raise fail(f"tensor {tname} holds NaN or inf", tname, RECALIBRATE)
            ranges.append(t)
        if (ranges[1] <= 0).any():
            raise fail("key scales must be positive", f"layers.{i}.key_scale", RECALIBRATE)
        layers.append(LayerCalibration(books[0], books[1], ranges[0], ranges[1]))
    return {
        "bits": bits,
        "outlier_fraction": frac,
        "layers": layers,
        "fingerprint": fingerprint,
        "sink_tokens": data["sink_tokens"],
        "recent_window": data["recent_window"],
        "qnorm": data["qnorm"],
        "key_rope": data["key_rope"],
        "codebook_kind": data["codebook_kind"],
        "calibration": data["calibration"],
        "format_version": version,
    }


def _read_tensor_file(path: Path, meta: dict, tensors_locator, fail) -> dict:
    """Find the tensor file named in ``tensors``, check its sha256 and load it."""
    name = meta["file"]
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise fail(f"must be a bare file name beside the config, got {name!r}", "tensors.file", RECALIBRATE)
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        raise fail("must be 64 lowercase hex digits", "tensors.sha256", RECALIBRATE)
    tpath = Path(tensors_locator(name)) if tensors_locator else path.parent / name
    if not tpath.is_file():
        raise fail(f"the tensor file {name} is missing", "tensors.file", "copy it beside the config, download both again, or " + RECALIBRATE)
    sha = _sha256(tpath)
    if sha != meta["sha256"]:
        raise fail(
            f"sha256 of {tpath.name} is {sha[:12]}…, the config expects {meta['sha256'][:12]}…",
            "tensors.sha256",
            "the two files do not belong together or one is damaged; download both again or " + RECALIBRATE,
        )
    from safetensors.torch import load_file

    try:
        return load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise fail(f"cannot read {tpath.name} ({e})", "tensors.file", RECALIBRATE) from e


def _check_calibration(meta: dict, fail, remedy: str = RECALIBRATE) -> None:
    for name, typ in CALIBRATION_FIELDS.items():
        if name in meta:
            _check_type(meta[name], typ, f"calibration.{name}", fail, remedy)
    ppl = meta.get("ppl")
    if ppl is not None:
        for name in PPL_REQUIRED:
            if name not in ppl:
                raise fail("is missing", f"calibration.ppl.{name}", remedy)
        for name, typ in PPL_FIELDS.items():
            if name in ppl:
                _check_type(ppl[name], typ, f"calibration.ppl.{name}", fail, remedy)


def _failer(path):
    def fail(message, field, remedy):
        return KVQuantConfigError(message, file=path, field=field, remedy=remedy)

    return fail


def _check_fields(data: dict, spec: dict, prefix: str, fail) -> None:
    for name, typ in spec.items():
        if name not in data:
            raise fail("is missing", prefix + name, RECALIBRATE)
        _check_type(data[name], typ, prefix + name, fail)


def _reject_unknown(data: dict, spec: dict, prefix: str, fail) -> None:
    for name in data:
        if name not in spec:
            raise fail(
                f"is not a field of format_version {FORMAT_VERSION}",
                prefix + str(name),
                "the file was written by another tool or a newer package; upgrade transformers-kvquant or " + RECALIBRATE,
            )


def _check_type(value, typ, name: str, fail, remedy: str = RECALIBRATE) -> None:
    allowed = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) and bool not in allowed:
        raise fail(f"must be {_type_name(typ)}, got a boolean", name, remedy)
    if not isinstance(value, typ):
        raise fail(f"must be {_type_name(typ)}, got {_json_type_name(value)}", name, remedy)


def _type_name(typ) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object", list: "a list"}
    if isinstance(typ, tuple):
        return "a number"
    return names.get(typ, typ.__name__)


def _json_type_name(value) -> str:
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _float_list(value, name, fail) -> list[float]:
    if not isinstance(value, list):
        raise fail(f"must be a list of numbers, got {_json_type_name(value)}", name, RECALIBRATE)
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise fail("must hold numbers only", name, RECALIBRATE)
        if not math.isfinite(v):
            raise fail("holds NaN or inf", name, RECALIBRATE)
        out.append(float(v))
    return out
