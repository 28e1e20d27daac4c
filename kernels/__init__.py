"""Triton kernels that work directly on KVQuant's packed KV cache, each with a PyTorch reference in :mod:`.naive`.

- :func:`append_packed` (:mod:`.append`): quantize and pack new tokens into the cache buffers.
- :func:`decode_attention` (:mod:`.decode`): one query per row over the packed cache, split over the sequence.
- :func:`prefill_attention` (:mod:`.prefill`): a chunk of queries over the packed cache (itself included).

The packed format (bit packing and :class:`PackedKV`) is :mod:`.layout`; RoPE, for the whole package, is :mod:`.rope`.
Nothing here imports transformers or the rest of the package. The Triton launchers are imported on first use, so that
importing the package (the quantization core packs codes with :func:`pack`) neither compiles nor fixes Triton's mode
(``TRITON_INTERPRET``) before a kernel is asked for.
"""

from .layout import PackedKV, group_size, pack, packed_words, supported_head_dim, unpack
from .naive import append_naive, packed_attention_naive


def __getattr__(name: str):
    if name == "append_packed":
        from .append import append_packed

        return append_packed
    if name == "decode_attention":
        from .decode import decode_attention

        return decode_attention
    if name == "prefill_attention":
        from .prefill import prefill_attention

        return prefill_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PackedKV",
    "append_naive",
    "append_packed",
    "decode_attention",
    "group_size",
    "pack",
    "packed_attention_naive",
    "packed_words",
    "prefill_attention",
    "supported_head_dim",
    "unpack",
]
