"""When the Triton kernels attend over the packed cache, and the adapter from a cache layer to them.

``kernels_enabled`` decides once per layer: backend ``"reference"`` never; ``"triton"`` always (and says why not
when it cannot); ``"auto"`` for a packed store on CUDA when Triton imports and the head size is supported. The
store makes the same decision for its writes (:meth:`~transformers_kvquant.quant.store.PackedStore.uses_kernels`).

``fused_attention`` runs a layer's attention over its store: decode (one query per row) in the decode kernel, as
one custom operator (:mod:`transformers_kvquant.kernels.ops`, so a compiled step captures it); a prefill chunk with
the model's own attention over the packed prefix dequantized for this layer only.
"""

from __future__ import annotations

import os

import torch

from ..kernels.layout import block_size, kernel_constants, supported_head_dim
from ..kernels.naive import LOG2E
from ..kernels.rope import apply_rope
from ..quant.store import PackedStore
from . import chunk_window
from .prerope import key_rotation



class KernelUnavailableError(RuntimeError):
    """backend='triton' was asked for but the kernels cannot run here."""


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_enabled(settings, store) -> bool:
    """True when this layer's attention should run in the Triton kernels."""
    backend = getattr(settings, "backend", "auto")
    if backend == "reference":
        return False
    packed = isinstance(store, PackedStore)
    device = getattr(store, "device", torch.device("cpu"))
    if backend == "triton":
        if not packed:
            what = "uncapped outliers have no kernels (use outliers='bounded')" if getattr(store, "bits", 16) != 16 else "bits=16 has no kernels"
            raise KernelUnavailableError(f"backend='triton' needs a packed cache with bounded outliers; {what}")
        if not _triton_importable():
            raise KernelUnavailableError("backend='triton' needs the `triton` package (pip install triton)")
        # The model's geometry first: no device makes an unsupported head_dim work.
        if not supported_head_dim(store.head_dim, store.bits):
            raise KernelUnavailableError(
                f"the kernels need a power-of-two head_dim of at least 32 (64 and 128 are tested); this model has "
                f"head_dim {store.head_dim}"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise KernelUnavailableError(
                f"backend='triton' runs on CUDA tensors; this layer is on {device}. Use backend='auto' or 'reference', "
                "or set TRITON_INTERPRET=1 before importing triton to run the kernels in Triton's (slow) CPU interpreter"
            )
        return True
    return packed and device.type == "cuda" and _triton_importable() and supported_head_dim(store.head_dim, store.bits)


def prepare(layer, rotary, device) -> None:
    """Make the layer's kernel tables (decode, append) once, when its store is created: never inside a compiled
    step, where a CUDA graph would own tensors that outlive it."""
    from ..kernels.append import prepare as prepare_append

    prepare_append(layer.store.head_dim, device)
    _constants(layer, rotary, device)


def _constants(layer, rotary, device):
    """The layer's decode tables: they depend on the codebooks and the frequencies only, so they stay valid when
    the store regrows or reorders its rows; they are made again for another store's quantizers (keyed by the key
    quantizer, a Python object: a compiled step guards it by identity, not as one more tensor)."""
    store = layer.store
    tables = layer.kernel_tables
    if tables is not None and torch.compiler.is_compiling():
        return tables[1]  # made with the store (prepare); a compiled step only reads them and guards no comparison
    if tables is None or tables[0] is not store.key_quantizer:
        consts = kernel_constants(store.cache, rotary.inv_freq.to(device), block_size(store.cache.bits))
        if not torch.compiler.is_compiling():
            # Fixed addresses, like the cache's own buffers: a CUDA graph (torch.compile's "reduce-overhead") copies
            # every input it does not know to be static into its own buffer before each replay: nine small
            # copies per layer, issued one by one from the host, cost ~3 ms per decode step of a 32-layer model.
            for t in vars(consts).values():
                if isinstance(t, torch.Tensor):
                    torch._dynamo.mark_static_address(t)
        tables = (store.key_quantizer, consts)
        layer.kernel_tables = tables
    return tables[1]


def _slot_mask(mask, begin: int, width: int, batch: int):
    """The attention mask of one query as ``[B, width]`` by slot (True/additive), or None when there is none.

    ``mask``: transformers' ``[B, 1, 1, kv]`` (bool or additive) whose kv axis starts at slot ``begin``."""
    if mask is None or not isinstance(mask, torch.Tensor):
        return None
    m = mask[:, 0, -1, :]
    if m.shape[0] != batch:
        m = m.expand(batch, -1)
    if begin:
        m = torch.nn.functional.pad(m, (begin, 0), value=True if m.dtype == torch.bool else 0.0)
    return m[:, :width] if m.shape[1] > width else m


def fused_attention(layer, module, query, attention_mask, ctx, inner, **kwargs):
    """Attention of the (un-rotated) ``query`` ``[B, Hq, q, D]`` over ``layer.store`` with the kernels.

    Returns ``(attn_output [B, q, Hq, D] in query.dtype, None)`` like transformers' attention functions.
    """
    from ..kernels import ops

    store = layer.store
    q = layer.rotate_query(query, ctx)
    scaling = kwargs.get("scaling")
    scaling = float(module.scaling if scaling is None else scaling)
    window = int(layer.sliding_window) if getattr(layer, "is_sliding", False) else 0
    b, hq, n, d = q.shape
    if n == 1:
        # the kernel rotates keys with the bare frequencies: the rotary's attention scaling goes into the query
        attention_scaling = float(getattr(ctx.rotary, "attention_scaling", 1.0))
        q_rot = q[:, :, 0].float() * (scaling * LOG2E * attention_scaling)
        begin = 0 if store.static else layer.returned_begin
        mask = _slot_mask(attention_mask, begin, store.capacity, b)
        out = ops.decode(q_rot, store.cache, _constants(layer, ctx.rotary, q.device), mask, window)
        return out.to(query.dtype).unsqueeze(1), None
    # prefill: the packed prefix (this chunk included) for this layer, then the model's own attention
    begin = layer.returned_begin
    end = store.length  # a host value (in a static cache after compiled steps, one synchronization per prefill)
    k, v = store.read(begin, end)
    given = attention_mask  # the mask the layer received (the plain-causal verdict is kept for it)
    cos_k, sin_k = key_rotation(ctx.rotary, k, store.cache.positions[:, begin:end])
    k = apply_rope(k, cos_k, sin_k)
    chunk = layer.take_chunk()
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask[..., begin:end] if store.static else attention_mask[..., : end - begin]
    if chunk is not None:  # a recent window: each query reads its own newest slots exactly
        ek = apply_rope(chunk.keys, *key_rotation(ctx.rotary, chunk.keys, chunk.positions(store)))
        return chunk_window.attend(module, q, k, v, ek, chunk.values, attention_mask, chunk, begin, inner, **kwargs)
    if isinstance(attention_mask, torch.Tensor):
        if window == 0 and _plain_causal(attention_mask, given):
            # a chunk after a prefix without padding: the causal pattern aligned at the bottom right, which SDPA's
            # flash and efficient kernels take without materializing a mask
            return _causal_chunk(q, k, v, scaling), None
    return inner(module, q, k, v, attention_mask, **kwargs)


_VERDICT: list = [None, None, None]  # (weak reference to the last mask given, its slice's shape, whether plain causal)
MASK_CHECK_ELEMENTS = 1 << 26  # mask elements compared at once by _plain_causal


def _plain_causal(mask: torch.Tensor, given: torch.Tensor) -> bool:
    """Whether ``mask`` ``[B, 1, q, kv]`` (a slice of ``given``, the mask the layer received) is the bottom-right-
    aligned causal pattern in every row. Checked once per forward: every layer receives the same ``given`` and
    slices it alike (each slice is a new view, so the verdict is kept for ``given``; checking every layer's slice
    cost a 32K prefill of LLaMA-2-7B about 0.1 s on an H200)."""
    import weakref

    last = _VERDICT[0]() if _VERDICT[0] is not None else None
    if last is given and _VERDICT[1] == (mask.shape, mask.storage_offset()):
        return _VERDICT[2]
    q, kv = mask.shape[-2], mask.shape[-1]
    # compared a block of rows at a time: the mask of a 32K chunk over a 512K prefix is 16 GiB, and whole-size
    # temporaries beside it ran an H200 out of memory (docs/e2e.md)
    rows = max(1, MASK_CHECK_ELEMENTS // max(kv * mask[..., :1, :1].numel(), 1))  # rows of every batch entry
    cols = torch.arange(kv, device=mask.device)
    ok = torch.ones((), dtype=torch.bool, device=mask.device)
    for r0 in range(0, q, rows):
        part = mask[..., r0 : r0 + rows, :]
        allowed = part if part.dtype == torch.bool else part == 0
        last = torch.arange(r0, r0 + part.shape[-2], device=mask.device) + (kv - q)  # the last key each row sees
        ok &= (allowed == (cols[None, :] <= last[:, None])).all()
    verdict = bool(ok)
    _VERDICT[0], _VERDICT[1], _VERDICT[2] = weakref.ref(given), (mask.shape, mask.storage_offset()), verdict
    return verdict


def _causal_chunk(q, k, v, scaling):
    """Attention of a chunk of queries over keys that end with the chunk's own: [B, q, Hq, D]."""
    from torch.nn.attention.bias import causal_lower_right

    g = q.shape[1] // k.shape[1]
    if g > 1:
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
    nq, nk = q.shape[2], k.shape[2]
    if q.is_cuda and nq < nk <= 2 * nq:
        # Queries padded at the front to a square, plain causal: SDPA then takes its fastest causal kernel (cuDNN on
        # Hopper), where the bottom-right pattern goes to flash-attention 2. A 16K chunk over 32K keys of LLaMA-2-7B
        # heads: 14.5 ms against 18.7 per layer on an H200, despite the padded rows' work; for a pad larger than the
        # chunk it loses (8K over 32K: 14.1 against 11.8). benchmarks/chunk_attention.py.
        out = _square_causal(q, k, v, scaling)
    else:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), scale=scaling)
    return out.transpose(1, 2).contiguous()


def _square_causal(q, k, v, scaling):
    """Bottom-right-aligned causal attention ``[B, H, q, D]`` of ``q`` over the longer ``k``/``v``, computed as the
    plain causal attention of the queries padded at the front to ``k``'s length (the pad rows dropped)."""
    nq, nk = q.shape[2], k.shape[2]
    padded = torch.cat([q.new_zeros(q.shape[0], q.shape[1], nk - nq, q.shape[3]), q], 2)
    return torch.nn.functional.scaled_dot_product_attention(padded, k, v, is_causal=True, scale=scaling)[:, :, nk - nq :]
