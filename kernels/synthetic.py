"""Random packed caches for tests and benchmarks (valid layouts, no model needed)."""

from __future__ import annotations

import torch

from .layout import PackedKV, packed_words
from .rope import rope_cos_sin, rope_inv_freq  # noqa: F401  (rope_inv_freq: the synthetic models' frequencies)


def random_packed_kv(
    batch: int = 1,
    heads: int = 2,
    head_dim: int = 64,
    bits: int = 3,
    length: int = 37,
    outlier_slots: int = 0,
    sink_tokens: int = 1,
    window: int = 0,
    pads: list[int] | None = None,
    begin: int = 0,
    spare: int = 0,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PackedKV:
    """A cache of ``length`` visible slots after ``begin`` evicted ones: ``length - window`` packed, ``window`` exact.

    ``pads[b]`` left-pad slots of row ``b`` (position 0, before the real tokens, whose positions start at 0).
    ``spare`` extra unused capacity, so kernels must honour the buffer capacity and offsets. Codes are uniform
    random. Values: ``outlier_slots`` per token with distinct channels, some empty. Keys (when ``outlier_slots``):
    a CSR with a random count per slot (0 to ``2 * outlier_slots``, a few slots with many more), distinct sorted
    channels, and entries of evicted slots before the first visible one.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    pads = pads or [0] * batch
    n_packed = length - window
    slots = begin + length
    cap = slots + spare  # the store's buffers hold every slot (window slots keep only their position)
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    w = packed_words(head_dim, bits)
    c = heads * head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    key_codes = torch.randint(-(2**31), 2**31 - 1, (batch, heads, cap, w), generator=g, dtype=torch.int64).to(torch.int32)
    value_codes = torch.randint(-(2**31), 2**31 - 1, (batch, heads, cap, w), generator=g, dtype=torch.int64).to(torch.int32)
    key_table = torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values
    value_table = torch.sort(torch.rand(2**bits, generator=g) * 2 - 1).values
    key_zero = rnd(heads, head_dim) * 0.3
    key_scale = torch.rand(heads, head_dim, generator=g) + 0.5
    value_zero = (rnd(batch, cap) * 0.1).to(half)
    value_scale = (torch.rand(batch, cap, generator=g) + 0.5).to(half)

    def outliers():
        vals = (rnd(batch, cap, outlier_slots) * 4).to(half)
        idx = torch.argsort(torch.rand(batch, cap, c, generator=g), dim=-1)[..., :outlier_slots]
        empty = torch.rand(batch, cap, outlier_slots, generator=g) < 0.2
        idx = torch.where(empty, torch.full_like(idx, -1), idx)
        return vals, idx.to(torch.int16 if c < 2**15 else torch.int32)

    vov, voi = outliers()
    key_begin, key_values, key_channels, key_nnz = random_key_csr(batch, cap, begin + n_packed, c, outlier_slots, half, g)
    positions = torch.zeros(batch, slots, dtype=torch.int32)
    sink_slot = torch.full((batch, sink_tokens), -1, dtype=torch.long)
    for row in range(batch):
        real = slots - pads[row]
        positions[row, pads[row] :] = torch.arange(real, dtype=torch.int32)
        for i in range(sink_tokens):
            if i < real:
                sink_slot[row, i] = pads[row] + i
    positions = torch.nn.functional.pad(positions, (0, cap - slots))
    window_keys = (rnd(batch, heads, window, head_dim) * 1.5).to(dtype)
    window_values = rnd(batch, heads, window, head_dim).to(dtype)
    sink_keys = (rnd(batch, heads, sink_tokens, head_dim) * 1.5).to(dtype)
    sink_values = rnd(batch, heads, sink_tokens, head_dim).to(dtype)
    cache = PackedKV(
        bits, key_codes, value_codes, key_table, value_table, key_zero, key_scale, value_zero, value_scale,
        key_begin, key_values, key_channels, key_nnz, vov, voi, positions, window_keys, window_values, sink_keys, sink_values, sink_slot,
        begin=begin, packed_end=begin + n_packed, offset=0,
    )
    return to_device(cache, device)


def random_key_csr(batch, cap, packed_slots, channels, mean_count, half, g, heavy_every=7):
    """Row-wise CSR key outliers for slots ``[0, packed_slots)`` of ``cap``: counts ``0 .. 2 * mean_count`` (every
    ``heavy_every``-th slot of a row gets up to a quarter of all channels), distinct sorted channels, random values.
    Returns ``(begin [B, cap] int32, values [B, E], channels [B, E], nnz [B] int64)``; ``E`` has some spare room."""
    idt = torch.int16 if channels < 2**15 else torch.int32
    if mean_count == 0:
        return (torch.zeros(batch, cap, dtype=torch.int32), torch.zeros(batch, 0, dtype=half), torch.zeros(batch, 0, dtype=idt),
                torch.zeros(batch, dtype=torch.long))
    counts = torch.randint(0, 2 * mean_count + 1, (batch, packed_slots), generator=g)
    heavy = torch.randint(0, max(1, channels // 4) + 1, (batch, packed_slots), generator=g)
    slot = torch.arange(packed_slots)
    counts = torch.where((slot % heavy_every == 3)[None, :], heavy, counts).clamp(max=channels)
    ends = counts.cumsum(1)
    begin = torch.zeros(batch, cap, dtype=torch.int32)
    begin[:, :packed_slots] = (ends - counts).to(torch.int32)
    begin[:, packed_slots:] = ends[:, -1:].to(torch.int32) if packed_slots else 0
    nnz = ends[:, -1].clone() if packed_slots else torch.zeros(batch, dtype=torch.long)
    entries = int(nnz.max()) + 5
    values = (torch.randn(batch, entries, generator=g) * 4).to(half)
    chans = torch.zeros(batch, entries, dtype=torch.long)
    for row in range(batch):
        for s in range(packed_slots):
            n, a = int(counts[row, s]), int(ends[row, s] - counts[row, s])
            chans[row, a : a + n] = torch.sort(torch.randperm(channels, generator=g)[:n]).values
    return begin, values, chans.to(idt), nnz


def to_device(cache: PackedKV, device) -> PackedKV:
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in cache.__dict__.items()}
    return PackedKV(**fields)


def query_rope(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, attention_scaling: float = 1.0):
    """cos/sin ``[B, T, D]`` of query positions ``[B, T]`` the way transformers' rotary module returns them."""
    cos, sin = rope_cos_sin(positions, inv_freq, attention_scaling)
    return cos.to(dtype), sin.to(dtype)


def fast_random_packed_kv(batch, heads, head_dim, bits, length, outlier_slots=0, dtype=torch.float16, device="cuda", sink_tokens=1,
                          key_outlier_fraction=None) -> PackedKV:
    """A large random cache built on the device in a few kernels (for benchmarks): uniform codes; values with
    ``outlier_slots`` outliers per token on distinct channels ``(r + 97 k) mod C`` (97 is odd, so distinct for any
    power-of-two ``C``); keys with the same count per token on the channels ``(r' + 97 k) mod C``, sorted (CSR), or
    ``key_outlier_fraction`` of the channels when given."""
    w = packed_words(head_dim, bits)
    c = heads * head_dim
    half = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
    idt = torch.int16 if c < 2**15 else torch.int32

    def codes():
        return torch.randint(-(2**31), 2**31 - 1, (batch, heads, length, w), device=device, dtype=torch.int32)

    def spread(count):
        start = torch.randint(0, c, (batch, length, 1), device=device)
        return (start + 97 * torch.arange(count, device=device)) % c

    idx = spread(outlier_slots).to(idt)
    key_count = outlier_slots if key_outlier_fraction is None else max(0, round(key_outlier_fraction * c))
    key_channels = torch.sort(spread(key_count), dim=-1).values.to(idt).reshape(batch, length * key_count)
    key_begin = (torch.arange(length, device=device, dtype=torch.int32) * key_count).expand(batch, length).contiguous()
    table = torch.linspace(-1, 1, 2**bits, device=device)
    return PackedKV(
        bits, codes(), codes(), table, table.flip(0).neg(),
        torch.randn(heads, head_dim, device=device) * 0.3, torch.rand(heads, head_dim, device=device) + 0.5,
        (torch.randn(batch, length, device=device) * 0.1).to(half), (torch.rand(batch, length, device=device) + 0.5).to(half),
        key_begin, (torch.randn(batch, length * key_count, device=device) * 4).to(half), key_channels,
        torch.full((batch,), length * key_count, device=device, dtype=torch.long),
        (torch.randn(batch, length, outlier_slots, device=device) * 4).to(half), idx.flip(-1).contiguous(),
        torch.arange(length, device=device, dtype=torch.int32).expand(batch, length).contiguous(),
        torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype), torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype),
        torch.randn(batch, heads, sink_tokens, head_dim, device=device).to(dtype), torch.randn(batch, heads, sink_tokens, head_dim, device=device).to(dtype),
        torch.zeros(batch, sink_tokens, dtype=torch.long, device=device) + torch.arange(sink_tokens, device=device),
        begin=0, packed_end=length, offset=0,
    )


def cache_bytes(cache: PackedKV) -> int:
    """Bytes a decode step must read from the cache: codes, value ranges, outliers (value slots, key CSR entries and
    begins), positions of the visible slots."""
    a, e = cache.begin - cache.offset, cache.packed_end - cache.offset
    b, h, _, w = cache.key_codes.shape
    n = e - a
    per_token = 2 * h * w * 4 + 2 * cache.value_zero.element_size() + 4
    per_token += cache.outlier_slots * (cache.value_outlier_values.element_size() + cache.value_outlier_index.element_size())
    per_token += cache.key_outlier_begin.element_size() if cache.has_key_outliers else 0
    if cache.has_key_outliers and n:
        starts, ends = cache.key_outlier_ranges()
        entries = int((ends[:, -1] - starts[:, 0]).sum())
    else:
        entries = 0
    return b * n * per_token + entries * (cache.key_entry_values.element_size() + cache.key_entry_channels.element_size())
