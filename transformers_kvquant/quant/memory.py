"""Memory accounting: the real bytes of every stored tensor, and average bits per cached K/V element."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class MemoryReport:
    """Bytes by component, summed over layers, for ``elements`` cached K and V values."""

    bytes_by_component: dict[str, int] = field(default_factory=dict)
    elements: int = 0  # K and V values represented (tokens x heads x head_dim x 2, over layers and rows)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_component.values())

    @property
    def avg_bits(self) -> float:
        """Average stored bits per K/V element, everything included."""
        return 8.0 * self.total_bytes / self.elements if self.elements else 0.0

    def fraction_of(self, bits: int = 16) -> float:
        """Size relative to a plain cache of ``bits``-bit values (fp16: 16)."""
        return self.avg_bits / bits

    def __add__(self, other: MemoryReport) -> MemoryReport:
        total = Counter(self.bytes_by_component)
        total.update(other.bytes_by_component)
        return MemoryReport(dict(total), self.elements + other.elements)

    def summary(self) -> str:
        return f"{self.total_bytes / 2**20:.2f} MiB, {self.avg_bits:.3f} bits/element"


def store_report(store) -> MemoryReport:
    """Report for one layer store (`PackedStore` or `FullPrecisionStore`)."""
    if not store.initialized:
        return MemoryReport()
    elements = 2 * store.batch * store.stored * store.heads * store.head_dim
    return MemoryReport(dict(store.nbytes()), elements)
