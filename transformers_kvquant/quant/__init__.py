"""Quantization core: datatypes, packing, outliers, storage and accounting. Pure PyTorch, no transformers."""

from .codebook import Codebook, qnorm_parameters, uniform_codebook
from .kmeans import weighted_kmeans_1d
from .memory import MemoryReport, store_report
from .packing import pack, packed_words, unpack
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
