"""Triton kernels that work directly on KVQuant's packed KV cache, each with a PyTorch reference in :mod:`.naive`.

- :func:`append_packed` (:mod:`.append`): quantize and pack new tokens into the cache buffers.
- :func:`decode_attention` (:mod:`.decode`): one query per row over the packed cache, split over the sequence.
- :func:`prefill_attention` (:mod:`.prefill`): a chunk of queries over the packed cache (itself included).

The cache is described by :class:`PackedKV` (:mod:`.layout`). Nothing here imports transformers.
"""

from .append import append_packed
from .decode import decode_attention
from .layout import PackedKV, packed_words, supported_head_dim
from .naive import append_naive, packed_attention_naive
from .prefill import prefill_attention

__all__ = [
    "PackedKV",
    "append_naive",
    "append_packed",
    "decode_attention",
    "packed_attention_naive",
    "packed_words",
    "prefill_attention",
    "supported_head_dim",
]
