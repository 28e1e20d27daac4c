"""`KVQuantConfig`: calibrated codebooks and key ranges for one model, and its `kvquant_config.json` format.

The JSON holds everything small (settings, per-layer codebooks and Q-Norm, the model fingerprint, calibration
metadata); the per-channel key ranges live in ``kvquant_calibration.safetensors`` beside it, named in the JSON
with its sha256. Loading validates every field and raises :class:`KVQuantConfigError`, which names the file, the
field and the remedy. This module does not import transformers: model configs are read by attribute.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .quant.codebook import Codebook
from .quant.quantizer import ChannelKeyQuantizer, TokenQuantizer, outlier_slots

FORMAT_VERSION = 1
CONFIG_NAME = "kvquant_config.json"
TENSORS_NAME = "kvquant_calibration.safetensors"
SUPPORTED_BITS = (2, 3, 4)


class KVQuantConfigError(ValueError):
    """A kvquant config is missing, malformed, corrupted or does not belong to the model."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, field: str | None = None, remedy: str | None = None):
        self.file = str(file) if file is not None else None
        self.field = field
        self.remedy = remedy
        parts = []
        if self.file:
            parts.append(f"{self.file}")
        if field:
            parts.append(f"field '{field}'")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if remedy:
            text += f" ({remedy})"
        super().__init__(text)


RECALIBRATE = "re-create it with `kvquant calibrate MODEL --bits B --outliers F -o DIR`"


@dataclass
class ModelFingerprint:
    """What a config must match: the attention geometry and RoPE of the model it was calibrated for."""

    architecture: str
    model_type: str
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    rope: dict
    model_id: str | None = None
    revision: str | None = None
    weights_signature: list[float] | None = None

    MATCHED_FIELDS = ("model_type", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "rope")

    @classmethod
    def from_model_config(cls, config: Any, model_id: str | None = None, revision: str | None = None) -> ModelFingerprint:
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        heads = int(text.num_attention_heads)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        archs = getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")]
        return cls(
            architecture=str(archs[0]),
            model_type=str(text.model_type),
            num_layers=int(text.num_hidden_layers),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(text, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            hidden_size=int(text.hidden_size),
            rope=_rope_summary(text),
            model_id=model_id,
            revision=revision,
        )

    @classmethod
    def from_model(cls, model: Any) -> ModelFingerprint:
        """Fingerprint of a loaded model: its config geometry, Hub id when known, and a weights signature."""
        name = str(getattr(model, "name_or_path", "") or "")
        model_id = name if _is_hub_id(name) else None
        fp = cls.from_model_config(model.config, model_id=model_id)
        fp.weights_signature = weights_signature(model)
        return fp

    def mismatches(self, other: ModelFingerprint) -> list[str]:
        """Names and values of matched fields that differ (empty when the configs fit the same model)."""
        out = []
        for name in self.MATCHED_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            if name == "rope":
                same = _rope_equal(a, b)
            else:
                same = a == b
            if not same:
                out.append(f"{name}: config has {a!r}, model has {b!r}")
        if self.model_id and other.model_id and self.model_id != other.model_id:
            out.append(f"model_id: config has {self.model_id!r}, model is {other.model_id!r}")
        a, b = self.weights_signature, other.weights_signature
        if a and b and (len(a) != len(b) or any(not math.isclose(x, y, rel_tol=SIGNATURE_RTOL) for x, y in zip(a, b))):
            out.append("weights_signature: the model's weights differ from those the config was calibrated on")
        return out

    def to_dict(self) -> dict:
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "rope": self.rope,
            "model_id": self.model_id,
            "revision": self.revision,
            "weights_signature": self.weights_signature,
        }


SIGNATURE_RTOL = 2e-3  # fp32, bf16 and fp16 loads of the same weights agree far closer than this


def weights_signature(model: Any) -> list[float] | None:
    """Per-KV-head norms of the first and last layer's ``k_proj`` weights: tells checkpoints of one shape apart.

    Norms over hundreds of thousands of weights barely move with the load dtype, unlike a byte hash.
    """
    weights = [p for n, p in model.named_parameters() if n.endswith("k_proj.weight")]
    if not weights:
        return None
    text = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    out = []
    for w in (weights[0], weights[-1]):
        if w.device.type == "meta":
            return None
        norms = w.detach().float().reshape(heads, -1).norm(dim=1)
        out.extend(float(f"{v:.6g}") for v in norms.tolist())
    return out


def _is_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def _rope_summary(text_config) -> dict:
    params = getattr(text_config, "rope_parameters", None)
    if params is None:
        params = {"rope_theta": getattr(text_config, "rope_theta", 10000.0), "rope_type": "default"}
        scaling = getattr(text_config, "rope_scaling", None)
        if scaling:
            params.update(scaling)
    # Per-layer-type dicts (e.g. {"full_attention": {...}}) are kept as they are.
    return json.loads(json.dumps(dict(params), default=float))


def _rope_equal(a: dict, b: dict) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if not math.isclose(float(x), float(y), rel_tol=1e-6):
                return False
        elif x != y:
            return False
    return True


@dataclass
class LayerCalibration:
    """Calibrated quantization parameters of one decoder layer."""

    key_codebook: Codebook
    value_codebook: Codebook
    key_zero: torch.Tensor  # [kv_heads, head_dim] float32
    key_scale: torch.Tensor  # [kv_heads, head_dim] float32


@dataclass
class KVQuantConfig:
    """Calibrated KVQuant datatypes for one model at one bit width and outlier fraction."""

    bits: int
    outlier_fraction: float
    layers: list[LayerCalibration]
    fingerprint: ModelFingerprint
    sink_tokens: int = 1
    recent_window: int = 0
    qnorm: bool = False
    key_rope: str = "pre"  # "pre" (KVQuant) or "post" (ablation: keys quantized after RoPE)
    codebook_kind: str = "nuq"  # "nuq" (Fisher-weighted k-means), "nuq-unweighted" or "uniform"
    calibration: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise KVQuantConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}", field="bits")
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise KVQuantConfigError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}", field="outlier_fraction")
        if self.key_rope not in ("pre", "post"):
            raise KVQuantConfigError(f"key_rope must be 'pre' or 'post', got {self.key_rope!r}", field="key_rope")
        if self.sink_tokens < 0 or self.recent_window < 0:
            raise KVQuantConfigError("sink_tokens and recent_window must be >= 0", field="sink_tokens")
        if len(self.layers) != self.fingerprint.num_layers:
            raise KVQuantConfigError(
                f"{len(self.layers)} calibrated layers but the fingerprint says {self.fingerprint.num_layers}", field="layers"
            )
        shape = (self.fingerprint.num_key_value_heads, self.fingerprint.head_dim)
        for i, layer in enumerate(self.layers):
            for name in ("key_codebook", "value_codebook"):
                if getattr(layer, name).bits != self.bits:
                    raise KVQuantConfigError(f"layer {i} {name} has {getattr(layer, name).bits} bits, config says {self.bits}", field=f"layers[{i}].{name}")
            if tuple(layer.key_zero.shape) != shape or tuple(layer.key_scale.shape) != shape:
                raise KVQuantConfigError(f"layer {i} key ranges must be {list(shape)}", field=f"layers.{i}.key_zero")

    # ----------------------------------------------------------------------------------------- quantizers
    @property
    def vector_size(self) -> int:
        return self.fingerprint.num_key_value_heads * self.fingerprint.head_dim

    @property
    def slots(self) -> int:
        return outlier_slots(self.outlier_fraction, self.vector_size)

    def key_quantizer(self, layer_idx: int) -> ChannelKeyQuantizer:
        layer = self.layers[layer_idx]
        return ChannelKeyQuantizer(layer.key_codebook, layer.key_zero, layer.key_scale, self.slots)

    def value_quantizer(self, layer_idx: int) -> TokenQuantizer:
        return TokenQuantizer(self.layers[layer_idx].value_codebook, self.slots)

    def check_model(self, model: Any, source: str | None = None) -> None:
        """Raise :class:`KVQuantConfigError` unless this config was calibrated for this model.

        ``model`` is a loaded model (geometry, Hub id and weights are compared) or a model config (geometry only).
        """
        is_model = hasattr(model, "named_parameters")
        other = ModelFingerprint.from_model(model) if is_model else ModelFingerprint.from_model_config(model)
        bad = self.fingerprint.mismatches(other)
        if bad:
            raise KVQuantConfigError(
                "calibrated for a different model (" + "; ".join(bad) + ")",
                file=source,
                field="fingerprint",
                remedy="calibrate this model with `kvquant calibrate MODEL ...` or pass the config made for it",
            )

    def with_runtime(self, **overrides) -> KVQuantConfig:
        """Copy with runtime settings changed (sink_tokens, recent_window); calibrated fields stay fixed."""
        allowed = {"sink_tokens", "recent_window"}
        unknown = set(overrides) - allowed
        if unknown:
            raise KVQuantConfigError(f"cannot override {sorted(unknown)} at run time (only {sorted(allowed)})")
        data = dict(self.__dict__)
        data.update(overrides)
        return KVQuantConfig(**data)

    @property
    def name(self) -> str:
        pct = f"{self.outlier_fraction * 100:g}%"
        return f"nuq{self.bits}" + (f"-{pct}" if self.outlier_fraction else "")

    # ----------------------------------------------------------------------------------------- files
    def to_json_dict(self, tensors_sha256: str) -> dict:
        return {
            "format_version": self.format_version,
            "bits": self.bits,
            "outlier_fraction": self.outlier_fraction,
            "sink_tokens": self.sink_tokens,
            "recent_window": self.recent_window,
            "qnorm": self.qnorm,
            "key_rope": self.key_rope,
            "codebook_kind": self.codebook_kind,
            "fingerprint": self.fingerprint.to_dict(),
            "layers": [
                {
                    "key_centroids": layer.key_codebook.centroids.tolist(),
                    "value_centroids": layer.value_codebook.centroids.tolist(),
                    "key_qnorm": [layer.key_codebook.qnorm_scale, layer.key_codebook.qnorm_offset],
                    "value_qnorm": [layer.value_codebook.qnorm_scale, layer.value_codebook.qnorm_offset],
                }
                for layer in self.layers
            ],
            "calibration": self.calibration,
            "tensors": {"file": TENSORS_NAME, "sha256": tensors_sha256},
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``kvquant_config.json`` and ``kvquant_calibration.safetensors`` into a directory."""
        from safetensors.torch import save_file

        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.key_zero"] = layer.key_zero.float().contiguous().cpu()
            tensors[f"layers.{i}.key_scale"] = layer.key_scale.float().contiguous().cpu()
        tpath = out / TENSORS_NAME
        save_file(tensors, str(tpath), metadata={"format": "pt", "kvquant_format_version": str(self.format_version)})
        sha = _sha256(tpath)
        cpath = out / CONFIG_NAME
        text = json.dumps(self.to_json_dict(sha), indent=1, allow_nan=False)
        cpath.write_text(text + "\n")
        return cpath

    @classmethod
    def from_pretrained(cls, path_or_repo: str | os.PathLike, **hub_kwargs) -> KVQuantConfig:
        """Load from a directory, a path to ``kvquant_config.json``, or a Hub repo id (see :mod:`.hub`)."""
        from .hub import resolve_config_files

        config_path, tensors_locator = resolve_config_files(path_or_repo, **hub_kwargs)
        return load_config_file(config_path, tensors_locator)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- loading
_REQUIRED = {
    "format_version": int,
    "bits": int,
    "outlier_fraction": (int, float),
    "sink_tokens": int,
    "recent_window": int,
    "qnorm": bool,
    "key_rope": str,
    "fingerprint": dict,
    "layers": list,
    "tensors": dict,
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


def load_config_file(config_path: str | os.PathLike, tensors_locator=None) -> KVQuantConfig:
    """Parse and validate a ``kvquant_config.json``; ``tensors_locator(name) -> path`` finds the sidecar."""
    path = Path(config_path)
    fail = _failer(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise fail(f"cannot read the file ({e.strerror})", None, "check the path") from e
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as e:
        raise fail(f"not valid JSON ({e}); the file is truncated or corrupted", None, "download or " + RECALIBRATE) from e
    if not isinstance(data, dict):
        raise fail("the top level must be a JSON object", None, RECALIBRATE)
    version = data.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise fail(
            f"format_version {version} is newer than this package reads ({FORMAT_VERSION})",
            "format_version",
            "upgrade transformers-kvquant (`pip install -U transformers-kvquant`)",
        )
    _check_fields(data, _REQUIRED, "", fail)
    if version < 1:
        raise fail(f"format_version must be >= 1, got {version}", "format_version", RECALIBRATE)
    _check_fields(data["fingerprint"], _FINGERPRINT_REQUIRED, "fingerprint.", fail)
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
    fp = data["fingerprint"]
    for name in ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size"):
        if fp[name] <= 0:
            raise fail(f"must be positive, got {fp[name]}", f"fingerprint.{name}", RECALIBRATE)
    signature = fp.get("weights_signature")
    if signature is not None:
        signature = _float_list(signature if isinstance(signature, list) else [None], "fingerprint.weights_signature", fail)
    fingerprint = ModelFingerprint(
        **{k: fp[k] for k in _FINGERPRINT_REQUIRED},
        model_id=fp.get("model_id"),
        revision=fp.get("revision"),
        weights_signature=signature,
    )
    layers_json = data["layers"]
    if len(layers_json) != fingerprint.num_layers:
        raise fail(f"has {len(layers_json)} entries, fingerprint.num_layers is {fingerprint.num_layers}", "layers", RECALIBRATE)

    tensors_meta = data["tensors"]
    _check_fields(tensors_meta, {"file": str, "sha256": str}, "tensors.", fail)
    if os.path.basename(tensors_meta["file"]) != tensors_meta["file"]:
        raise fail("must be a bare file name beside the config", "tensors.file", RECALIBRATE)
    tpath = Path(tensors_locator(tensors_meta["file"])) if tensors_locator else path.parent / tensors_meta["file"]
    if not tpath.is_file():
        raise fail(f"the tensor file {tensors_meta['file']} is missing", "tensors.file", "copy it beside the config or " + RECALIBRATE)
    sha = _sha256(tpath)
    if sha != tensors_meta["sha256"]:
        raise fail(
            f"sha256 of {tpath.name} is {sha[:12]}…, the config expects {tensors_meta['sha256'][:12]}…",
            "tensors.sha256",
            "the files do not belong together or one is corrupted; download both again or " + RECALIBRATE,
        )
    tensors = _load_tensors(tpath, fail)
    shape = (fingerprint.num_key_value_heads, fingerprint.head_dim)
    layers = []
    for i, lj in enumerate(layers_json):
        prefix = f"layers[{i}]."
        if not isinstance(lj, dict):
            raise fail("must be an object", f"layers[{i}]", RECALIBRATE)
        _check_fields(lj, {"key_centroids": list, "value_centroids": list, "key_qnorm": list, "value_qnorm": list}, prefix, fail)
        books = []
        for kind in ("key", "value"):
            cents = _float_list(lj[f"{kind}_centroids"], prefix + f"{kind}_centroids", fail)
            if len(cents) != 2**bits:
                raise fail(f"has {len(cents)} centroids, {bits} bits need {2**bits}", prefix + f"{kind}_centroids", RECALIBRATE)
            if any(b < a for a, b in zip(cents, cents[1:])):
                raise fail("centroids must be sorted ascending", prefix + f"{kind}_centroids", RECALIBRATE)
            qn = _float_list(lj[f"{kind}_qnorm"], prefix + f"{kind}_qnorm", fail)
            if len(qn) != 2:
                raise fail("must be [scale, offset]", prefix + f"{kind}_qnorm", RECALIBRATE)
            books.append(Codebook(torch.tensor(cents, dtype=torch.float32), qn[0], qn[1]))
        ranges = []
        for name in ("key_zero", "key_scale"):
            tname = f"layers.{i}.{name}"
            if tname not in tensors:
                raise fail(f"tensor {tname} is missing from {tpath.name}", tname, RECALIBRATE)
            t = tensors[tname].float()
            if tuple(t.shape) != shape:
                raise fail(f"tensor {tname} has shape {tuple(t.shape)}, expected {shape}", tname, RECALIBRATE)
            if not torch.isfinite(t).all():
                raise fail(f"tensor {tname} holds NaN or inf", tname, RECALIBRATE)
            ranges.append(t)
        if (ranges[1] <= 0).any():
            raise fail("key scales must be positive", f"layers.{i}.key_scale", RECALIBRATE)
        layers.append(LayerCalibration(books[0], books[1], ranges[0], ranges[1]))
    calibration = data.get("calibration", {})
    if not isinstance(calibration, dict):
        raise fail("must be an object", "calibration", RECALIBRATE)
    try:
        return KVQuantConfig(
            bits=bits,
            outlier_fraction=frac,
            layers=layers,
            fingerprint=fingerprint,
            sink_tokens=data["sink_tokens"],
            recent_window=data["recent_window"],
            qnorm=data["qnorm"],
            key_rope=data["key_rope"],
            codebook_kind=str(data.get("codebook_kind", "nuq")),
            calibration=calibration,
            format_version=version,
        )
    except KVQuantConfigError as e:
        raise fail(str(e), e.field, RECALIBRATE) from e


def _failer(path):
    def fail(message, field, remedy):
        return KVQuantConfigError(message, file=path, field=field, remedy=remedy)

    return fail


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed (NaN/inf values)")


def _check_fields(data: dict, spec: dict, prefix: str, fail) -> None:
    for name, typ in spec.items():
        if name not in data:
            raise fail("is missing", prefix + name, RECALIBRATE)
        value = data[name]
        if isinstance(value, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
            raise fail(f"must be {_type_name(typ)}, got a boolean", prefix + name, RECALIBRATE)
        if not isinstance(value, typ):
            raise fail(f"must be {_type_name(typ)}, got {type(value).__name__}", prefix + name, RECALIBRATE)


def _type_name(typ) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", dict: "an object", list: "a list"}
    if isinstance(typ, tuple):
        return "a number"
    return names.get(typ, typ.__name__)


def _float_list(value, name, fail) -> list[float]:
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise fail("must hold numbers only", name, RECALIBRATE)
        if not math.isfinite(v):
            raise fail("holds NaN or inf", name, RECALIBRATE)
        out.append(float(v))
    return out


def _load_tensors(tpath: Path, fail) -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise fail(f"cannot read {tpath.name} ({e})", "tensors.file", RECALIBRATE) from e
