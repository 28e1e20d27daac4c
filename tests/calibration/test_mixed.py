"""Mixed precision across layers: the format (per-layer widths, format_version 2), the bit allocation, the cache."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, quick_config
from tests.hub.common import read_config_json, write_config_json
from transformers_kvquant.config import CONFIG_NAME, TENSORS_NAME, KVQuantConfig, KVQuantConfigError
from transformers_kvquant.config.format import schema

WIDTHS = [2, 3, 4, 3, 2]  # stories260K has 5 layers


@pytest.fixture(scope="module")
def mixed_config(stories):
    """A stories260K config whose layers have the widths WIDTHS (codebooks fitted at each width)."""
    model, _ = stories
    by_width = {b: quick_config(model, bits=b, outlier_fraction=0.01) for b in (2, 3, 4)}
    base = by_width[3]
    layers = [by_width[b].layers[i] for i, b in enumerate(WIDTHS)]
    data = dict(base.__dict__)
    data.update(bits=4, layers=layers, layer_bits=list(WIDTHS))
    return KVQuantConfig(**data)


def load_error(folder: Path) -> KVQuantConfigError:
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantConfig.from_pretrained(folder)
    return info.value


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "edited"
    shutil.copytree(folder, out)
    return out


# ------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize("name", ["nuq3-1pct", "nuq2", "nuq4-1pct"])
def test_single_width_configs_are_written_byte_for_byte_as_version_1(name, tmp_path):
    """A shipped (version 1) config loads and saves back to the very same bytes: no layer_bits, version 1."""
    shipped = REPO / "hub_configs" / "smollm2-135m-instruct" / name
    config = KVQuantConfig.from_pretrained(shipped)
    assert config.layer_bits is None and config.format_version == 1
    config.save_pretrained(tmp_path)
    for f in (CONFIG_NAME, TENSORS_NAME):
        assert (tmp_path / f).read_bytes() == (shipped / f).read_bytes(), f
    data = read_config_json(tmp_path)
    assert data["format_version"] == 1 and "layer_bits" not in data


def test_mixed_round_trip(mixed_config, tmp_path):
    mixed_config.save_pretrained(tmp_path)
    data = read_config_json(tmp_path)
    assert data["format_version"] == 2 and data["layer_bits"] == WIDTHS and data["bits"] == 4
    assert [len(layer["key_centroids"]) for layer in data["layers"]] == [2**b for b in WIDTHS]
    loaded = KVQuantConfig.from_pretrained(tmp_path)
    assert loaded == mixed_config
    assert loaded.layer_bits == WIDTHS and loaded.format_version == 2
    assert [loaded.layer_width(i) for i in range(5)] == WIDTHS
    assert [loaded.key_quantizer(i).codebook.bits for i in range(5)] == WIDTHS
    assert loaded.name == "nuq-mix2.8-1%"
    # saving again gives the same bytes
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert (again / CONFIG_NAME).read_bytes() == (tmp_path / CONFIG_NAME).read_bytes()


def test_runtime_override_keeps_the_widths(mixed_config):
    assert mixed_config.with_runtime(sink_tokens=0).layer_bits == WIDTHS


def _edited_error(mixed_config, tmp_path, edit) -> KVQuantConfigError:
    folder = tmp_path / "cfg"
    mixed_config.save_pretrained(folder)
    data = read_config_json(folder)
    edit(data)
    write_config_json(folder, data)  # sealed: a deliberate, consistent edit reaches the value checks
    return load_error(folder)


def _assert_clear(error: KVQuantConfigError, field: str, *words: str) -> None:
    text = str(error)
    assert error.field == field, text
    assert f"field '{field}'" in text and CONFIG_NAME in text and error.remedy in text
    for w in words:
        assert w in text, text


def test_wrong_number_of_widths(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d["layer_bits"].pop())
    _assert_clear(error, "layer_bits", "4 entries", "num_layers is 5")


def test_width_not_supported(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d["layer_bits"].__setitem__(1, 5))
    _assert_clear(error, "layer_bits[1]", "(2, 3, 4)", "got 5")


def test_codebook_size_must_match_the_layer_width(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d["layer_bits"].__setitem__(0, 3))
    _assert_clear(error, "layers[0].key_centroids", "4 centroids", "layer_bits[0] is 3", "needs 8")


def test_bits_must_be_the_widest_width(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d.__setitem__("bits", 3))
    _assert_clear(error, "bits", "widest")


def test_widths_need_version_2(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d.__setitem__("format_version", 1))
    _assert_clear(error, "format_version", "format_version 2", "layer_bits")


def test_version_2_needs_widths(mixed_config, tmp_path):
    def drop(d):
        del d["layer_bits"]
        d["bits"] = 3  # the codebook sizes are then checked against bits by the schema, but layer_bits is missing first
    error = _edited_error(mixed_config, tmp_path, drop)
    _assert_clear(error, "layer_bits", "is missing", "one width per layer")


@pytest.mark.parametrize("version", [0, -1])
def test_unknown_old_version(mixed_config, tmp_path, version):
    error = _edited_error(mixed_config, tmp_path, lambda d: d.__setitem__("format_version", version))
    _assert_clear(error, "format_version", "(1, 2)")


def test_newer_version_asks_for_an_upgrade(mixed_config, tmp_path):
    error = _edited_error(mixed_config, tmp_path, lambda d: d.__setitem__("format_version", 3))
    assert error.field == "format_version" and "pip install -U transformers-kvquant" in str(error)
    assert "newer than this package reads (2)" in str(error)


def test_construction_checks_the_widths(mixed_config):
    data = dict(mixed_config.__dict__)
    with pytest.raises(KVQuantConfigError, match="one width per layer"):
        KVQuantConfig(**{**data, "layer_bits": WIDTHS[:-1]})
    with pytest.raises(KVQuantConfigError, match="widths must be one of"):
        KVQuantConfig(**{**data, "layer_bits": [2, 3, 4, 3, 16]})
    with pytest.raises(KVQuantConfigError, match=r"layer 0 key_codebook has 2 bits, layer_bits\[0\] says 3"):
        KVQuantConfig(**{**data, "layer_bits": [3, 3, 4, 3, 2]})
    with pytest.raises(KVQuantConfigError, match="widest"):
        KVQuantConfig(**{**data, "bits": 3})


def test_save_refuses_a_config_with_bad_widths(mixed_config, tmp_path):
    """A width changed on the object after construction never reaches the disk."""
    import copy

    bad = copy.copy(mixed_config)
    bad.layer_bits = [2, 3, 4, 3, 7]
    with pytest.raises(KVQuantConfigError) as info:
        bad.save_pretrained(tmp_path)
    assert info.value.field == "layer_bits[4]"
    assert not (tmp_path / CONFIG_NAME).exists()


def test_schema_copy_in_docs_is_the_package_schema():
    assert json.loads((REPO / "docs" / "kvquant_config.schema.json").read_text()) == schema()
    assert schema()["properties"]["format_version"]["enum"] == [1, 2]
