"""Random byte damage to a saved config never loads silently: KVQuantConfigError, or a config equal to the original."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transformers_kvquant.config import (
    CONFIG_NAME,
    TENSORS_NAME,
    KVQuantConfig,
    KVQuantConfigError,
)

FUZZ = settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def original(stories_config, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-original")
    stories_config.save_pretrained(folder)
    return folder, KVQuantConfig.from_pretrained(folder)


def damage(data: bytes, edits: list[tuple[float, int]], keep: float | None) -> bytes:
    """Overwrite bytes at relative positions, then keep only the first ``keep`` fraction (a truncation)."""
    out = bytearray(data)
    for where, value in edits:
        out[min(int(where * len(out)), len(out) - 1)] = value
    if keep is not None:
        out = out[: int(keep * len(out))]
    return bytes(out)


# Any byte, and often a JSON-meaningful one: a digit swapped for another keeps the JSON valid and changes a value.
byte = st.one_of(st.integers(0, 255), st.sampled_from(list(b"0123456789-+.eE \t\n\",:[]{}tfn")))
edits = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), byte), max_size=4)
truncation = st.one_of(st.none(), st.floats(0, 1, exclude_max=True))


def load_damaged(original, name: str, edit_list, keep) -> tuple[bool, bytes]:
    """Write a damaged copy of one file; return (changed, bytes) after checking the load outcome."""
    folder, config = original
    data = (folder / name).read_bytes()
    damaged = damage(data, edit_list, keep)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp)
        shutil.copy(folder / CONFIG_NAME, copy / CONFIG_NAME)
        shutil.copy(folder / TENSORS_NAME, copy / TENSORS_NAME)
        (copy / name).write_bytes(damaged)
        try:
            loaded = KVQuantConfig.from_pretrained(copy)
        except KVQuantConfigError as e:
            assert str(e)  # an explanation, never an empty message
            return True, damaged
        # It loaded: the damage must have been harmless (same bytes, or only JSON layout changed).
        assert loaded == config, f"damaged {name} loaded as a different config"
        return False, damaged


@FUZZ
@given(edit_list=edits, keep=truncation)
def test_damaged_json_never_loads_silently(original, edit_list, keep):
    load_damaged(original, CONFIG_NAME, edit_list, keep)


@FUZZ
@given(edit_list=edits.filter(bool), keep=truncation)
def test_damaged_tensor_file_never_loads_silently(original, edit_list, keep):
    folder, _ = original
    raised, damaged = load_damaged(original, TENSORS_NAME, edit_list, keep)
    # The tensor file is covered by its sha256: any real change is refused.
    assert raised or damaged == (folder / TENSORS_NAME).read_bytes()


def test_fuzzing_reaches_both_outcomes(original):
    """The harness can tell the outcomes apart: a layout-only change loads, a one-digit change is refused."""
    folder, _ = original
    text = (folder / CONFIG_NAME).read_bytes()
    space = text.index(b" ")
    assert not load_damaged(original, CONFIG_NAME, [((space + 0.5) / len(text), ord("\t"))], None)[0]
    digit = next(i for i in range(len(text) // 2, len(text)) if text[i : i + 1].isdigit())
    flipped = ord("7") if text[digit] != ord("7") else ord("3")
    assert load_damaged(original, CONFIG_NAME, [((digit + 0.5) / len(text), flipped)], None)[0]
