"""Calibration (layer 3): which models are supported, what a model is, and codebooks fitted to its keys and values.

- :mod:`.support`: :func:`check_supported` / :func:`find_rotary` and :class:`UnsupportedModelError`;
- :mod:`.fingerprint`: :class:`ModelFingerprint` (attention geometry, RoPE, weights signature);
- :mod:`.statistics`: :func:`collect_statistics`, the forward/backward pass that records activations and Fisher
  information, and :func:`calibration_windows`;
- :mod:`.fit`: :func:`fit_calibration`, per-layer key ranges and codebooks (:class:`LayerCalibration`), returned as a
  :class:`CalibrationResult`;
- :mod:`.mixed`: :func:`fit_mixed_precision`, one width per layer at a budget of stored bits (an exact knapsack,
  :func:`allocate_bits`, over each layer's Fisher-weighted error at 2, 3 and 4 bits).

Nothing here reads or writes config files: ``transformers_kvquant.calibrate`` (in
:mod:`transformers_kvquant.config.calibrate`) runs this layer and returns a ``KVQuantConfig``.
"""

from .fingerprint import ModelFingerprint, weights_signature
from .fit import CODEBOOKS, CalibrationResult, LayerCalibration, fit_calibration
from .mixed import allocate_bits, fit_mixed_precision
from .statistics import CalibrationStatistics, calibration_windows, collect_statistics
from .support import UnsupportedModelError, check_supported, find_rotary

__all__ = [
    "CODEBOOKS",
    "CalibrationResult",
    "CalibrationStatistics",
    "LayerCalibration",
    "ModelFingerprint",
    "UnsupportedModelError",
    "allocate_bits",
    "calibration_windows",
    "check_supported",
    "collect_statistics",
    "find_rotary",
    "fit_calibration",
    "fit_mixed_precision",
    "weights_signature",
]
