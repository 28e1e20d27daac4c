"""The exact recent window seen by every query of a prefill chunk, as a decode step sees it.

A decode step appends its token and reads the ``W`` newest slots exactly (the window's ring). A chunk of ``C`` tokens
is appended as a whole before it is attended, so the ring then holds only the chunk's last tokens: without this
module, query ``i`` of the chunk read exactly only the newest ``max(0, i - C + W + 1)`` of the keys it should (docs/
fidelity.md measured what that costs at 8K). Here query ``i`` (slot ``s_i``) reads slot ``j`` exactly iff
``s_i - j < W``, as token-by-token decoding does: the chunk's own exact keys and values (the update's input) and the
``W - 1`` exact slots before it (taken from the ring before the append, :meth:`ChunkWindow.capture`) are attended
beside the store's dequantized slots, and the mask picks, for each query, the exact copy of a slot inside its window
and the quantized one outside it. The model's own attention function does the work (one call per block of queries,
so the mask's memory stays bounded, over only the columns the block can read).
"""

from __future__ import annotations

import torch

MASK_ELEMENTS = 1 << 26  # mask elements per attention call (queries are split into blocks of rows to stay under it)


class ChunkWindow:
    """What a layer's update hands its attention for one chunk: the chunk's first slot and the exact pre-RoPE keys
    and values of slots ``[first - tail, first + C)``."""

    __slots__ = ("first", "keys", "tail", "values", "window")

    def __init__(self, first: int, tail: int, keys: torch.Tensor, values: torch.Tensor, window: int):
        self.first, self.tail, self.keys, self.values, self.window = first, tail, keys, values, window

    @classmethod
    def capture(cls, store, begin: int, keys: torch.Tensor, values: torch.Tensor) -> ChunkWindow | None:
        """Called before a chunk of more than one token is appended to ``store`` (slots before ``begin`` are not
        visible to it): None when no query of the chunk needs more than the store gives (no window, one token)."""
        window = getattr(store, "recent_window", 0)
        if not window or keys.shape[2] < 2 or getattr(store, "bits", 16) == 16:
            return None
        first = store.length  # host value (a static store synchronizes once per prefill chunk)
        tail = max(0, min(window - 1, first - max(begin, 0)))
        if tail:
            tk, tv = store.exact_tail(tail)
            keys = torch.cat([tk.to(keys.dtype), keys], dim=2)
            values = torch.cat([tv.to(values.dtype), values], dim=2)
        return cls(first, tail, keys, values, window)

    def positions(self, store) -> torch.Tensor:
        """RoPE positions ``[B, tail + C]`` of the exact slots (read after the append wrote the chunk's)."""
        return store.positions(self.first - self.tail)[:, : self.keys.shape[2]]


def attend(module, q, k, v, ek, ev, attention_mask, chunk: ChunkWindow, begin: int, inner, **kwargs):
    """Attention of the chunk's rotated queries ``q`` ``[B, Hq, C, D]`` over the store's keys ``k``/``v`` (rotated,
    slots ``[begin, begin + kv)``) and the exact ones ``ek``/``ev`` (rotated, ``chunk``'s slots), each query reading a
    slot exactly iff it is among its ``W`` newest. ``attention_mask``: the model's ``[B, 1, C, kv]`` (bool or
    additive) or None (causal: a query sees the slots up to its own). Returns ``[B, C, Hq, D]`` like ``inner``."""
    b, _, c, _ = q.shape
    kv, ne = k.shape[2], ek.shape[2]
    dev = q.device
    slot = torch.arange(kv, device=dev) + begin  # the store part's slot per column
    e_slot = torch.arange(ne, device=dev) + (chunk.first - chunk.tail)
    e_col = e_slot - begin  # the exact part's column in the model's mask (>= 0: the tail starts at `begin` or later)
    rows = max(1, MASK_ELEMENTS // max(b * (kv + ne), 1))
    outs = []
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        s_i = torch.arange(r0, r1, device=dev) + chunk.first  # the queries' slots
        last = chunk.first + r1 - 1  # the block's newest query slot
        # the columns no query of the block can read are left out of its call (the causal half of the work, and a
        # static cache's unwritten slots): store slots past ``last - W`` are exact for every query of the block, and
        # exact slots past ``last`` are in the future (unless the model's mask says otherwise)
        lim = min(kv, max(0, last - chunk.window - begin + 1))
        e_lim = min(ne, max(0, last - (chunk.first - chunk.tail) + 1))
        if attention_mask is not None:
            m = attention_mask[:, :, r0:r1, :kv]
            allowed = m if m.dtype == torch.bool else m == 0
            if bool(allowed.index_select(-1, e_col[e_lim:]).any()):  # a mask that is not causal: keep every column
                e_lim = ne
        quantized = slot[None, :lim] <= s_i[:, None] - chunk.window  # [rows, lim]: older than the query's window
        exact = s_i[:, None] - e_slot[None, :e_lim] < chunk.window  # [rows, e_lim]
        if attention_mask is None:  # causal by slot (static caches: unwritten slots too); quantized slots are older
            store_part = quantized[None, None]
            exact_part = (exact & (e_slot[None, :e_lim] <= s_i[:, None]))[None, None]
        else:
            store_part = allowed[..., :lim] & quantized
            exact_part = allowed.index_select(-1, e_col[:e_lim]) & exact
        full = torch.cat([store_part, exact_part], -1)
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            full = torch.zeros(full.shape, dtype=attention_mask.dtype, device=dev).masked_fill(
                ~full, torch.finfo(attention_mask.dtype).min)
        elif attention_mask is None:
            full = torch.zeros(full.shape, dtype=q.dtype, device=dev).masked_fill(~full, torch.finfo(q.dtype).min)
        keys = torch.cat([k[:, :, :lim], ek[:, :, :e_lim].to(k.dtype)], 2)
        values = torch.cat([v[:, :, :lim], ev[:, :, :e_lim].to(v.dtype)], 2)
        out, _ = inner(module, q[:, :, r0:r1], keys, values, full, **kwargs)
        outs.append(out)
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 1)), None
