"""The paper's outlier layout, kept as an option (``cache_config={"outliers": "uncapped"}``, reference path only).

Every key element outside its channel's calibrated range is stored exactly, so bytes per token depend on the
prompt. Tokens live in *slots* ``0, 1, 2, ...`` (shared by all rows); per slot:

- ``key_codes`` / ``value_codes``: int32 ``[B, H, cap, words]``, codes as the bit stream of
  :func:`~transformers_kvquant.kernels.layout.pack`;
- ``value_zero`` / ``value_scale``: 16-bit ``[B, cap]`` per-token ranges;
- ``key_outlier_begin``: int32 ``[B, cap]``, where the slot's key outliers start in the row's entry buffers
  ``key_entry_values`` (16-bit) / ``key_entry_channels`` ``[B, entry_cap]`` (a row-wise CSR over slots);
- ``value_outlier_*``: ``[B, cap, S]`` exact values and channel indices (S per token over the whole vector);
- ``positions``: int32 ``[B, cap]``.

Besides: the exact *sink* and *recent window*. Slots below ``start`` are evicted (sliding-window layers).
"""

from __future__ import annotations

import torch

from ..kernels.layout import pack, packed_words, unpack
from .quantizer import QuantizedVectors, SparseOutliers
from .store import KVStore, SlotBuffers, tensor_bytes


class UncappedPackedStore(KVStore):
    """KVQuant storage with the paper's uncapped key outliers (reference path only): bit-stream codes, per-token
    value ranges, a row-wise CSR of every out-of-range key element, exact sink and recent window."""

    def __init__(self, key_quantizer, value_quantizer, bits: int, sink_tokens: int = 1, recent_window: int = 0):
        super().__init__()
        self.key_quantizer = key_quantizer
        self.value_quantizer = value_quantizer
        self.bits = bits
        self.sink_tokens = sink_tokens
        self.recent_window = recent_window
        self.buffers = SlotBuffers()
        self._offset = 0
        self.packed_length = 0  # slots [start, packed_length) are packed; [packed_length, length) are the window

    def initialize(self, keys, values):
        """Allocate for the batch, heads, dtype and device of ``keys``/``values`` (no tokens are stored)."""
        if self.initialized:
            return
        b, h, _, d = keys.shape
        self.batch, self.heads, self.head_dim = b, h, d
        self.dtype, self.device = keys.dtype, keys.device
        dev = keys.device
        probe = self.key_quantizer.quantize(keys[:, :, :0])
        hd, idt = probe.outlier_values.dtype, probe.outlier_index.dtype
        w = packed_words(d, self.bits)
        specs = {
            "key_codes": ((b, h, None, w), torch.int32, dev),
            "value_codes": ((b, h, None, w), torch.int32, dev),
            "value_zero": ((b, None), hd, dev),
            "value_scale": ((b, None), hd, dev),
            "key_outlier_begin": ((b, None), torch.int32, dev),
            "value_outlier_values": ((b, None, self.value_quantizer.slots), hd, dev),
            "value_outlier_index": ((b, None, self.value_quantizer.slots), idt, dev),
            "positions": ((b, None), torch.int32, dev),
        }
        self.buffers.allocate(specs, 0)
        self.window_keys = keys[:, :, :0].clone()
        self.window_values = values[:, :, :0].clone()
        n = self.sink_tokens
        self.sink_keys = keys.new_zeros(b, h, n, d)
        self.sink_values = values.new_zeros(b, h, n, d)
        self.sink_slot = torch.full((b, n), -1, dtype=torch.long, device=dev)
        self.key_entry_values = torch.empty(b, 0, dtype=hd, device=dev)
        self.key_entry_channels = torch.empty(b, 0, dtype=idt, device=dev)
        self.key_nnz = torch.zeros(b, dtype=torch.long, device=dev)
        self.initialized = True

    # ------------------------------------------------------------------------------------------ writing
    def append(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Store new tokens ``[B, H, T, D]`` (pre-RoPE keys) with their positions ``[B or 1, T]``."""
        self.initialize(keys, values)
        n = keys.shape[2]
        if n == 0:
            return
        positions = positions.to(device=self.device, dtype=torch.int32).expand(self.batch, n)
        self._ensure(n)
        self.buffers.write("positions", self.length - self._offset, positions)
        self._capture_sink(keys, values, positions)
        first_new = self.length
        self.length += n
        if self.recent_window == 0:
            self._pack(keys, values, first_new)
            self.packed_length = self.length
            return
        wk = torch.cat([self.window_keys, keys], dim=2)
        wv = torch.cat([self.window_values, values], dim=2)
        overflow = wk.shape[2] - self.recent_window
        if overflow > 0:
            self._pack(wk[:, :, :overflow], wv[:, :, :overflow], self.packed_length)
            self.packed_length += overflow
            wk, wv = wk[:, :, overflow:], wv[:, :, overflow:]
        self.window_keys, self.window_values = wk.contiguous(), wv.contiguous()

    def _capture_sink(self, keys, values, positions):
        """Keep exact copies of the tokens at positions < sink_tokens; a later token of a position wins.

        Left-padding slots carry position 0 too and come first, so the real first token overwrites them. Pure
        tensor ops for all sink positions at once: no host sync, so decode steps on a GPU stay asynchronous.
        """
        n = self.sink_tokens
        if n == 0:
            return
        b, t = positions.shape
        hit = positions.unsqueeze(-1) == torch.arange(n, device=self.device)  # [B, T, N]
        order = torch.arange(t, device=self.device).view(1, t, 1)
        last = torch.where(hit, order, torch.full_like(order, -1)).amax(dim=1)  # [B, N] last token of each position
        rows = last >= 0
        idx = last.clamp(min=0)
        gather = idx.view(b, 1, n, 1).expand(b, self.heads, n, self.head_dim)
        take = rows.view(b, 1, n, 1)
        self.sink_keys = torch.where(take, torch.gather(keys, 2, gather), self.sink_keys)
        self.sink_values = torch.where(take, torch.gather(values, 2, gather), self.sink_values)
        self.sink_slot = torch.where(rows, idx + self.length, self.sink_slot)

    def _pack(self, keys, values, first_slot):
        qk = self.key_quantizer.quantize(keys)
        qv = self.value_quantizer.quantize(values)
        at = first_slot - self._offset
        self.buffers.write("key_codes", at, pack(qk.codes, self.bits))
        self.buffers.write("value_codes", at, pack(qv.codes, self.bits))
        self.buffers.write("value_zero", at, qv.zero)
        self.buffers.write("value_scale", at, qv.scale)
        self.buffers.write("value_outlier_values", at, qv.outlier_values)
        self.buffers.write("value_outlier_index", at, qv.outlier_index)
        self._append_key_outliers(qk.sparse, at, keys.shape[2])

    def _append_key_outliers(self, sparse: SparseOutliers | None, at: int, n: int) -> None:
        """Record the new slots' key outliers: begins for the slots, entries at the end of each row."""
        if sparse is None:
            self.buffers.write("key_outlier_begin", at, self.key_nnz.to(torch.int32).view(-1, 1).expand(self.batch, n))
            return
        counts = sparse.counts.to(torch.long)  # [B, n]
        exclusive = torch.cumsum(counts, 1) - counts
        self.buffers.write("key_outlier_begin", at, (self.key_nnz.view(-1, 1) + exclusive).to(torch.int32))
        per_row = counts.sum(1)
        self._reserve_entries(int((self.key_nnz + per_row).max()) if self.batch else 0)
        if sparse.values.numel():
            row = torch.repeat_interleave(torch.arange(self.batch, device=self.device), per_row, output_size=sparse.values.numel())
            row_first = torch.cumsum(per_row, 0) - per_row  # flat index of each row's first new entry
            rank = torch.arange(row.numel(), device=self.device) - row_first[row]
            dest = self.key_nnz[row] + rank
            self.key_entry_values[row, dest] = sparse.values.to(self.key_entry_values.dtype)
            self.key_entry_channels[row, dest] = sparse.channels.to(self.key_entry_channels.dtype)
        self.key_nnz = self.key_nnz + per_row

    def _reserve_entries(self, needed: int) -> None:
        """Room for ``needed`` key-outlier entries per row; evicted slots' entries are dropped when growing."""
        cap = self.key_entry_values.shape[1]
        if needed <= cap:
            return
        shift = self._evicted_entries()
        if bool((shift > 0).any()):
            self._compact_entries(shift)
            needed -= int(shift.min())
        new_cap = max(needed, cap + cap // 2, 64)
        pad = new_cap - self.key_entry_values.shape[1]
        if pad > 0:
            self.key_entry_values = torch.nn.functional.pad(self.key_entry_values, (0, pad))
            self.key_entry_channels = torch.nn.functional.pad(self.key_entry_channels, (0, pad))

    def _evicted_entries(self) -> torch.Tensor:
        """Per row, how many entries belong to evicted slots (they all precede the first retained slot's)."""
        if self.start >= self.packed_length:
            return self.key_nnz.clone()
        at = self.start - self._offset
        return self.buffers.read("key_outlier_begin", at, at + 1)[:, 0].long()

    def _compact_entries(self, shift: torch.Tensor) -> None:
        """Move each row's live entries to the front (rows shift by different amounts) and rebase the begins."""
        cap = self.key_entry_values.shape[1]
        src = (torch.arange(cap, device=self.device).view(1, -1) + shift.view(-1, 1)).clamp(max=cap - 1)
        self.key_entry_values = torch.gather(self.key_entry_values, 1, src)
        self.key_entry_channels = torch.gather(self.key_entry_channels, 1, src)
        begins = self.buffers.tensors["key_outlier_begin"]
        self.buffers.tensors["key_outlier_begin"] = (begins.long() - shift.view(-1, 1)).clamp(min=0).to(torch.int32)
        self.key_nnz = self.key_nnz - shift

    def _ensure(self, n):
        used = self.length - self._offset
        dead = self.start - self._offset
        if used + n > self.buffers.capacity and dead > 0:
            self.buffers.reserve(used - dead + n, used, dead)
            self._offset = self.start
        else:
            self.buffers.reserve(used + n, used)

    def reserve(self, total_slots: int) -> None:
        """Preallocate room for ``total_slots`` slots (avoids growth copies for known lengths)."""
        if self.initialized:
            self.buffers.reserve(total_slots - self._offset, self.length - self._offset)

    # ------------------------------------------------------------------------------------------ reading
    def packed_view(self, name: str, begin: int | None = None, end: int | None = None) -> torch.Tensor:
        """Raw packed buffer ``name`` over slots [begin, end) (default: the retained packed slots)."""
        begin = self.start if begin is None else begin
        end = self.packed_length if end is None else end
        return self.buffers.read(name, begin - self._offset, end - self._offset)

    def positions(self, begin: int | None = None) -> torch.Tensor:
        begin = self.start if begin is None else begin
        return self.buffers.read("positions", begin - self._offset, self.length - self._offset)

    def key_outliers(self, begin: int | None = None) -> SparseOutliers:
        """Key outliers of packed slots [begin, packed_length) as :class:`SparseOutliers`."""
        begin = self.start if begin is None else begin
        starts = self.packed_view("key_outlier_begin", begin).long()  # [B, n]
        ends = torch.cat([starts[:, 1:], self.key_nnz.view(-1, 1)], dim=1)
        counts = ends - starts
        if starts.shape[1] == 0:
            first = self.key_nnz
        else:
            first = starts[:, 0]
        cols = torch.arange(self.key_entry_values.shape[1], device=self.device).view(1, -1)
        live = (cols >= first.view(-1, 1)) & (cols < self.key_nnz.view(-1, 1))
        return SparseOutliers(counts.to(torch.int32), self.key_entry_values[live], self.key_entry_channels[live])

    def keys_values(self, begin: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized pre-RoPE keys and values of slots [begin, length), in the model dtype."""
        begin = self.start if begin is None else begin
        pb = min(max(begin, self.start), self.packed_length)
        parts_k, parts_v = [], []
        if self.packed_length > pb:
            codes = unpack(self.packed_view("key_codes", pb), self.bits, self.head_dim)
            empty = codes.new_empty(codes.shape[0], codes.shape[2], 0)
            qk = QuantizedVectors(codes, empty, empty, sparse=self.key_outliers(pb))
            qv = QuantizedVectors(
                unpack(self.packed_view("value_codes", pb), self.bits, self.head_dim),
                self.packed_view("value_outlier_values", pb),
                self.packed_view("value_outlier_index", pb),
                self.packed_view("value_zero", pb),
                self.packed_view("value_scale", pb),
            )
            parts_k.append(self.key_quantizer.dequantize(qk, self.dtype))
            parts_v.append(self.value_quantizer.dequantize(qv, self.dtype))
        window_first = self.length - self.window_keys.shape[2]
        skip = max(0, begin - window_first)
        parts_k.append(self.window_keys[:, :, skip:])
        parts_v.append(self.window_values[:, :, skip:])
        k = torch.cat(parts_k, dim=2) if len(parts_k) > 1 else parts_k[0]
        v = torch.cat(parts_v, dim=2) if len(parts_v) > 1 else parts_v[0]
        return self._apply_sink(k, v, begin)

    def exact_tail(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact pre-RoPE keys and values of the newest ``count`` slots (at most the recent window's tokens)."""
        held = self.window_keys.shape[2]
        if count > held:
            raise ValueError(f"the exact tail holds at most {held} tokens, asked for {count}")
        return self.window_keys[:, :, held - count :], self.window_values[:, :, held - count :]

    def _apply_sink(self, k, v, begin):
        if self.sink_tokens == 0:
            return k, v
        rel = self.sink_slot - begin  # [B, N] index into k's slot axis
        valid = (self.sink_slot >= 0) & (rel >= 0) & (rel < k.shape[2])
        if not bool(valid.any()):
            return k, v
        k, v = k.clone(), v.clone()
        for p in range(self.sink_tokens):
            rows = valid[:, p].nonzero().flatten()
            if rows.numel() == 0:
                continue
            cols = rel[rows, p]
            k[rows, :, cols] = self.sink_keys[rows, :, p]
            v[rows, :, cols] = self.sink_values[rows, :, p]
        return k, v

    # ------------------------------------------------------------------------------------------ edits
    def crop(self, n: int) -> None:
        """Forget the newest ``n`` tokens. Packed tokens stay packed (each token is quantized on its own)."""
        new_length = max(self.start, self.length - n)
        window_first = self.length - self.window_keys.shape[2]
        keep = max(0, new_length - window_first)
        self.window_keys = self.window_keys[:, :, :keep]
        self.window_values = self.window_values[:, :, :keep]
        self.length = new_length
        if new_length < self.packed_length:
            self.key_nnz = self.packed_view("key_outlier_begin", new_length, new_length + 1)[:, 0].long()
        self.packed_length = min(self.packed_length, new_length)
        self.sink_slot = torch.where(self.sink_slot >= new_length, torch.full_like(self.sink_slot, -1), self.sink_slot)

    def evict_before(self, slot: int) -> None:
        """Drop slots below ``slot`` (sliding window); memory is reclaimed when the buffers next grow."""
        self.start = max(self.start, min(slot, self.length))
        if self.packed_length < self.start:
            # Window tokens that fell out of a sliding window are dropped too.
            drop = self.start - self.packed_length
            self.window_keys = self.window_keys[:, :, drop:]
            self.window_values = self.window_values[:, :, drop:]
            self.packed_length = self.start

    def map_rows(self, fn) -> None:
        """Apply a batch-axis operation (beam reorder, select, repeat) to every tensor of the store."""
        if not self.initialized:
            return
        self.buffers.map_rows(fn)
        self.window_keys = fn(self.window_keys)
        self.window_values = fn(self.window_values)
        self.sink_keys = fn(self.sink_keys)
        self.sink_values = fn(self.sink_values)
        self.sink_slot = fn(self.sink_slot)
        self.key_entry_values = fn(self.key_entry_values)
        self.key_entry_channels = fn(self.key_entry_channels)
        self.key_nnz = fn(self.key_nnz)
        self.batch = self.sink_slot.shape[0]

    # ------------------------------------------------------------------------------------------ accounting
    def nbytes(self) -> dict[str, int]:
        """Bytes of every stored tensor over the retained slots, by component."""
        if not self.initialized:
            return {}
        out = {}
        for name in self.buffers.tensors:
            end = self.length if name == "positions" else self.packed_length
            out[name] = tensor_bytes(self.packed_view(name, self.start, end))
        live = self.key_nnz - self._evicted_entries()
        entry_bytes = self.key_entry_values.element_size() + self.key_entry_channels.element_size()
        out["key_outlier_entries"] = int(live.sum()) * entry_bytes + tensor_bytes(self.key_nnz)
        out["sink"] = tensor_bytes(self.sink_keys) + tensor_bytes(self.sink_values) + tensor_bytes(self.sink_slot)
        out["recent_window"] = tensor_bytes(self.window_keys) + tensor_bytes(self.window_values)
        return out
