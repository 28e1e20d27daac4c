"""transformers-kvquant: KVQuant KV-cache quantization for Hugging Face Transformers.

``import transformers_kvquant`` registers ``cache_implementation="kvquant"`` for ``generate``.
"""

__version__ = "0.1.0"

from .attention import UnsupportedModelError, patch_model, unpatch_model
from .cache import KVQuantCache
from .config import KVQuantConfig, KVQuantConfigError
from .registration import register_at_import as _register

_register()

__all__ = [
    "KVQuantCache",
    "KVQuantConfig",
    "KVQuantConfigError",
    "UnsupportedModelError",
    "__version__",
    "patch_model",
    "unpatch_model",
]
