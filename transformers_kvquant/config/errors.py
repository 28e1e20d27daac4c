"""The errors of the config layer: every problem with a config names the file, the field and the remedy."""

from __future__ import annotations

import os


class KVQuantConfigError(ValueError):
    """A kvquant config is missing, malformed, corrupted or does not belong to the model."""

    def __init__(self, message: str, *, file: str | os.PathLike | None = None, field: str | None = None, remedy: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        self.remedy = remedy
        parts = []
        if self.file:
            parts.append(f"{self.file}")
        if field:
            parts.append(f"field '{field}'")
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if remedy:
            text += f" ({remedy})"
        super().__init__(text)


class ConfigNotFoundError(KVQuantConfigError):
    """There is no ``kvquant_config.json`` at the place named (as opposed to one that is there but broken)."""


RECALIBRATE = "re-create it with `kvquant calibrate MODEL --bits B --outliers F -o DIR`"
