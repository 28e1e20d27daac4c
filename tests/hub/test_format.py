"""kvquant_config.json: round trip, JSON Schema, and every validation error naming its file, field and remedy."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers_kvquant.kernels.layout import SUPPORTED_BITS

from tests.helpers import REPO, quick_config, tiny_llama
from tests.hub.common import (
    read_config_json,
    replace_tensor_file,
    tiny_config,
    write_config_json,
)
from transformers_kvquant.config import (
    CONFIG_NAME,
    FORMAT_VERSION,
    TENSORS_NAME,
    KVQuantConfig,
    KVQuantConfigError,
    LayerCalibration,
    content_sha256,
)
from transformers_kvquant.config.format import CODEBOOK_KINDS, SCHEMA_NAME, schema
from transformers_kvquant.quant.quantizer import fake_quantize

SCHEMA = json.loads((REPO / "docs" / "kvquant_config.schema.json").read_text())


def load_error(folder: Path) -> KVQuantConfigError:
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantConfig.from_pretrained(folder)
    return info.value


def assert_names(error: KVQuantConfigError, field: str, file: str = CONFIG_NAME) -> None:
    """The message names the file, the field and a remedy."""
    text = str(error)
    assert error.field == field, text
    assert f"field '{field}'" in text
    assert file in text
    assert error.remedy and error.remedy in text


# ------------------------------------------------------------------------------------------------- round trip
def test_round_trip_keeps_every_field_and_tensor(stories, stories_config, saved):
    loaded = KVQuantConfig.from_pretrained(saved)
    a, b = stories_config, loaded
    for name in ("format_version", "bits", "outlier_fraction", "sink_tokens", "recent_window", "qnorm", "key_rope", "codebook_kind", "calibration"):
        assert getattr(b, name) == getattr(a, name), name
    assert b.fingerprint.to_dict() == a.fingerprint.to_dict()
    assert b.fingerprint.weights_signature and b.fingerprint.rope
    assert len(b.layers) == len(a.layers) == stories[0].config.num_hidden_layers == 5
    for la, lb in zip(a.layers, b.layers):
        for book in ("key_codebook", "value_codebook"):
            ca, cb = getattr(la, book), getattr(lb, book)
            assert torch.equal(ca.centroids, cb.centroids)
            assert (ca.qnorm_scale, ca.qnorm_offset) == (cb.qnorm_scale, cb.qnorm_offset)
        assert torch.equal(la.key_zero, lb.key_zero) and torch.equal(la.key_scale, lb.key_scale)
        assert lb.key_zero.dtype == torch.float32
    assert loaded == stories_config

    # The loaded config quantizes the real model's keys and values exactly as the original does.
    model, tok = stories
    out = {}
    attn = model.model.layers[1].self_attn
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: out.__setitem__(n, o.detach())) for n in ("k_proj", "v_proj")]
    model(**tok(["Once upon a time there was a little dog."], return_tensors="pt"))
    for h in hooks:
        h.remove()
    k, v = (out[n].reshape(1, out[n].shape[1], 4, 8).transpose(1, 2) for n in ("k_proj", "v_proj"))
    assert torch.equal(fake_quantize(a.key_quantizer(1), k), fake_quantize(b.key_quantizer(1), k))
    assert torch.equal(fake_quantize(a.value_quantizer(1), v), fake_quantize(b.value_quantizer(1), v))
    assert not torch.equal(fake_quantize(b.key_quantizer(1), k), k)  # it really quantized


@pytest.mark.parametrize("bits,outliers,qnorm,key_rope,kind", [(2, 0.0, True, "pre", "nuq"), (4, 0.05, False, "post", "nuq-unweighted"), (3, 0.0, False, "pre", "uniform")])
def test_round_trip_other_settings(tmp_path, bits, outliers, qnorm, key_rope, kind):
    config = tiny_config(0, bits=bits, outlier_fraction=outliers, nuq=kind != "uniform", qnorm=qnorm, key_rope=key_rope, codebook_kind=kind, sink_tokens=4, recent_window=16)
    # Q-Norm parameters other than the identity must survive too.
    layer = config.layers[0]
    config.layers[0] = LayerCalibration(layer.key_codebook.with_qnorm(1.0625, -0.015625), layer.value_codebook.with_qnorm(0.9, 0.1), layer.key_zero, layer.key_scale)
    config.fingerprint.model_id, config.fingerprint.revision = "org/tiny", "abc123"
    config.save_pretrained(tmp_path)
    loaded = KVQuantConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.layers[0].value_codebook.qnorm_offset == 0.1
    assert (loaded.bits, loaded.key_rope, loaded.codebook_kind, loaded.sink_tokens, loaded.recent_window) == (bits, key_rope, kind, 4, 16)
    assert (loaded.fingerprint.model_id, loaded.fingerprint.revision) == ("org/tiny", "abc123")


def test_config_path_and_folder_load_the_same(saved):
    assert KVQuantConfig.from_pretrained(saved / CONFIG_NAME) == KVQuantConfig.from_pretrained(saved)


def test_equality_sees_a_changed_tensor(stories_config):
    layers = list(stories_config.layers)
    changed = layers[1].key_scale.clone()
    changed[0, 0] = torch.nextafter(changed[0, 0], torch.tensor(float("inf")))
    layers[1] = LayerCalibration(layers[1].key_codebook, layers[1].value_codebook, layers[1].key_zero, changed)
    copy = KVQuantConfig(**{**stories_config.__dict__, "layers": layers})
    assert copy != stories_config


# ------------------------------------------------------------------------------------------------- schema
def configs_written_by_this_package(stories_config, tmp_path):
    folders = [stories_config.save_pretrained(tmp_path / "stories")]
    for i, (bits, outliers, extra) in enumerate([(2, 0.0, {"qnorm": True}), (4, 0.05, {"key_rope": "post", "codebook_kind": "nuq-unweighted"})]):
        config = tiny_config(0, bits=bits, outlier_fraction=outliers, **extra)
        config.calibration = {"dataset": "x", "ppl": {"fp": 2.0, "quantized": 2.5, "change_pct": 25.0}, "notes": ["free-form", {"k": 1}]}
        folders.append(config.save_pretrained(tmp_path / str(i)))
    tiny = quick_config(tiny_llama(layers=3, kv_heads=4, head_dim=8), bits=2, outlier_fraction=0.0)
    folders.append(tiny.save_pretrained(tmp_path / "tiny"))
    folders += sorted((REPO / "hub_configs").glob(f"*/*/{CONFIG_NAME}"))  # the shipped ones, when present
    return folders


def test_the_package_validates_with_the_published_schema():
    """One schema: the copy the loader reads is docs/kvquant_config.schema.json, byte for byte, and its enums are
    the package's."""
    shipped = REPO / "transformers_kvquant" / "config" / SCHEMA_NAME
    assert shipped.read_bytes() == (REPO / "docs" / SCHEMA_NAME).read_bytes(), "copy docs/kvquant_config.schema.json over the package's (or back)"
    assert schema() == SCHEMA
    assert tuple(SCHEMA["properties"]["bits"]["enum"]) == SUPPORTED_BITS
    assert tuple(SCHEMA["properties"]["codebook_kind"]["enum"]) == CODEBOOK_KINDS


def test_every_written_config_validates_against_the_schema(stories_config, tmp_path):
    jsonschema = pytest.importorskip("jsonschema")  # in the `test` extra
    validator = jsonschema.Draft202012Validator(SCHEMA)
    validator.check_schema(SCHEMA)
    paths = configs_written_by_this_package(stories_config, tmp_path)
    assert len(paths) >= 4
    for path in paths:
        errors = sorted(validator.iter_errors(json.loads(Path(path).read_text())), key=str)
        assert not errors, f"{path}: {errors[0].message}"


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.pop("fingerprint"),
        lambda d: d.update(bits=5),
        lambda d: d["layers"][0]["key_centroids"].pop(),
        lambda d: d["tensors"].update(sha256="xyz"),
        lambda d: d.update(surprise=1),
        lambda d: d["calibration"].update(ppl={"fp": 1.0}),
    ],
    ids=["missing-fingerprint", "bits-5", "7-centroids-at-3-bits", "bad-sha", "unknown-field", "ppl-incomplete"],
)
def test_schema_rejects_what_the_loader_rejects(saved, edit):
    jsonschema = pytest.importorskip("jsonschema")
    data = read_config_json(saved)
    edit(data)
    assert list(jsonschema.Draft202012Validator(SCHEMA).iter_errors(data))
    write_config_json(saved, data)
    load_error(saved)


# ------------------------------------------------------------------------------------------------- errors
def test_truncated_file(saved):
    text = (saved / CONFIG_NAME).read_text()
    (saved / CONFIG_NAME).write_text(text[: len(text) // 2])
    error = load_error(saved)
    assert "truncated or corrupted" in str(error)
    assert error.field is not None
    assert_names(error, error.field)


@pytest.mark.parametrize("content", [b"", b"not json at all", b"\x89PNG\r\n\x1a\n\x00\x00", b"[1, 2, 3]"], ids=["empty", "text", "binary", "list"])
def test_not_a_json_object(saved, content):
    (saved / CONFIG_NAME).write_bytes(content)
    error = load_error(saved)
    assert CONFIG_NAME in str(error) and error.remedy in str(error)


def test_newer_format_version_asks_for_an_upgrade(saved):
    data = read_config_json(saved)
    data["format_version"] = FORMAT_VERSION + 1
    data["a_field_from_the_future"] = {"x": 1}
    write_config_json(saved, data)
    error = load_error(saved)
    assert_names(error, "format_version")
    assert "pip install -U transformers-kvquant" in str(error)


REQUIRED_TOP = ["format_version", "bits", "outlier_fraction", "sink_tokens", "recent_window", "qnorm", "key_rope", "codebook_kind", "fingerprint", "layers", "calibration", "tensors", "content_sha256"]
REQUIRED_FINGERPRINT = ["architecture", "model_type", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_size", "rope"]


@pytest.mark.parametrize("field", REQUIRED_TOP + [f"fingerprint.{f}" for f in REQUIRED_FINGERPRINT] + ["tensors.file", "tensors.sha256", "layers[1].value_qnorm"])
def test_missing_field(saved, field):
    data = read_config_json(saved)
    parent = data
    *path, last = field.replace("[1]", ".1").split(".")
    for part in path:
        parent = parent[int(part)] if part.isdigit() else parent[part]
    del parent[last]
    write_config_json(saved, data, seal=False)
    error = load_error(saved)
    assert_names(error, field)
    assert "is missing" in str(error)


@pytest.mark.parametrize(
    "field,value",
    [("bits", "3"), ("qnorm", 1), ("sink_tokens", 1.5), ("outlier_fraction", True), ("fingerprint.model_id", 7), ("calibration.num_samples", "2"), ("layers", {})],
)
def test_wrong_type(saved, field, value):
    data = read_config_json(saved)
    parent, _, last = field.rpartition(".")
    (data[parent] if parent else data)[last] = value
    write_config_json(saved, data)
    assert_names(load_error(saved), field)


@pytest.mark.parametrize(
    "field,edit",
    [
        ("bits", lambda d: d.update(bits=5)),
        ("outlier_fraction", lambda d: d.update(outlier_fraction=0.5)),
        ("recent_window", lambda d: d.update(recent_window=-1)),
        ("key_rope", lambda d: d.update(key_rope="during")),
        ("codebook_kind", lambda d: d.update(codebook_kind="lloyd")),
        ("fingerprint.head_dim", lambda d: d["fingerprint"].update(head_dim=0)),
        ("layers", lambda d: d["layers"].pop()),
        ("layers[0].key_centroids", lambda d: d["layers"][0]["key_centroids"].reverse()),
        ("layers[1].value_centroids", lambda d: d["layers"][1]["value_centroids"].pop()),
        ("layers[0].key_qnorm", lambda d: d["layers"][0]["key_qnorm"].append(0.0)),
        ("tensors.file", lambda d: d["tensors"].update(file="../elsewhere.safetensors")),
        ("calibration.ppl.change_pct", lambda d: d["calibration"]["ppl"].pop("change_pct")),
        ("layers[0].extra", lambda d: d["layers"][0].update(extra=[1])),
    ],
)
def test_invalid_values_even_in_a_consistently_sealed_file(saved, field, edit):
    data = read_config_json(saved)
    edit(data)
    write_config_json(saved, data)
    assert_names(load_error(saved), field)


def test_any_edited_value_breaks_the_content_checksum(saved):
    data = read_config_json(saved)
    data["sink_tokens"] = 2  # valid on its own, but not what was written
    write_config_json(saved, data, seal=False)
    error = load_error(saved)
    assert_names(error, "content_sha256")
    assert "save_pretrained" in error.remedy


def test_reformatting_the_json_is_harmless(saved, stories_config):
    data = read_config_json(saved)
    (saved / CONFIG_NAME).write_text(json.dumps(dict(reversed(list(data.items()))), indent=4, sort_keys=False))
    assert KVQuantConfig.from_pretrained(saved) == stories_config


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_json_value(saved, literal):
    data = read_config_json(saved)
    data["layers"][1]["key_centroids"][3] = "@@"
    text = json.dumps(data, indent=1).replace('"@@"', literal)
    (saved / CONFIG_NAME).write_text(text)
    error = load_error(saved)
    assert_names(error, "layers[1].key_centroids[3]")
    assert "finite" in str(error)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tensor(saved, stories_config, value):
    tensors = stories_config.tensors()
    tensors["layers.1.key_zero"][2, 5] = value
    replace_tensor_file(saved, tensors)
    error = load_error(saved)
    assert_names(error, "layers.1.key_zero")
    assert "NaN or inf" in str(error)


def test_tensor_file_with_another_sha256(saved, stories_config):
    from safetensors.torch import save_file

    tensors = stories_config.tensors()
    tensors["layers.0.key_scale"] = tensors["layers.0.key_scale"] * 1.001
    save_file(tensors, str(saved / TENSORS_NAME))  # the JSON still names the old sha256
    error = load_error(saved)
    assert_names(error, "tensors.sha256")
    assert TENSORS_NAME in str(error)


def test_truncated_tensor_file(saved):
    data = (saved / TENSORS_NAME).read_bytes()
    (saved / TENSORS_NAME).write_bytes(data[:-7])
    assert_names(load_error(saved), "tensors.sha256")


def test_missing_tensor_file(saved):
    (saved / TENSORS_NAME).unlink()
    error = load_error(saved)
    assert_names(error, "tensors.file")
    assert TENSORS_NAME in str(error)


@pytest.mark.parametrize(
    "name,make",
    [
        ("layers.0.key_zero", lambda t: t.pop("layers.0.key_zero")),
        ("layers.1.key_scale", lambda t: t.update({"layers.1.key_scale": torch.ones(4, 9)})),
        ("layers.0.key_scale", lambda t: t.update({"layers.0.key_scale": -t["layers.0.key_scale"]})),
        ("layers.1.key_zero", lambda t: t.update({"layers.1.key_zero": t["layers.1.key_zero"].to(torch.int32)})),
    ],
    ids=["missing", "wrong-shape", "negative-scale", "integer-dtype"],
)
def test_bad_tensor_contents(saved, stories_config, name, make):
    tensors = stories_config.tensors()
    make(tensors)
    replace_tensor_file(saved, tensors)
    assert_names(load_error(saved), name, file=CONFIG_NAME)


def test_damaged_safetensors_header_with_matching_sha(saved):
    (saved / TENSORS_NAME).write_bytes(b"\xff" * 64)
    data = read_config_json(saved)
    import hashlib

    data["tensors"]["sha256"] = hashlib.sha256(b"\xff" * 64).hexdigest()
    write_config_json(saved, data)
    assert_names(load_error(saved), "tensors.file")


def test_missing_folder_and_missing_config(tmp_path):
    with pytest.raises(KVQuantConfigError, match="no kvquant_config.json in this folder"):
        KVQuantConfig.from_pretrained(tmp_path)
    with pytest.raises(KVQuantConfigError, match="no such file or folder"):
        KVQuantConfig.from_pretrained(tmp_path / "absent" / "deeper")


# ------------------------------------------------------------------------------------------------- saving
def test_save_refuses_values_that_would_not_load(stories_config, tmp_path):
    layers = list(stories_config.layers)
    bad = layers[0].key_zero.clone()
    bad[0, 0] = float("nan")
    layers[0] = LayerCalibration(layers[0].key_codebook, layers[0].value_codebook, bad, layers[0].key_scale)
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantConfig(**{**stories_config.__dict__, "layers": layers}).save_pretrained(tmp_path / "nan")
    assert info.value.field == "layers.0.key_zero"

    for meta, field in [({"ppl": {"fp": 1.0, "quantized": math.inf, "change_pct": math.inf}}, "calibration.ppl.quantized"), ({"seqlen": "long"}, "calibration.seqlen"), ({"when": object()}, "calibration")]:
        config = KVQuantConfig(**{**stories_config.__dict__, "calibration": meta})
        with pytest.raises(KVQuantConfigError) as info:
            config.save_pretrained(tmp_path / "meta")
        assert info.value.field == field, info.value
    assert not (tmp_path / "nan").exists() and not (tmp_path / "meta" / CONFIG_NAME).exists()


def test_save_writes_numpy_and_tensor_metadata_as_plain_json(stories_config, tmp_path):
    config = KVQuantConfig(**{**stories_config.__dict__, "calibration": {"duration_s": torch.tensor(2.5), "windows": (1, 2)}})
    config.save_pretrained(tmp_path)
    assert KVQuantConfig.from_pretrained(tmp_path).calibration == {"duration_s": 2.5, "windows": [1, 2]}


def test_save_overwrites_an_older_config_completely(saved):
    other = tiny_config(0, bits=2, outlier_fraction=0.0)
    other.save_pretrained(saved)
    assert KVQuantConfig.from_pretrained(saved) == other
    assert sorted(p.name for p in saved.iterdir()) == [TENSORS_NAME, CONFIG_NAME]


def test_content_checksum_is_of_the_canonical_json(saved):
    data = read_config_json(saved)
    body = {k: v for k, v in data.items() if k != "content_sha256"}
    import hashlib

    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert data["content_sha256"] == hashlib.sha256(canonical.encode()).hexdigest() == content_sha256(data)


def test_codebook_kind_is_validated_on_construction(stories_config):
    with pytest.raises(KVQuantConfigError, match="codebook_kind"):
        KVQuantConfig(**{**stories_config.__dict__, "codebook_kind": "lloyd"})


def test_saving_is_byte_reproducible(stories_config, tmp_path):
    """The same config always gives the same bytes, so re-created shipped configs and their sha256 only change
    when the calibration does."""
    for name in ("a", "b", "c"):
        stories_config.save_pretrained(tmp_path / name)
    for file in (CONFIG_NAME, TENSORS_NAME):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes() == (tmp_path / "c" / file).read_bytes()
