"""transformers-kvquant: KVQuant KV-cache quantization for Hugging Face Transformers."""

__version__ = "0.1.0"

from .config import KVQuantConfig, KVQuantConfigError

__all__ = ["KVQuantConfig", "KVQuantConfigError", "__version__"]
