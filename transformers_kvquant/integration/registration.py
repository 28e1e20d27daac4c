"""`cache_implementation="kvquant"`: the only monkeypatches in the package, small and version-checked.

transformers 5.x has no public registry of cache implementations, so ``import transformers_kvquant`` makes
three changes (each checked against the generation API it relies on, not against a list of versions):

1. adds ``"kvquant"`` to ``generation.configuration_utils.ALL_CACHE_IMPLEMENTATIONS`` and
   ``ALL_STATIC_CACHE_IMPLEMENTATIONS`` (validation reads these module globals at call time; the second only decides
   whether ``generation_config.max_cache_len`` is warned about as ignored, and a kvquant cache honours it);
2. wraps ``GenerationMixin._prepare_cache_for_generation`` so that name builds a :class:`KVQuantCache` from
   ``cache_config`` (any other name goes to the original method untouched);
3. wraps ``GenerationConfig.save_pretrained`` and ``GenerationConfig.__init__`` so a saved
   ``generation_config.json`` never contains ``"cache_implementation": "kvquant"`` (which would make the model
   unloadable without this package): it is written under a custom ``"kvquant"`` key that vanilla transformers
   ignores, and turned back into the cache implementation when this package is imported.

The patch-free route is always available: ``generate(past_key_values=KVQuantCache(model, ...))``.
"""

from __future__ import annotations

import copy
import inspect
import logging
import warnings

import transformers
from packaging.version import Version

from ..config.kvquant_config import KVQuantConfig
from .cache import KVQuantCache
from .compat import IncompatibleTransformersError

logger = logging.getLogger("transformers_kvquant")

NAME = "kvquant"
SAVED_KEY = "kvquant"
OLDEST_SUPPORTED = "5.17.0"  # the oldest transformers the test matrix runs (the GPU image's)
_EXPECTED_PARAMS = ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"]

__all__ = ["IncompatibleTransformersError", "register", "register_at_import"]


def check_transformers() -> None:
    import transformers.generation.configuration_utils as cu
    from transformers.generation.utils import GenerationMixin

    version = Version(transformers.__version__)
    if version < Version(OLDEST_SUPPORTED) or version.major != 5:
        raise IncompatibleTransformersError(
            f"transformers-kvquant needs transformers >=5.17,<6, found {transformers.__version__}"
        )
    problems = []
    for name in ("ALL_CACHE_IMPLEMENTATIONS", "ALL_STATIC_CACHE_IMPLEMENTATIONS"):
        if not isinstance(getattr(cu, name, None), tuple):
            problems.append(f"generation.configuration_utils.{name} is not a tuple")
    method = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    original = getattr(method, "__wrapped__", method)
    if original is None or list(inspect.signature(original).parameters)[:6] != _EXPECTED_PARAMS:
        problems.append("GenerationMixin._prepare_cache_for_generation has a different signature")
    if problems:
        raise IncompatibleTransformersError(
            f"transformers {transformers.__version__}: " + "; ".join(problems) + ". Use "
            "generate(past_key_values=KVQuantCache(model, ...)) instead of cache_implementation='kvquant'."
        )
    # Newer versions are not warned about: whether the attention hook still works is probed on a tiny model when
    # a model is patched (compat.check_hook_contract), which is what matters, whatever the version number says.


def register_at_import() -> bool:
    """What ``import transformers_kvquant`` runs: :func:`register`, or, when this transformers is incompatible, a
    warning instead of an import error, so ``past_key_values=KVQuantCache(...)`` stays usable. True if registered."""
    try:
        register()
    except IncompatibleTransformersError as e:
        warnings.warn(f"cache_implementation='kvquant' is not available: {e}", stacklevel=3)
        return False
    return True


def register() -> None:
    """Make ``"kvquant"`` a cache implementation (idempotent)."""
    import transformers.generation.configuration_utils as cu
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    check_transformers()
    if NAME not in cu.ALL_CACHE_IMPLEMENTATIONS:
        cu.ALL_CACHE_IMPLEMENTATIONS = cu.ALL_CACHE_IMPLEMENTATIONS + (NAME,)
    if NAME not in cu.ALL_STATIC_CACHE_IMPLEMENTATIONS:
        cu.ALL_STATIC_CACHE_IMPLEMENTATIONS = cu.ALL_STATIC_CACHE_IMPLEMENTATIONS + (NAME,)

    current = GenerationMixin._prepare_cache_for_generation
    if not getattr(current, "_kvquant", False):
        GenerationMixin._prepare_cache_for_generation = _wrap_prepare_cache(current)
    if not getattr(GenerationConfig.save_pretrained, "_kvquant", False):
        GenerationConfig.save_pretrained = _wrap_save(GenerationConfig.save_pretrained)
    if not getattr(GenerationConfig.__init__, "_kvquant", False):
        GenerationConfig.__init__ = _wrap_init(GenerationConfig.__init__)


def _wrap_prepare_cache(original):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs):
        if generation_config.cache_implementation != NAME or generation_config.use_cache is False:
            return original(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        # The original prepares the default cache: it puts it under whatever name this transformers uses
        # (`past_key_values` before 5.24, `cache` since), and we replace it. An assistant (draft) model keeps the
        # default cache (its codebooks would be a different model's), and its generate passes its cache back in.
        default_config = copy.copy(generation_config)
        default_config.cache_implementation = None
        if generation_config.is_assistant:
            return original(self, default_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        from transformers.cache_utils import Cache

        if any(isinstance(value, Cache) for value in model_kwargs.values()):
            raise ValueError(
                "Passing both `cache_implementation` (used to initialize certain caches) and a Cache object "
                "(`past_key_values` / `cache`) is unsupported. Please use only one of the two."
            )
        before = {key: id(value) for key, value in model_kwargs.items()}
        original(self, default_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs)
        created = [key for key, value in model_kwargs.items() if isinstance(value, Cache) and before.get(key) != id(value)]
        if len(created) != 1:
            raise IncompatibleTransformersError(
                f"transformers {transformers.__version__}: generate prepared {len(created)} caches where "
                "transformers-kvquant expected one; use generate(past_key_values=KVQuantCache(model, ...)) instead"
            )
        cache_config = copy.deepcopy(generation_config.cache_config) if generation_config.cache_config else {}
        if not isinstance(cache_config, dict):
            raise TypeError(f"cache_config for cache_implementation='kvquant' must be a dict, got {type(cache_config).__name__}")
        # generation_config.max_cache_len: the capacity for the worst case across calls, as for "static"
        worst_case = getattr(generation_config, "max_cache_len", None)
        if worst_case and (cache_config.get("static") is False or cache_config.get("outliers") == "uncapped"):
            raise ValueError(
                f"generation_config.max_cache_len={worst_case} sizes a static cache, but cache_config asks for a growing "
                "one (static=False or outliers='uncapped'); drop one of the two"
            )
        length = max(max_cache_length, worst_case or 0)
        model_kwargs[created[0]] = KVQuantCache.for_generate(self, length, **cache_config)

    _prepare_cache_for_generation._kvquant = True
    _prepare_cache_for_generation.__wrapped__ = original
    return _prepare_cache_for_generation


def _wrap_save(original):
    def save_pretrained(self, *args, **kwargs):
        if self.cache_implementation != NAME:
            return original(self, *args, **kwargs)
        cache_config = copy.deepcopy(self.cache_config) if self.cache_config else None
        if isinstance(cache_config, dict) and isinstance(cache_config.get("config"), KVQuantConfig):
            logger.warning("cache_config['config'] is a KVQuantConfig object: saved without it (save a path instead)")
            cache_config.pop("config")
        saved = (self.cache_implementation, self.cache_config, self._from_model_config, self.__dict__.get(SAVED_KEY))
        try:
            setattr(self, SAVED_KEY, {"cache_implementation": NAME, "cache_config": cache_config})
            self.cache_implementation = None
            self.cache_config = None
            self._from_model_config = False  # custom keys survive loading only when this is false
            return original(self, *args, **kwargs)
        finally:
            self.cache_implementation, self.cache_config, self._from_model_config = saved[:3]
            if saved[3] is None:
                self.__dict__.pop(SAVED_KEY, None)
            else:
                setattr(self, SAVED_KEY, saved[3])

    save_pretrained._kvquant = True
    save_pretrained.__wrapped__ = original
    return save_pretrained


def _wrap_init(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        saved = self.__dict__.get(SAVED_KEY)
        if isinstance(saved, dict) and saved.get("cache_implementation") == NAME and self.cache_implementation is None:
            self.cache_implementation = NAME
            self.cache_config = saved.get("cache_config")
            del self.__dict__[SAVED_KEY]

    __init__._kvquant = True
    __init__.__wrapped__ = original
    return __init__
