"""The transformers integration (layer 5): the ``Cache`` subclass, the attention hook and ``cache_implementation``.

- :mod:`.prerope`: the contract between the hook and a cache of pre-RoPE keys (:class:`~.prerope.PreRopeCache`,
  :class:`~.prerope.PreRopeLayer`: ``stage`` and ``attend``);
- :mod:`.attention`: the forward pre-hook and the ``kvquant_sdpa`` / ``kvquant_eager`` attention functions;
- :mod:`.patch`: :func:`~.patch.patch_model` (support check, hook probe, hooks);
- :mod:`.compat`: what differs between transformers versions, and the probe that checks the hook;
- :mod:`.cache`: :class:`~.cache.KVQuantCache` and its layers; :mod:`.settings`: its ``cache_config``;
- :mod:`.kernel_dispatch`: when a layer attends in the Triton kernels, and the adapter to them;
- :mod:`.registration`: ``cache_implementation="kvquant"`` for ``generate``.
"""
