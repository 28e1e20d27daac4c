"""The ``kvquant_config.json`` format: file names, writing, and validating on load.

The JSON holds everything small (settings, per-layer codebooks and Q-Norm, the model fingerprint, calibration
metadata); the per-channel key ranges live in ``kvquant_calibration.safetensors`` beside it, named in the JSON
with its sha256, and the JSON carries the sha256 of its own canonical content, so no change to either file goes
unnoticed. docs/format.md describes every field.

Validation is the published JSON Schema (``kvquant_config.schema.json``, shipped in this package; the copy in
docs/ is the same file), checked with ``jsonschema``, plus what a schema cannot say: the checksums, the number of
layers, ascending centroids, and the tensors' names, shapes and values. Every problem raises
:class:`KVQuantConfigError`, which names the file, the field and the remedy.

This module moves between files and plain values (``KVQuantConfig``'s fields); the config type itself is
:mod:`.kvquant_config`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import math
import os
import re
from importlib import resources
from pathlib import Path

import torch

from ..calibration.fingerprint import ModelFingerprint
from ..calibration.fit import LayerCalibration
from ..quant.codebook import Codebook
from .errors import RECALIBRATE, KVQuantConfigError

FORMAT_VERSION = 2  # the newest version this package reads and writes
SINGLE_WIDTH_VERSION = 1  # one width for every layer; what every config without per-layer widths is written as
MIXED_WIDTH_VERSION = 2  # adds ``layer_bits``: one width per layer
CONFIG_NAME = "kvquant_config.json"
TENSORS_NAME = "kvquant_calibration.safetensors"
SCHEMA_NAME = "kvquant_config.schema.json"
CHECKSUM_FIELD = "content_sha256"
CODEBOOK_KINDS = ("nuq", "nuq-unweighted", "uniform")

_HAND_EDITED = (
    "download or copy the file again; to change a config, load it with KVQuantConfig.from_pretrained, edit the "
    "object and save_pretrained it (sink_tokens and recent_window can be overridden in cache_config instead)"
)
_FOREIGN = "the file was written by another tool or a newer package; upgrade transformers-kvquant or " + RECALIBRATE


def datatype_name(bits: int, outlier_fraction: float, layer_bits: list[int] | None = None) -> str:
    """``nuq3-1%`` (one width) or ``nuq-mix3.33-1%`` (per-layer widths, their mean): how configs are named in
    tables, logs and commit messages."""
    pct = f"{outlier_fraction * 100:g}%"
    head = f"nuq-mix{sum(layer_bits) / len(layer_bits):.3g}" if layer_bits else f"nuq{bits}"
    return head + (f"-{pct}" if outlier_fraction else "")


def format_version_of(layer_bits: list[int] | None) -> int:
    """The version a config is written as: 2 only when it holds per-layer widths, so a single-width config's file
    stays byte for byte what older packages wrote and read."""
    return MIXED_WIDTH_VERSION if layer_bits else SINGLE_WIDTH_VERSION


# --------------------------------------------------------------------------------------------- the schema
@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The published JSON Schema of ``kvquant_config.json`` (docs/kvquant_config.schema.json)."""
    return json.loads(resources.files(__package__).joinpath(SCHEMA_NAME).read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _validator():
    import jsonschema

    # JSON integers only: jsonschema's default "integer" also accepts 1.0, which the format never holds.
    strict = jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", lambda checker, value: isinstance(value, int) and not isinstance(value, bool)
    )
    return jsonschema.validators.extend(jsonschema.Draft202012Validator, type_checker=strict)(schema())


# What a damaged or foreign file breaks: reported before the checksum (which such a file fails as well), so the
# error names the field. Everything else the schema checks (values) is reported after it.
_STRUCTURE = ("required", "type", "additionalProperties")


def _schema_problems(data: dict) -> tuple[list, list]:
    """The schema's complaints about ``data``: ``(structure, values)``, each the shallowest first."""
    errors = sorted(_validator().iter_errors(data), key=lambda e: len(e.absolute_path))  # stable: schema order
    return [e for e in errors if e.validator in _STRUCTURE], [e for e in errors if e.validator not in _STRUCTURE]


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _explain(error, data: dict) -> tuple[str, str, str]:
    """``(message, field, remedy)`` of a jsonschema error, in the words the loader has always used."""
    message, field = _message(error, data)
    return message, field, _FOREIGN if error.validator == "additionalProperties" else RECALIBRATE


def _message(error, data: dict) -> tuple[str, str]:
    path, value, rule, here = list(error.absolute_path), error.instance, error.validator, error.schema
    field = _field(path)
    name = str(path[-1]) if path else ""
    if rule == "required":
        missing = next(p for p in error.validator_value if p not in value)
        if not path and missing == "layer_bits":
            return "is missing: format_version 2 holds one width per layer in layer_bits", "layer_bits"
        return "is missing", _field([*path, missing])
    if rule == "additionalProperties":
        extra = next(k for k in value if k not in here.get("properties", {}))
        return f"is not a field of format_version {data.get('format_version', FORMAT_VERSION)}", _field([*path, extra])
    if field == "format_version" and rule == "const":
        return f"is {value}, but the file holds per-layer widths (layer_bits), which need format_version 2", field
    if rule == "type":
        if path and isinstance(path[-1], int) and error.validator_value == "number":
            return "must hold numbers only", _field(path[:-1])  # name the list, as for a list of centroids
        return f"must be {_type_phrase(error.validator_value)}, got {_json_type_name(value)}", field
    if rule == "enum":
        return f"must be one of {tuple(error.validator_value)}, got {value!r}", field
    if rule == "const":
        return f"must be {error.validator_value!r}, got {value!r}", field
    if "minimum" in here and "exclusiveMaximum" in here and rule in ("minimum", "exclusiveMaximum"):
        return f"must be in [{here['minimum']:g}, {here['exclusiveMaximum']:g}), got {value}", field
    if rule == "minimum":
        return ("must be positive" if here["minimum"] == 1 else f"must be >= {here['minimum']}") + f", got {value}", field
    if field == "layer_bits" and rule == "minItems":
        return f"has {len(value)} entries, fingerprint.num_layers is {data['fingerprint']['num_layers']}", field
    if field.startswith("layer_bits[") and rule == "enum":
        return f"must be one of {tuple(error.validator_value)} (a layer's key and value width), got {value!r}", field
    if rule in ("minItems", "maxItems") and name.endswith("_centroids"):
        bits = data["bits"]
        return f"has {len(value)} centroids, {bits} bits need {2**bits}", field
    if rule == "minItems" and field == "layers":
        return f"has {len(value)} entries, fingerprint.num_layers is {data['fingerprint']['num_layers']}", field
    if rule in ("minItems", "maxItems") and name.endswith("_qnorm"):
        return "must be [scale, offset]", field
    if field == "tensors.file":
        return f"must be a bare file name beside the config, got {value!r}", field
    if name.endswith("sha256"):
        return "must be 64 lowercase hex digits", field
    return f"is invalid ({error.message})", field


def _type_phrase(types) -> str:
    names = {"integer": "an integer", "number": "a number", "string": "a string", "boolean": "a boolean", "object": "an object", "array": "a list", "null": "null"}
    types = [types] if isinstance(types, str) else list(types)
    return " or ".join(names.get(t, t) for t in types)


def _json_type_name(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# --------------------------------------------------------------------------------------------- writing
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
    # The whole document against the schema (the two sha256 are not known yet: any well-formed digest stands in).
    sealed = {**data, "tensors": {**data["tensors"], "sha256": "0" * 64}, CHECKSUM_FIELD: "0" * 64}
    problems = [e for group in _schema_problems(sealed) for e in group]
    if problems:
        message, field, _ = _explain(problems[0], sealed)
        raise fail(message, field)

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


def content_sha256(data: dict) -> str:
    """sha256 of the canonical JSON (sorted keys, no whitespace, ASCII) of every field except ``content_sha256``.

    Any change to a value, however small, changes it; re-indenting or reordering the file does not.
    """
    body = {k: v for k, v in data.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


# --------------------------------------------------------------------------------------------- reading
def read_config_files(config_path: str | os.PathLike, tensors_locator=None) -> dict:
    """Parse and validate a ``kvquant_config.json`` and its tensor file; return ``KVQuantConfig``'s fields.

    ``tensors_locator(name) -> path`` finds the tensor file (default: beside the JSON). Every problem raises
    :class:`KVQuantConfigError` naming the file, the field and the remedy.
    """
    path = Path(config_path)

    def fail(message, field, remedy):
        return KVQuantConfigError(message, file=path, field=field, remedy=remedy)

    try:
        return _read(path, tensors_locator, fail)
    except KVQuantConfigError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, OverflowError, RecursionError, RuntimeError) as e:
        # The checks in _read are meant to catch every bad input first; this keeps the one-exception-type promise.
        raise fail(f"invalid content ({type(e).__name__}: {e})", None, RECALIBRATE) from e


def _read(path: Path, tensors_locator, fail) -> dict:
    data = _parse(path, fail)
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
    structure, values = _schema_problems(data)
    if structure:
        raise fail(*_explain(structure[0], data))
    # 2. Integrity: any change to any value since the file was written.
    if data[CHECKSUM_FIELD] != content_sha256(data):
        raise fail("does not match the file's content: the file was changed or damaged after it was written", CHECKSUM_FIELD, _HAND_EDITED)
    # 3. Values: the rest of the schema, then what it cannot express.
    if values:
        raise fail(*_explain(values[0], data))
    bits, fp = data["bits"], data["fingerprint"]
    if len(data["layers"]) != fp["num_layers"]:
        raise fail(f"has {len(data['layers'])} entries, fingerprint.num_layers is {fp['num_layers']}", "layers", RECALIBRATE)
    layer_bits = data.get("layer_bits")
    if layer_bits is not None:
        if len(layer_bits) != fp["num_layers"]:
            raise fail(f"has {len(layer_bits)} entries, fingerprint.num_layers is {fp['num_layers']} (one width per layer)",
                       "layer_bits", RECALIBRATE)
        if bits != max(layer_bits):
            raise fail(f"is {bits}, but the widest layer in layer_bits has {max(layer_bits)} bits (bits is the widest width)",
                       "bits", RECALIBRATE)
    fingerprint = ModelFingerprint(**{**fp, "weights_signature": _floats(fp.get("weights_signature"))})

    tensors = _read_tensor_file(path, data["tensors"], tensors_locator, fail)
    shape = (fingerprint.num_key_value_heads, fingerprint.head_dim)
    layers = []
    for i, lj in enumerate(data["layers"]):
        books = []
        for kind in ("key", "value"):
            cents = _floats(lj[f"{kind}_centroids"])
            if layer_bits is not None and len(cents) != 2 ** layer_bits[i]:
                raise fail(f"has {len(cents)} centroids, but layer_bits[{i}] is {layer_bits[i]}, which needs {2 ** layer_bits[i]}",
                           f"layers[{i}].{kind}_centroids", RECALIBRATE)
            if any(b < a for a, b in itertools.pairwise(cents)):
                raise fail("centroids must be sorted ascending", f"layers[{i}].{kind}_centroids", RECALIBRATE)
            scale, offset = _floats(lj[f"{kind}_qnorm"])
            books.append(Codebook(torch.tensor(cents, dtype=torch.float32), scale, offset))
        ranges = [_key_range(tensors, f"layers.{i}.{name}", shape, data["tensors"]["file"], fail) for name in ("key_zero", "key_scale")]
        if (ranges[1] <= 0).any():
            raise fail("key scales must be positive", f"layers.{i}.key_scale", RECALIBRATE)
        layers.append(LayerCalibration(books[0], books[1], ranges[0], ranges[1]))
    return {
        "bits": bits,
        "layer_bits": None if layer_bits is None else list(layer_bits),
        "outlier_fraction": float(data["outlier_fraction"]),
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


def _parse(path: Path, fail) -> dict:
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
    return data


def _floats(values: list | None) -> list[float] | None:
    """A list of JSON numbers (already validated as such) as Python floats."""
    return None if values is None else [float(v) for v in values]


def _key_range(tensors: dict, name: str, shape: tuple, file: str, fail) -> torch.Tensor:
    if name not in tensors:
        raise fail(f"tensor {name} is missing from {file}", name, RECALIBRATE)
    t = tensors[name]
    if not t.is_floating_point():
        raise fail(f"tensor {name} has dtype {t.dtype}, expected float32", name, RECALIBRATE)
    t = t.float()
    if tuple(t.shape) != shape:
        raise fail(f"tensor {name} has shape {tuple(t.shape)}, expected {shape}", name, RECALIBRATE)
    if not torch.isfinite(t).all():
        raise fail(f"tensor {name} holds NaN or inf", name, RECALIBRATE)
    return t


def _read_tensor_file(path: Path, meta: dict, tensors_locator, fail) -> dict:
    """Find the tensor file named in ``tensors``, check its sha256 and load it."""
    name = meta["file"]
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
