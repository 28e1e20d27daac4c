"""Simulated (fake) KV quantization for teacher-forced evaluation, through the same quantizer code as the cache.

A :class:`SimulationCache` is used for one forward pass over a window. It goes through the same attention hook
as :class:`~transformers_kvquant.KVQuantCache` (pre-RoPE keys in, RoPE applied at attention time), but instead of
storing packed codes it returns quantized-then-dequantized K/V. Every query of the window sees every key quantized,
which is exactly what a prefill through the real cache sees; methods with a full-precision recent window use
streaming semantics instead (query ``i`` sees key ``j`` exactly iff ``i - j < window``), the view a token has
during generation.

Methods: ``kvquant`` (a calibrated config; keys pre- or post-RoPE; optional sink and recent window), ``int``
(uniform per-token, keys after RoPE: the paper's baseline) and ``kivi`` (keys per channel in groups of tokens,
values per token in groups of channels, recent tokens exact: KIVI's recipe).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import CacheLayerMixin

from ..config.kvquant_config import KVQuantConfig
from ..integration.patch import patch_model
from ..integration.prerope import PreRopeCache, PreRopeLayer
from ..kernels.rope import apply_rope
from ..quant.codebook import uniform_codebook
from ..quant.memory import MemoryReport, store_report
from ..quant.quantizer import TokenQuantizer, fake_quantize, half_dtype
from ..quant.store import PackedStore, SharedPositions, shared_positions_bytes
from ..quant.uncapped_store import UncappedPackedStore


class SimulatedMethod:
    """How K and V are (fake-)quantized; ``name`` and ``avg_bits`` describe it in result tables."""

    name = "fp"
    sink_tokens = 0
    window = 0

    def keys_pre_rope(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        return keys

    def keys_post_rope(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        return keys

    def values(self, layer: int, values: torch.Tensor) -> torch.Tensor:
        return values

    def avg_bits(self, heads: int, head_dim: int, tokens: int) -> float:
        return 16.0

    def exact_pairs(self, query_pos: torch.Tensor, key_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a query sees a key, and a value, exactly under streaming semantics (``window`` > 0): bool masks
        broadcast from ``query_pos`` ``[B, tq, 1]`` and ``key_pos`` ``[B, 1, Tk]``; by default the ``window`` newest
        and the sink tokens, keys and values alike."""
        exact = (query_pos - key_pos < self.window) | (key_pos < self.sink_tokens)
        return exact, exact


class KVQuantMethod(SimulatedMethod):
    """KVQuant from a calibrated config; ``codebook="uniform"``/``sink_tokens=0`` give two of the ablations.
    ``outlier_slots``: bounded outliers per (token, KV head) other than the config's ``ceil(f * head_dim)``."""

    def __init__(self, config: KVQuantConfig, *, sink_tokens: int | None = None, recent_window: int | None = None, label: str | None = None,
                 outliers: str = "bounded", outlier_slots: int | None = None):
        if outliers not in ("bounded", "uncapped"):
            raise ValueError(f"outliers must be 'bounded' or 'uncapped', got {outliers!r}")
        self.config = config
        self.outliers = outliers
        self.sink_tokens = config.sink_tokens if sink_tokens is None else sink_tokens
        self.window = config.recent_window if recent_window is None else recent_window
        self.post_rope = config.key_rope == "post"
        bounded = outliers == "bounded"
        if outlier_slots is not None and not bounded:
            raise ValueError("outlier_slots sets the bounded layout's outliers; uncapped outliers have no fixed count")
        self.outlier_slots = outlier_slots
        self._key_q = [config.key_quantizer(i, bounded=bounded, slots=outlier_slots) for i in range(len(config.layers))]
        self._value_q = [config.value_quantizer(i, bounded=bounded, slots=outlier_slots) for i in range(len(config.layers))]
        self.name = label or config.name

    def keys_pre_rope(self, layer, keys):
        return keys if self.post_rope else fake_quantize(self._key_q[layer], keys)

    def keys_post_rope(self, layer, keys):
        return fake_quantize(self._key_q[layer], keys) if self.post_rope else keys

    def values(self, layer, values):
        return fake_quantize(self._value_q[layer], values)

    def avg_bits(self, heads, head_dim, tokens):
        """Bits per element of a real store holding ``tokens`` tokens of a 16-bit model (sink, window included).

        Keys are drawn so that the configured outlier fraction of them falls outside layer 0's calibrated ranges
        (what the calibration aims for): the uncapped layout stores every out-of-range key element exactly (the
        bounded one a fixed number per token, whatever the keys).
        """
        bounded = self.outliers == "bounded"
        frac = self.config.outlier_fraction
        spread = 1 / torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - frac / 2)).item() if frac else 0.25
        # Every layer's store when the widths differ (mixed precision); layer 0's stands for all of them otherwise.
        layers = range(len(self.config.layers)) if self.config.layer_bits else [0]
        total = MemoryReport()
        stores = []
        for i in layers:
            if bounded:  # as in a KVQuantCache, whose packed layers keep the slots' positions once
                store = PackedStore(self._key_q[i], self._value_q[i], self.config.layer_width(i), self.sink_tokens,
                                    self.window, shared_positions=SharedPositions())
            else:
                store = UncappedPackedStore(self._key_q[i], self._value_q[i], self.config.layer_width(i), self.sink_tokens,
                                            self.window)
            g = torch.Generator().manual_seed(0)
            layer = self.config.layers[i]
            z = torch.randn(1, heads, tokens, head_dim, generator=g) * spread
            if not frac:
                z = z.clamp(-1, 1)
            k = (layer.key_zero.float()[:, None, :] + layer.key_scale.float()[:, None, :] * z).half()
            store.append(k, torch.randn(1, heads, tokens, head_dim, generator=g).half(), torch.arange(tokens)[None])
            total = total + store_report(store)
            stores.append(store)
        # the shared positions of all the model's layers, counted for the layers built here
        shared = shared_positions_bytes(stores[:1]) * len(stores) / len(self.config.layers)
        return (total + MemoryReport({"positions": shared}, 0)).avg_bits


class IntMethod(SimulatedMethod):
    """Uniform asymmetric per-token quantization of post-RoPE keys and of values (fp16 zero and scale)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"
        self._q = TokenQuantizer(uniform_codebook(bits), 0)

    def keys_post_rope(self, layer, keys):
        return fake_quantize(self._q, keys)

    def values(self, layer, values):
        return fake_quantize(self._q, values)

    def avg_bits(self, heads, head_dim, tokens):
        return self.bits + 32 / (heads * head_dim)


class KiviMethod(SimulatedMethod):
    """KIVI: keys per channel over groups of ``group`` tokens, values per token over groups of ``group`` channels,
    uniform codes with fp16 zero/scale per group, and the newest ``residual`` tokens kept in 16 bits."""

    def __init__(self, bits: int, group: int = 32, residual: int = 128):
        self.bits, self.group, self.window = bits, group, residual
        self.name = f"kivi{bits}"
        self._book = uniform_codebook(bits)

    def _uniform(self, x, dim):
        """Quantize ``x`` with one (zero, scale) per slice reduced over ``dim``."""
        hd = half_dtype(x.dtype)
        xf = x.float()
        hi, lo = xf.amax(dim, keepdim=True), xf.amin(dim, keepdim=True)
        zero = ((hi + lo) / 2).to(hd).float()
        scale = ((hi - lo) / 2).to(hd).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        table = self._book.decode_table(x.device)
        return (table[self._book.encode((xf - zero) / scale).long()] * scale + zero).to(x.dtype)

    def keys_post_rope(self, layer, keys):
        b, h, t, d = keys.shape
        pad = (-t) % self.group
        k = torch.nn.functional.pad(keys, (0, 0, 0, pad), mode="replicate") if pad else keys
        k = k.reshape(b, h, -1, self.group, d)  # token groups aligned to the window start
        return self._uniform(k, 3).reshape(b, h, -1, d)[:, :, :t]

    def values(self, layer, values):
        b, h, t, d = values.shape
        v = values.permute(0, 2, 1, 3).reshape(b, t, -1, self.group)  # channel groups of each token
        return self._uniform(v, 3).reshape(b, t, h, d).permute(0, 2, 1, 3)

    def avg_bits(self, heads, head_dim, tokens):
        c = heads * head_dim
        quantized = max(0, tokens - self.window)
        kept = tokens - quantized
        bits = 2 * quantized * c * self.bits
        bits += math.ceil(quantized / self.group) * c * 32  # key zero/scale per channel and token group
        bits += quantized * math.ceil(c / self.group) * 32  # value zero/scale per token and channel group
        bits += 2 * kept * c * 16
        return bits / (2 * tokens * c)


class SimulatedLayer(PreRopeLayer, CacheLayerMixin):
    """One layer of a :class:`SimulationCache`: fake-quantizes what the forward pass hands it."""

    is_compileable = False
    is_sliding = False
    _layer_type = None
    missing_hook_error = "SimulationCache needs the KVQuant attention hook: call transformers_kvquant.patch_model(model)"

    def __init__(self, method: SimulatedMethod, layer_idx: int):
        super().__init__()
        self.method, self.layer_idx = method, layer_idx
        self.length = 0

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.length:
            raise RuntimeError("a SimulationCache covers one forward pass (teacher forcing); create a new one per window")
        self.positions = self.take_staged_positions(key_states.shape[-2])
        self.length = key_states.shape[-2]
        self.is_initialized = True
        m = self.method
        self.exact_keys, self.exact_values = key_states, value_states
        keys = self._keep_sink(m.keys_pre_rope(self.layer_idx, key_states), key_states)
        values = self._keep_sink(m.values(self.layer_idx, value_states), value_states)
        return keys, values

    def _keep_sink(self, quantized, exact):
        if self.method.sink_tokens == 0:
            return quantized
        sink = (self.positions < self.method.sink_tokens).to(exact.device)  # [B or 1, T]
        return torch.where(sink[:, None, :, None], exact, quantized)

    def returned_positions(self) -> torch.Tensor:
        return self.positions

    def attend(self, module, query, key, value, attention_mask, ctx, inner, **kwargs):
        """The shared rotation (:class:`PreRopeLayer`), then post-RoPE fake quantization, exact sink tokens and, with
        a recent window, streaming attention."""
        m = self.method
        q = self.rotate_query(query, ctx)
        cos_k, sin_k = self.key_rotation(key, ctx)
        exact_k = apply_rope(self.exact_keys, cos_k, sin_k)
        k = self._keep_sink(m.keys_post_rope(self.layer_idx, apply_rope(key, cos_k, sin_k)), exact_k)
        if not m.window:
            return inner(module, q, k, value, attention_mask, **kwargs)
        return _streaming_attention(module, q, k, value, exact_k, self.exact_values, self.positions, m, attention_mask)

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1


STREAM_BLOCK = 512  # queries per block of the streaming attention (memory O(block x length))


def _streaming_attention(module, q, k_q, v_q, k_x, v_x, positions, method, attention_mask, block: int | None = None):
    """Attention where query i sees key j (and value j) exactly where ``method.exact_pairs`` says (by default iff
    i - j < window or j is a sink token), else quantized.

    Computed in float32 over blocks of queries, so long contexts need O(block x length) memory. A block of queries
    only reads the keys up to its last one: one forward pass holds a whole sequence, so a later key (by index) is
    never attended to (causal by index under the mask, by position without one, positions rising along a row).
    """
    block = block or STREAM_BLOCK
    n_rep = q.shape[1] // k_q.shape[1]

    def expand(t):
        return t.repeat_interleave(n_rep, dim=1).float()

    kq, kx, vq, vx = expand(k_q), expand(k_x), expand(v_q), expand(v_x)
    pos = positions.to(q.device)
    offset = k_q.shape[2] - q.shape[2]  # keys before the first query (0 for one pass over a window)
    outs = []
    for a in range(0, q.shape[2], block):
        e = offset + min(a + block, q.shape[2])  # keys [0, e) can be seen by this block
        qf = q[:, :, a : a + block].float() * module.scaling
        qpos, kpos = pos[:, offset + a : e, None], pos[:, None, :e]  # [B, tq, 1], [B, 1, e]
        key_exact, value_exact = (x[:, None] for x in method.exact_pairs(qpos, kpos))
        scores = torch.where(key_exact, qf @ kx[:, :, :e].transpose(-1, -2), qf @ kq[:, :, :e].transpose(-1, -2))
        allowed = (qpos - kpos >= 0)[:, None]
        if attention_mask is not None:
            m = attention_mask[:, :, a : a + block, :e]
            allowed = allowed & (m if m.dtype == torch.bool else m > -1e30)
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        # A left pad's query sees no key: a zero row, not NaN (which the real tokens would read from its value).
        p = p.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
        outs.append((p * value_exact) @ vx[:, :, :e] + (p * ~value_exact) @ vq[:, :, :e])
    out = torch.cat(outs, dim=2)
    return out.to(q.dtype).transpose(1, 2).contiguous(), None


class SimulationCache(PreRopeCache):
    """Cache for one teacher-forced forward pass with simulated KV quantization (see module docstring)."""

    def __init__(self, model, method: SimulatedMethod):
        patch_model(model)
        layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[SimulatedLayer(method, i) for i in range(layers)])
