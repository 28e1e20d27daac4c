"""Quantization core: datatypes, outliers, storage and accounting. Pure PyTorch, no transformers.

The bit packing of codes is the kernels' format (:mod:`transformers_kvquant.kernels.layout`); it is re-exported here.
"""

from ..kernels.layout import pack, packed_words, unpack
from .codebook import Codebook, qnorm_parameters, uniform_codebook
from .kmeans import weighted_kmeans_1d
from .memory import MemoryReport, store_report
from .quantizer import (
    ChannelKeyQuantizer,
    QuantizedVectors,
    TokenQuantizer,
    fake_quantize,
    outlier_slots,
)
from .store import FullPrecisionStore, PackedStore

__all__ = [
    "ChannelKeyQuantizer",
    "Codebook",
    "FullPrecisionStore",
    "MemoryReport",
    "PackedStore",
    "QuantizedVectors",
    "TokenQuantizer",
    "fake_quantize",
    "outlier_slots",
    "pack",
    "packed_words",
    "qnorm_parameters",
    "store_report",
    "uniform_codebook",
    "unpack",
    "weighted_kmeans_1d",
]
