"""transformers-kvquant: KVQuant KV-cache quantization for Hugging Face Transformers.

``import transformers_kvquant`` registers ``cache_implementation="kvquant"`` for ``generate``. The public API:

- :class:`KVQuantCache`: the cache (``generate(past_key_values=KVQuantCache(model, ...))``);
- :class:`KVQuantConfig`: a calibrated ``kvquant_config.json`` (``from_pretrained`` / ``save_pretrained`` /
  ``push_to_hub``), and :func:`push_config` / :func:`pull_config` for config folders on the Hub;
- :func:`calibrate` (with :func:`calibration_windows`): fit a config for a model;
- :func:`load_model`: the embedded default model (``"smollm2"``), a local folder or a Hub id, with its tokenizer;
- :func:`patch_model` / :func:`unpatch_model`: install or remove the attention hook by hand;
- the errors :class:`KVQuantConfigError`, :class:`UnsupportedModelError`, :class:`IncompatibleTransformersError`.
"""

from ._version import __version__
from .calibration.statistics import calibration_windows
from .calibration.support import UnsupportedModelError
from .config.calibrate import calibrate
from .config.errors import KVQuantConfigError
from .config.kvquant_config import KVQuantConfig, pull_config, push_config
from .integration.attention import unpatch_model
from .integration.cache import KVQuantCache
from .integration.compat import IncompatibleTransformersError
from .integration.patch import patch_model
from .integration.registration import register_at_import as _register
from .models import load_model

_register()

__all__ = [
    "IncompatibleTransformersError",
    "KVQuantCache",
    "KVQuantConfig",
    "KVQuantConfigError",
    "UnsupportedModelError",
    "__version__",
    "calibrate",
    "calibration_windows",
    "load_model",
    "patch_model",
    "pull_config",
    "push_config",
    "unpatch_model",
]
