"""Triton kernels that work directly on KVQuant's packed KV cache, each with a PyTorch reference in :mod:`.naive`.

- :func:`append_packed` (:mod:`.append`): quantize and pack new tokens at the cache's device length.
- :func:`decode_attention` (:mod:`.decode`): one query per row over the packed cache, split over the sequence.
- :func:`dequantize_packed` (:mod:`.dequant`): a slot range back to pre-RoPE keys and values (prefill reads).

The packed format (:class:`~.layout.PackedCache`, the reader layout, and the bit stream of the uncapped store) is
:mod:`.layout`; RoPE, for the whole package, is :mod:`.rope`; :mod:`.ops` makes the launchers ``torch.compile``-able.
Nothing here imports transformers or the rest of the package. The Triton launchers are imported on first use, so
importing the package neither compiles nor fixes Triton's mode (``TRITON_INTERPRET``) before a kernel is asked for.
"""

from .layout import (
    PackedCache,
    group_size,
    pack,
    packed_words,
    supported_head_dim,
    unpack,
)
from .naive import append_reference, decode_reference, dequantize


def __getattr__(name: str):
    if name == "append_packed":
        from .append import append_packed

        return append_packed
    if name == "decode_attention":
        from .decode import decode_attention

        return decode_attention
    if name == "dequantize_packed":
        from .dequant import dequantize_packed

        return dequantize_packed
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PackedCache",
    "append_packed",
    "append_reference",
    "decode_attention",
    "decode_reference",
    "dequantize",
    "dequantize_packed",
    "group_size",
    "pack",
    "packed_words",
    "supported_head_dim",
    "unpack",
]
