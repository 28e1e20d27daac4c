"""What a calibration belongs to: the attention geometry, RoPE and weights of one model.

A :class:`ModelFingerprint` is recorded when a model is calibrated and compared with a model before its config is
used, so codebooks are never applied to keys they were not fitted to. Model configs are read by attribute: no
transformers import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any


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
        """``"field: config has X, model has Y"`` for every matched field that differs (empty when they fit)."""
        return [f"{name}: {text}" for name, text in self.mismatched_fields(other)]

    def mismatched_fields(self, other: ModelFingerprint) -> list[tuple[str, str]]:
        """``(field, explanation)`` pairs: geometry and RoPE always; model ids when both are Hub ids; weights
        signatures when both are known. Revisions are not compared (the signature tells changed weights apart)."""
        out = []
        for name in self.MATCHED_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            same = _rope_equal(a, b) if name == "rope" else a == b
            if not same:
                out.append((name, f"config has {a!r}, model has {b!r}"))
        if self.model_id and other.model_id and self.model_id != other.model_id:
            out.append(("model_id", f"config has {self.model_id!r}, model is {other.model_id!r}"))
        a, b = self.weights_signature, other.weights_signature
        if a and b and (len(a) != len(b) or any(not math.isclose(x, y, rel_tol=SIGNATURE_RTOL) for x, y in zip(a, b))):
            out.append(("weights_signature", "the model's weights differ from those the config was calibrated on"))
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
    for k, x in a.items():
        y = b[k]
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            if not math.isclose(float(x), float(y), rel_tol=1e-6):
                return False
        elif x != y:
            return False
    return True
