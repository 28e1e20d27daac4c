"""The contract between the attention hook and a cache that stores pre-RoPE keys, written once.

A cache that stores keys *before* RoPE says so (:class:`PreRopeCache`: ``stores_pre_rope_keys = True``); the
attention pre-hook (:mod:`.attention`) then neutralises the model's RoPE, calls :meth:`PreRopeLayer.stage` on the
layer with the positions of the tokens about to be stored, and routes attention through
:meth:`PreRopeLayer.attend`, which rotates the queries at their own positions and the keys at their stored ones.

Three caches follow it: :class:`~transformers_kvquant.integration.cache.KVQuantCache` (packed storage),
the evaluation's ``SimulationCache`` (fake quantization) and the hook probe's exact recording cache
(:mod:`.compat`). They share this code instead of copies of it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..kernels.rope import apply_rope


class PreRopeCache(Cache):
    """A ``transformers`` cache whose layers are :class:`PreRopeLayer`: the attention hook feeds it un-rotated keys."""

    stores_pre_rope_keys = True


def key_rotation(rotary, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the model's rotary embedding at stored positions ``[B, L]``, on ``like``'s device and dtype."""
    cos, sin = rotary(like, positions.to(like.device).long())
    return cos.to(like.device), sin.to(like.device)


class PreRopeLayer:
    """Mixin for a cache layer (beside ``CacheLayerMixin``) that stores pre-RoPE keys with their positions.

    Subclasses implement :meth:`returned_positions` (the positions of the keys their last ``update`` returned) and call
    :meth:`take_staged_positions` in ``update``. :meth:`attend` is the reference path: RoPE applied to the queries
    and the returned keys, then the model's own attention function (``inner``).
    """

    _staged: torch.Tensor | None = None
    missing_hook_error = (
        "the cache was updated without the KVQuant attention hook: the keys would be post-RoPE; "
        "call transformers_kvquant.patch_model(model) first"
    )

    def stage(self, position_ids: torch.Tensor | None, query_length: int) -> None:
        """Called by the attention pre-hook: the RoPE positions ``[B or 1, T]`` of the tokens about to be stored."""
        if position_ids is None:
            seen = self.get_seq_length()
            position_ids = torch.arange(seen, seen + query_length).unsqueeze(0)
        self._staged = position_ids

    def take_staged_positions(self, n: int) -> torch.Tensor:
        """The staged positions of ``n`` new tokens (once); raises when the hook did not stage them."""
        positions, self._staged = self._staged, None
        if positions is None:
            raise RuntimeError(self.missing_hook_error)
        if positions.shape[-1] != n:
            raise RuntimeError(f"staged {positions.shape[-1]} positions for {n} new tokens")
        return positions

    def returned_positions(self) -> torch.Tensor:
        """RoPE positions ``[B or 1, L]`` of the keys the last ``update`` returned."""
        raise NotImplementedError

    def rotate_query(self, query: torch.Tensor, ctx) -> torch.Tensor:
        """The queries ``[B, Hq, T, D]`` rotated with the model's own ``(cos, sin)`` (bit-identical to stock)."""
        return apply_rope(query, ctx.cos.to(query.device), ctx.sin.to(query.device))

    def key_rotation(self, key: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of the returned keys at their stored positions (:meth:`returned_positions`)."""
        return key_rotation(ctx.rotary, key, self.returned_positions())

    def attend(self, module, query, key, value, attention_mask, ctx, inner, **kwargs):
        """Rotate the queries and the returned pre-RoPE keys, then run the model's attention ``inner``."""
        cos_k, sin_k = self.key_rotation(key, ctx)
        return inner(module, self.rotate_query(query, ctx), apply_rope(key, cos_k, sin_k), value, attention_mask, **kwargs)
