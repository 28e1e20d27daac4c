"""What a `KVQuantCache` is asked for (`cache_config`) and which calibrated config serves it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config.discovery import find_config, load_for_model
from ..config.errors import KVQuantConfigError
from ..config.kvquant_config import KVQuantConfig
from ..config.presets import preset_options, preset_window
from ..kernels.layout import round_capacity
from ..quant.store import FullPrecisionStore, PackedStore, StaticFullPrecisionStore
from ..quant.uncapped_store import UncappedPackedStore

logger = logging.getLogger("transformers_kvquant")

CACHE_CONFIG_KEYS = {
    "bits": "2, 3 or 4 (quantized) or 16 (the full KVQuant path without quantization)",
    "outlier_fraction": "fraction of each token's values kept exactly, e.g. 0.01 (selects the calibrated config)",
    "config": "a KVQuantConfig, a folder or file holding kvquant_config.json, or a Hub repo id",
    "sink_tokens": "leading positions kept in full precision (default: the config's, usually 1)",
    "recent_window": "newest tokens kept in full precision (default: the config's, usually 0)",
    "backend": "'auto' (Triton kernels on CUDA, reference elsewhere), 'reference' or 'triton'",
    "max_cache_len": "capacity of a static cache (fixed buffers, compileable); generate uses its own maximum length",
    "static": "True: a static cache (needs max_cache_len, or generate's length); False: a growing cache",
    "outliers": "'bounded' (default: ceil(f*head_dim) per token and head) or 'uncapped' (the paper's; reference path)",
    "outlier_slots": "bounded outliers per token and KV head, for keys and for values (default: ceil(f*head_dim))",
    "preset": "'default' (the config as shipped), 'long-context' (+ the newest 128 tokens exact at 2-3 bits, 512 at 4), 'quality' (long-context + 2 outliers per token and head) or 'paper' (no window, uncapped outliers)",
    "max_length": "preallocate storage for this many tokens (growing cache)",
    "revision": "Hub revision for config lookups",
    "local_files_only": "never download configs",
}
BACKENDS = ("auto", "reference", "triton")
OUTLIER_LAYOUTS = ("bounded", "uncapped")


@dataclass
class CacheSettings:
    bits: int
    config: KVQuantConfig | None
    sink_tokens: int
    recent_window: int
    backend: str = "auto"
    max_length: int | None = None
    source: str = ""
    max_cache_len: int | None = None
    static: bool = False
    outliers: str = "bounded"
    outlier_slots: int | None = None

    @property
    def capacity(self) -> int | None:
        """Slots of a static cache (whole blocks of the packed layout; exactly ``max_cache_len`` unquantized, as
        transformers' StaticCache), None for a growing one."""
        if not self.static:
            return None
        return self.max_cache_len if self.bits == 16 else round_capacity(self.max_cache_len)

    def make_store(self, layer_idx: int, dtype: torch.dtype, shared_positions=None):
        """The store of one layer; ``shared_positions``: the cache's :class:`~..quant.store.SharedPositions` (used by
        the bounded packed layout)."""
        if self.bits == 16:
            return StaticFullPrecisionStore(self.capacity) if self.static else FullPrecisionStore()
        check_dtype(dtype)
        cfg = self.config
        width = cfg.layer_width(layer_idx)  # each layer packs with its own width (mixed-precision configs)
        if self.outliers == "uncapped":
            return UncappedPackedStore(cfg.key_quantizer(layer_idx, bounded=False), cfg.value_quantizer(layer_idx, bounded=False),
                                       width, sink_tokens=self.sink_tokens, recent_window=self.recent_window)
        return PackedStore(
            cfg.key_quantizer(layer_idx, slots=self.outlier_slots),
            cfg.value_quantizer(layer_idx, slots=self.outlier_slots),
            width,
            sink_tokens=self.sink_tokens,
            recent_window=self.recent_window,
            capacity=self.capacity if self.static else self.max_length,
            static=self.static,
            kernels={"reference": False, "triton": True}.get(self.backend),
            shared_positions=shared_positions,
        )

    def describe(self) -> str:
        kind = f"static {self.capacity}" if self.static else "growing"
        if self.bits == 16:
            return f"bits=16 (unquantized), {kind}"
        slots = f" ({self.outlier_slots} per token and head)" if self.outlier_slots is not None else ""
        text = f"{self.config.name}, {self.outliers} outliers{slots}, sink={self.sink_tokens}, window={self.recent_window}, backend={self.backend}, {kind}"
        return text + (f", config={self.source}" if self.source else "")


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtype(dtype: torch.dtype) -> None:
    """Quantized storage keeps 16-bit side tensors derived from the model dtype: only these three have one."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the quantized KVQuant cache supports float32, float16 and bfloat16 models, got {dtype}; load the model "
            "with dtype=torch.bfloat16, torch.float16 or torch.float32 (or use cache_config={'bits': 16})"
        )


def resolve_settings(model, config=None, cache_config: dict | None = None) -> CacheSettings:
    """Validate ``cache_config`` and pick the calibrated config (explicit, beside the model, or shipped)."""
    opts = dict(cache_config or {})
    unknown = sorted(set(opts) - set(CACHE_CONFIG_KEYS))
    if unknown:
        listing = "; ".join(f"{k}: {v}" for k, v in CACHE_CONFIG_KEYS.items())
        raise ValueError(f"unknown cache_config key(s) {unknown}. Accepted keys: {listing}")
    preset = opts.pop("preset", "default")
    chosen = preset_options(preset)
    window_rule = chosen.pop("recent_window", None)  # may depend on the config's width: resolved once it is known
    for key, value in chosen.items():  # a preset fills what cache_config leaves out
        opts.setdefault(key, value)
    if config is not None and opts.get("config") is not None:
        raise ValueError("pass the KVQuant config either as an argument or as cache_config['config'], not both")
    config = config if config is not None else opts.pop("config", None)
    opts.pop("config", None)
    bits = opts.pop("bits", None)
    fraction = opts.pop("outlier_fraction", None)
    backend = opts.pop("backend", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    max_length = opts.pop("max_length", None)
    max_cache_len = opts.pop("max_cache_len", None)
    static = opts.pop("static", None)
    outliers = opts.pop("outliers", "bounded")
    slots = opts.pop("outlier_slots", None)
    if outliers not in OUTLIER_LAYOUTS:
        raise ValueError(f"cache_config['outliers'] must be one of {OUTLIER_LAYOUTS}, got {outliers!r}")
    if static is not None and not isinstance(static, bool):
        raise ValueError(f"cache_config['static'] must be True or False, got {static!r}")
    if max_cache_len is not None and (not isinstance(max_cache_len, int) or isinstance(max_cache_len, bool) or max_cache_len < 1):
        raise ValueError(f"cache_config['max_cache_len'] must be a positive integer, got {max_cache_len!r}")
    if static and max_cache_len is None:
        raise ValueError("cache_config['static']=True needs cache_config['max_cache_len'] (the capacity in tokens)")
    static = bool(max_cache_len) if static is None else static
    if static and outliers == "uncapped":
        raise ValueError("uncapped outliers have no fixed size per token, so they cannot live in a static cache; use "
                         "outliers='bounded' or static=False" + (" (the 'paper' preset stores them uncapped)" if preset == "paper" else ""))
    sink = opts.pop("sink_tokens", None)
    window = opts.pop("recent_window", None)
    for name, value in (("sink_tokens", sink), ("recent_window", window), ("max_length", max_length)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ValueError(f"cache_config['{name}'] must be a non-negative integer, got {value!r}")
    if slots is not None:
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"cache_config['outlier_slots'] must be a positive integer, got {slots!r}")
        if outliers == "uncapped":
            raise ValueError("cache_config['outlier_slots'] sets the bounded layout's outliers; uncapped outliers have no "
                             "fixed count (drop one of the two)")
    if bits is not None and bits not in (2, 3, 4, 16):
        raise ValueError(f"cache_config['bits'] must be 2, 3, 4 or 16, got {bits!r}")
    if fraction is not None and not (isinstance(fraction, (int, float)) and 0 <= fraction < 0.5):
        raise ValueError(f"cache_config['outlier_fraction'] must be a number in [0, 0.5), got {fraction!r}")

    if bits == 16:
        if config is not None:
            raise ValueError("bits=16 runs without quantization; do not pass a KVQuant config with it")
        window = preset_window(window_rule) if window is None else window
        return CacheSettings(16, None, sink or 0, window or 0, backend, max_length, "", max_cache_len, static, outliers)

    if getattr(model, "dtype", None) is not None:
        check_dtype(model.dtype)  # fail before generate starts, not at the first cache update
    hub = {k: opts.pop(k) for k in ("revision", "local_files_only") if k in opts}
    if config is not None:
        cfg, source = load_for_model(model, config, **hub)
        if bits is not None and bits != cfg.bits:
            raise KVQuantConfigError(f"the config has {cfg.bits} bits but cache_config asks for {bits}", file=source, field="bits")
        if fraction is not None and abs(fraction - cfg.outlier_fraction) > 1e-9:
            raise KVQuantConfigError(
                f"the config was calibrated with outlier_fraction={cfg.outlier_fraction}, cache_config asks for {fraction}",
                file=source,
                field="outlier_fraction",
            )
    else:
        cfg, source = find_config(model, bits=bits, outlier_fraction=fraction, **hub)
    if cfg.key_rope != "pre":
        raise KVQuantConfigError(
            "this config quantizes keys after RoPE (an ablation for `kvquant eval-ppl`); the cache stores pre-RoPE keys",
            file=source,
            field="key_rope",
        )
    logger.info("KVQuant cache uses %s (%s)", cfg.name, source)
    if window is None and window_rule is not None:
        window = preset_window(window_rule, cfg)
    return CacheSettings(
        cfg.bits,
        cfg,
        cfg.sink_tokens if sink is None else sink,
        cfg.recent_window if window is None else window,
        backend,
        max_length,
        source,
        max_cache_len,
        static,
        outliers,
        _check_slots(slots, cfg, source),
    )


def _check_slots(slots: int | None, cfg: KVQuantConfig, source: str) -> int | None:
    """``outlier_slots`` for ``cfg``: a config calibrated without outliers has ranges that hold every value (nothing
    for the slots to keep), and a head keeps at most ``(head_dim - 2) // 2`` value outliers."""
    if slots is None:
        return None
    if cfg.outlier_fraction == 0:
        raise KVQuantConfigError("cache_config['outlier_slots'] needs a config calibrated with outliers "
                                 "(outlier_fraction > 0); this one has none", file=source, field="outlier_fraction")
    most = (cfg.fingerprint.head_dim - 2) // 2
    if slots > most:
        raise ValueError(f"cache_config['outlier_slots'] is {slots}; a head of {cfg.fingerprint.head_dim} channels keeps at "
                         f"most {most}")
    return slots
