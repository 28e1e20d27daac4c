"""Config and Hub (layer 4): a calibrated :class:`KVQuantConfig`, its files, and where they come from.

- :mod:`.kvquant_config`: :class:`KVQuantConfig` (built from a calibration result), :func:`load_config_file`,
  :func:`push_config`, :func:`pull_config`;
- :mod:`.format`: the ``kvquant_config.json`` + ``kvquant_calibration.safetensors`` format (names, checksums,
  atomic writes, validation);
- :mod:`.hub`: resolving, downloading and uploading the two files (no ``KVQuantConfig`` in it);
- :mod:`.discovery`: which config serves a model (explicit, beside the model, or shipped in ``hub_configs/``);
- :mod:`.calibrate`: ``calibrate`` / ``fit_config``, the calibration layer's results as a config (the package
  root exports ``calibrate``; this package keeps the name for the module);
- :mod:`.presets`: named runtime settings beside a config (``default``, ``long-context``, ``paper``);
- :mod:`.errors`: :class:`KVQuantConfigError` (names the file, the field and the remedy).
"""

from ..calibration.fingerprint import ModelFingerprint
from ..calibration.fit import LayerCalibration
from .errors import ConfigNotFoundError, KVQuantConfigError
from .format import CONFIG_NAME, FORMAT_VERSION, TENSORS_NAME, content_sha256
from .kvquant_config import KVQuantConfig, load_config_file, pull_config, push_config

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "TENSORS_NAME",
    "ConfigNotFoundError",
    "KVQuantConfig",
    "KVQuantConfigError",
    "LayerCalibration",
    "ModelFingerprint",
    "content_sha256",
    "load_config_file",
    "pull_config",
    "push_config",
]
