"""`KVQuantConfig`: calibrated codebooks and key ranges for one model, and the functions that give or take one.

:class:`KVQuantConfig` is built from a calibration (:meth:`KVQuantConfig.from_calibration`), written and read in
the ``kvquant_config.json`` format (:mod:`.format`), and moved to and from the Hub (:mod:`.hub`, which works on
files and never imports this module): :func:`load_config_file`, :func:`push_config` and :func:`pull_config`.
Nothing here imports transformers: model configs are read by attribute.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calibration.fingerprint import ModelFingerprint
from ..calibration.fit import CalibrationResult, LayerCalibration, layer_quantizers
from ..kernels.layout import SUPPORTED_BITS
from ..kernels.layout import outlier_slots as head_outlier_slots
from ..quant.quantizer import ChannelKeyQuantizer, TokenQuantizer, outlier_slots
from .errors import RECALIBRATE, KVQuantConfigError
from .format import (
    CODEBOOK_KINDS,
    CONFIG_NAME,
    TENSORS_NAME,
    datatype_name,
    format_version_of,
    read_config_files,
    write_config_files,
)
from .hub import resolve_config_files, upload_config_files


@dataclass
class KVQuantConfig:
    """Calibrated KVQuant datatypes for one model at one bit width (or one width per layer) and outlier fraction.

    ``layer_bits`` (mixed precision): the width of each layer's keys and values; ``bits`` is then the widest.
    None: every layer has ``bits``.
    """

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
    format_version: int = 1  # derived from layer_bits (see format_version_of); kept for readers of the field
    layer_bits: list[int] | None = None

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise KVQuantConfigError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}", field="bits")
        if self.layer_bits is not None:
            self.layer_bits = [int(b) for b in self.layer_bits]
            if len(self.layer_bits) != len(self.layers):
                raise KVQuantConfigError(
                    f"layer_bits has {len(self.layer_bits)} entries for {len(self.layers)} layers; give one width per layer",
                    field="layer_bits")
            bad = [(i, b) for i, b in enumerate(self.layer_bits) if b not in SUPPORTED_BITS]
            if bad:
                raise KVQuantConfigError(f"layer_bits[{bad[0][0]}] is {bad[0][1]}; widths must be one of {SUPPORTED_BITS}",
                                         field=f"layer_bits[{bad[0][0]}]")
            if self.bits != max(self.layer_bits):
                raise KVQuantConfigError(f"bits is {self.bits} but the widest layer has {max(self.layer_bits)}; bits must be the widest width",
                                         field="bits")
        self.format_version = format_version_of(self.layer_bits)
        if not 0.0 <= self.outlier_fraction < 0.5:
            raise KVQuantConfigError(f"outlier_fraction must be in [0, 0.5), got {self.outlier_fraction}", field="outlier_fraction")
        if self.codebook_kind not in CODEBOOK_KINDS:
            raise KVQuantConfigError(f"codebook_kind must be one of {CODEBOOK_KINDS}, got {self.codebook_kind!r}", field="codebook_kind")
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
            width = self.layer_width(i)
            for name in ("key_codebook", "value_codebook"):
                if getattr(layer, name).bits != width:
                    said = f"layer_bits[{i}] says" if self.layer_bits else "config says"
                    raise KVQuantConfigError(f"layer {i} {name} has {getattr(layer, name).bits} bits, {said} {width}", field=f"layers[{i}].{name}")
            if tuple(layer.key_zero.shape) != shape or tuple(layer.key_scale.shape) != shape:
                raise KVQuantConfigError(f"layer {i} key ranges must be {list(shape)}", field=f"layers.{i}.key_zero")

    @classmethod
    def from_calibration(cls, result: CalibrationResult) -> KVQuantConfig:
        """The config of a fitted calibration (:func:`~transformers_kvquant.calibration.fit_calibration`)."""
        return cls(
            bits=result.bits,
            outlier_fraction=result.outlier_fraction,
            layers=list(result.layers),
            fingerprint=result.fingerprint,
            sink_tokens=result.sink_tokens,
            qnorm=result.qnorm,
            key_rope=result.key_rope,
            codebook_kind=result.codebook_kind,
            calibration=dict(result.metadata),
            layer_bits=None if result.layer_bits is None else list(result.layer_bits),
        )

    def layer_width(self, layer_idx: int) -> int:
        """Bits of one layer's keys and values (``bits`` unless the config holds per-layer widths)."""
        return self.layer_bits[layer_idx] if self.layer_bits else self.bits

    # ----------------------------------------------------------------------------------------- quantizers
    @property
    def vector_size(self) -> int:
        return self.fingerprint.num_key_value_heads * self.fingerprint.head_dim

    @property
    def slots(self) -> int:
        """Value outliers per token vector of the uncapped layout."""
        return outlier_slots(self.outlier_fraction, self.vector_size)

    @property
    def head_slots(self) -> int:
        """Outliers per (token, KV head) of the bounded layout, for keys and for values: ``ceil(f * head_dim)``."""
        return head_outlier_slots(self.fingerprint.head_dim, self.outlier_fraction)

    def key_quantizer(self, layer_idx: int, bounded: bool = True, slots: int | None = None) -> ChannelKeyQuantizer:
        """Keys of one layer; ``bounded=False``: the paper's uncapped outliers; ``slots``: bounded outliers per
        (token, KV head) other than ``head_slots``."""
        layer = self.layers[layer_idx]
        if bounded:
            return layer_quantizers(layer, self.outlier_fraction, self.fingerprint.head_dim, slots)[0]
        return ChannelKeyQuantizer(layer.key_codebook, layer.key_zero, layer.key_scale, outliers=self.outlier_fraction > 0, head_slots=None)

    def value_quantizer(self, layer_idx: int, bounded: bool = True, slots: int | None = None) -> TokenQuantizer:
        """Values of one layer; ``bounded=False``: outliers chosen over the whole token vector."""
        if bounded:
            return layer_quantizers(self.layers[layer_idx], self.outlier_fraction, self.fingerprint.head_dim, slots)[1]
        return TokenQuantizer(self.layers[layer_idx].value_codebook, self.slots)

    def check_model(self, model: Any, source: str | None = None) -> None:
        """Raise :class:`KVQuantConfigError` unless this config was calibrated for this model.

        ``model`` is a loaded model (geometry, Hub id and weights are compared) or a model config (geometry only).
        """
        is_model = hasattr(model, "named_parameters")
        other = ModelFingerprint.from_model(model) if is_model else ModelFingerprint.from_model_config(model)
        bad = self.fingerprint.mismatched_fields(other)
        if bad:
            raise KVQuantConfigError(
                "calibrated for a different model (" + "; ".join(f"fingerprint.{n}: {t}" for n, t in bad) + ")",
                file=source,
                field=f"fingerprint.{bad[0][0]}",
                remedy="calibrate this model with `kvquant calibrate MODEL ... -o DIR` or pass the config made for it",
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
        """``nuq3-1%``: bits and outlier fraction (``nuq-mix3.33-1%`` with per-layer widths: their mean)."""
        return datatype_name(self.bits, self.outlier_fraction, self.layer_bits)

    # ----------------------------------------------------------------------------------------- files
    def __eq__(self, other: object) -> bool:
        """Equal when every field, codebook and key-range tensor is identical."""
        if not isinstance(other, KVQuantConfig):
            return NotImplemented
        if self.to_json_dict("") != other.to_json_dict(""):
            return False
        return all(
            torch.equal(a.key_zero.float().cpu(), b.key_zero.float().cpu())
            and torch.equal(a.key_scale.float().cpu(), b.key_scale.float().cpu())
            for a, b in zip(self.layers, other.layers)
        )

    __hash__ = None  # mutable, holds tensors

    def to_json_dict(self, tensors_sha256: str) -> dict:
        """The JSON content of ``kvquant_config.json`` without its ``content_sha256`` (see docs/format.md).

        ``layer_bits`` (and version 2) only when the config has per-layer widths: a single-width config is written
        exactly as format_version 1 always was."""
        head = {"format_version": format_version_of(self.layer_bits), "bits": self.bits}
        if self.layer_bits:
            head["layer_bits"] = list(self.layer_bits)
        return {
            **head,
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

    def tensors(self) -> dict[str, torch.Tensor]:
        """Copies of the per-channel key ranges as stored in ``kvquant_calibration.safetensors`` (float32, CPU)."""
        out = {}
        for i, layer in enumerate(self.layers):
            out[f"layers.{i}.key_zero"] = layer.key_zero.detach().to("cpu", torch.float32, copy=True).contiguous()
            out[f"layers.{i}.key_scale"] = layer.key_scale.detach().to("cpu", torch.float32, copy=True).contiguous()
        return out

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``kvquant_config.json`` and ``kvquant_calibration.safetensors`` into a directory.

        Refuses (with :class:`KVQuantConfigError`) values that loading would reject, so every written config loads.
        Each file is written under a temporary name and renamed, so a crash never leaves a half-written config.
        """
        return write_config_files(save_directory, self.to_json_dict(""), self.tensors())

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo: str | os.PathLike,
        revision: str | None = None,
        subfolder: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
    ) -> KVQuantConfig:
        """Load and validate a config from a folder, a ``kvquant_config.json`` path, or a Hub repo id.

        Hub repos go through huggingface_hub's download cache: this works offline (``HF_HUB_OFFLINE=1``) once the
        files are cached, and honours ``HF_ENDPOINT``. Raises :class:`KVQuantConfigError` for anything missing,
        corrupted or malformed.
        """
        config_path, tensors_locator = resolve_config_files(
            path_or_repo,
            revision=revision,
            subfolder=subfolder,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
        )
        return load_config_file(config_path, tensors_locator)

    def push_to_hub(self, repo_id: str, **options):
        """Upload ``kvquant_config.json`` and its tensor file to a Hub repo in one commit.

        ``options`` are :func:`push_config`'s (``revision``, ``token``, ``commit_message``, ``create_pr``, ``private``,
        ``path_in_repo``). Works for a new repo and for adding the two files to an existing model repo: no other
        file is touched. Returns huggingface_hub's ``CommitInfo`` (a string: the commit URL; ``.pr_url`` when
        ``create_pr``).
        """
        return push_config(self, repo_id, **options)


def load_config_file(config_path: str | os.PathLike, tensors_locator=None) -> KVQuantConfig:
    """Parse and validate a ``kvquant_config.json``; ``tensors_locator(name) -> path`` finds the tensor file.

    Every problem raises :class:`KVQuantConfigError` naming the file, the field and the remedy.
    """
    fields = read_config_files(config_path, tensors_locator)
    try:
        return KVQuantConfig(**fields)
    except KVQuantConfigError as e:
        raise KVQuantConfigError(e.message, file=config_path, field=e.field, remedy=RECALIBRATE) from e


def pull_config(
    repo_id: str,
    output_dir: str | os.PathLike | None = None,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[KVQuantConfig, Path]:
    """Download (into the Hub cache), validate, and optionally copy the two files into ``output_dir``.

    Returns the config and the path of the ``kvquant_config.json`` it was read from (the copy when copied).
    """
    cfg_path, locate = resolve_config_files(repo_id, revision, subfolder, cache_dir, token, local_files_only)
    config = load_config_file(cfg_path, locate)  # never hand out files that do not load
    if output_dir is None:
        return config, Path(cfg_path)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Copy the tensor file first: a crash in between leaves no config naming a missing tensor file.
    shutil.copyfile(locate(TENSORS_NAME), out / TENSORS_NAME)
    shutil.copyfile(cfg_path, out / CONFIG_NAME)
    return config, out / CONFIG_NAME


def push_config(
    folder_or_config: str | os.PathLike | KVQuantConfig,
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    private: bool | None = None,
    path_in_repo: str | None = None,
):
    """Upload ``kvquant_config.json`` and ``kvquant_calibration.safetensors`` to ``repo_id`` in one commit.

    ``folder_or_config`` is a :class:`KVQuantConfig` or a folder (or config file) written by ``save_pretrained``;
    the files are validated before anything is sent. The repo is created if needed (``private`` applies only
    then); other files in it are never touched. ``revision`` names a branch (created from the default branch if
    missing); ``create_pr=True`` opens a pull request against the default branch instead; ``path_in_repo`` puts
    the files in a sub-folder. Returns huggingface_hub's ``CommitInfo``, a ``str`` holding the commit URL.
    """
    with tempfile.TemporaryDirectory(prefix="kvquant-push-") as tmp:
        if isinstance(folder_or_config, KVQuantConfig):
            folder = folder_or_config.save_pretrained(tmp).parent
        else:
            given = Path(folder_or_config)
            folder = given.parent if given.is_file() else given
        return upload_config_files(
            folder,
            repo_id,
            revision=revision,
            token=token,
            commit_message=commit_message,
            create_pr=create_pr,
            private=private,
            path_in_repo=path_in_repo,
        )
