"""Random packed caches for tests and benchmarks (valid layouts, no model needed), made on the target device."""

from __future__ import annotations

import torch

from .layout import PackedCache, allocate
from .rope import rope_cos_sin, rope_inv_freq  # noqa: F401  (rope_inv_freq: the synthetic models' frequencies)


def random_cache(
    batch: int = 1,
    heads: int = 2,
    head_dim: int = 64,
    bits: int = 3,
    length: int = 37,
    outliers: int = 0,
    sink_tokens: int = 1,
    recent_window: int = 0,
    pads: list[int] | None = None,
    capacity: int | None = None,
    dtype: torch.dtype = torch.float16,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> PackedCache:
    """A cache of ``length`` written slots (capacity ``capacity`` or the next whole block): uniform random codes, random
    sorted codebooks, ranges, ``outliers`` residuals per (token, head) for keys and values at random channels, exact
    window and sink.

    ``pads[b]`` left-pad slots of row ``b`` (position 0, before the real tokens, whose positions start at 0, so the
    sink follows the real first token).
    """
    g = torch.Generator(device=device).manual_seed(seed)
    pads = pads or [0] * batch

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device) * scale

    key_table = torch.sort(rnd(2**bits).clamp(-1.5, 1.5) / 1.5).values
    value_table = torch.sort(rnd(2**bits).clamp(-1.5, 1.5) / 1.5).values
    cache = allocate(
        batch=batch, heads=heads, head_dim=head_dim, bits=bits, capacity=capacity or length, key_outliers=outliers,
        value_outliers=outliers, dtype=dtype, device=device, key_table=key_table, value_table=value_table,
        key_bounds=(key_table[1:] + key_table[:-1]) / 2, value_bounds=(value_table[1:] + value_table[:-1]) / 2,
        key_zero=rnd(heads, head_dim, scale=0.5), key_scale=rnd(heads, head_dim).abs() + 0.5,
        recent_window=recent_window, sink_tokens=sink_tokens,
    )
    cap = cache.capacity
    for t in (cache.key_codes, cache.value_codes):
        t.copy_(torch.randint(-(2**31), 2**31 - 1, t.shape, generator=g, device=device, dtype=torch.int64).to(torch.int32))
    half = cache.value_zero.dtype
    cache.value_zero.copy_(rnd(batch, cap, scale=0.2).to(half))
    cache.value_scale.copy_((rnd(batch, cap).abs() + 0.3).to(half))
    if outliers:
        for vals, idx in ((cache.key_outlier_values, cache.key_outlier_index), (cache.value_outlier_values, cache.value_outlier_index)):
            vals.copy_(rnd(*vals.shape, scale=2.0).to(half))
            # random channels (a repeated one adds up, in the kernels as in the reference); some unused (residual 0)
            idx.copy_(torch.randint(0, head_dim, idx.shape, generator=g, device=device).to(torch.uint8))
            vals.masked_fill_(torch.rand(vals.shape, generator=g, device=device) < 0.2, 0.0)
    for r in range(batch):
        cache.positions[r, : pads[r]] = 0
        cache.positions[r, pads[r] :] = torch.arange(cap - pads[r], dtype=torch.int32, device=device)
        for i in range(sink_tokens):
            if pads[r] + i < length:
                cache.sink_slot[r, i] = pads[r] + i
    cache.window_keys.copy_(rnd(*cache.window_keys.shape, scale=1.5).to(dtype))
    cache.window_values.copy_(rnd(*cache.window_values.shape).to(dtype))
    cache.sink_keys.copy_(rnd(*cache.sink_keys.shape, scale=1.5).to(dtype))
    cache.sink_values.copy_(rnd(*cache.sink_values.shape).to(dtype))
    cache.length.fill_(length)
    return cache
