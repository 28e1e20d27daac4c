"""Text for calibration and evaluation: WikiText raw files, .jsonl documents, plain text, or a `datasets` name."""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

DEFAULT_CALIBRATION = "calibration_c4.jsonl"


class DatasetError(ValueError):
    """A dataset file that is missing, empty or unreadable."""


def default_calibration_path() -> Path:
    return Path(str(resources.files("transformers_kvquant") / "data" / DEFAULT_CALIBRATION))


def parse_documents(spec: str | None) -> slice | None:
    """``"150:"`` / ``"0:150"`` -> slice of document indices (for .jsonl files)."""
    if not spec:
        return None
    try:
        start, _, end = spec.partition(":")
        return slice(int(start) if start else None, int(end) if end else None)
    except ValueError as e:
        raise DatasetError(f"--documents must look like START:END (e.g. 150:), got {spec!r}") from e


def load_text(path: str | os.PathLike, documents: slice | None = None) -> str:
    """The evaluation text of a dataset file.

    - ``*.raw`` (WikiText raw): rows joined as ``"\\n\\n".join(rows)``, the usual GPTQ/HF evaluation text;
    - ``*.jsonl``: the ``text`` field of each line (optionally a slice of documents), joined by blank lines;
    - anything else: read as plain UTF-8 text.
    A name that is not a file is tried as a Hugging Face `datasets` dataset when that library is installed.
    """
    p = Path(path)
    if not p.exists():
        return _from_datasets_library(str(path))
    if p.is_dir():
        raise DatasetError(f"dataset {p} is a folder; pass a .raw, .jsonl or .txt file")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"cannot read dataset {p}: {e}") from e
    if p.suffix == ".raw":
        rows = [(line + "\n") if line.strip() else "" for line in raw.split("\n")[:-1]]
        text = "\n\n".join(rows)
    elif p.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{p}, line {n}: not valid JSON ({e.msg}); each line must be an object with a 'text' field") from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DatasetError(f"{p}, line {n}: each line must be a JSON object with a string 'text' field")
            docs.append(record["text"])
        if documents is not None:
            docs = docs[documents]
        text = "\n\n".join(docs)
    else:
        text = raw
    if not text.strip():
        raise DatasetError(f"dataset {p} is empty" + (" (after selecting documents)" if documents else ""))
    return text


def _from_datasets_library(name: str) -> str:
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise DatasetError(
            f"dataset {name!r} is not a file; pass a local .raw, .jsonl or .txt file (a Hugging Face dataset name "
            "works only when the `datasets` library is installed and the Hub is reachable)"
        ) from None
    from datasets import load_dataset

    repo, _, config = name.partition(":")
    try:
        ds = load_dataset(repo, config or None, split="test")
    except Exception as e:  # datasets raises many types (connection, missing config)
        raise DatasetError(f"cannot load dataset {name!r} with the datasets library: {e}") from e
    text = "\n\n".join(t for t in ds["text"])
    if not text.strip():
        raise DatasetError(f"dataset {name!r} is empty")
    return text
