"""Which config a model gets when none is named, and that no path ever uses a config made for another model."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import pytest
import torch

from tests.helpers import REPO, STORIES, tiny_llama
from tests.hub.common import CALIBRATION_METADATA, tiny_config
from transformers_kvquant import KVQuantCache, KVQuantConfig, KVQuantConfigError
from transformers_kvquant.config import CONFIG_NAME, discovery

LOGGER = "transformers_kvquant"


def new_hub_configs(root):
    root.mkdir()
    (root / "README.md").write_text("# configs\n\n" + discovery._TABLE_BEGIN + "\n" + discovery._TABLE_END + "\n")
    return root


@pytest.fixture
def shipped(tmp_path, monkeypatch):
    """An empty stand-in for hub_configs/ that discovery reads instead of the package's."""
    root = new_hub_configs(tmp_path / "hub_configs")
    monkeypatch.setattr(discovery, "hub_configs_dir", lambda: root)
    return root


def ship(root, slug, name, config, **index_kwargs):
    """Write a config into ``root/slug/name`` and index it, as hub_configs/recreate.py does."""
    folder = root / slug / name
    config.save_pretrained(folder)
    return discovery.update_index(folder, root, **index_kwargs)


def model_folder(tmp_path, seed=0, with_config=None):
    """A tiny LLaMA saved like a Hub download (config.json + weights), optionally with a kvquant config beside it."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / f"model-{seed}"
    tiny_llama(seed=seed).save_pretrained(folder)
    if with_config is not None:
        with_config.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder).eval(), folder


# ------------------------------------------------------------------------------------------------- beside the model
def test_config_beside_a_local_model_is_chosen_and_logged(tmp_path, shipped, caplog):
    config = tiny_config(0)
    model, folder = model_folder(tmp_path, with_config=config)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model)
    assert cache.settings.config == config
    assert cache.settings.source == str(folder / CONFIG_NAME)
    assert f"using {folder / CONFIG_NAME} (nuq3-1%), found beside the model" in caplog.text

    # The same through generate(cache_implementation="kvquant") with no config named.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        out = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=3, do_sample=False, cache_implementation="kvquant")
    assert out.shape == (1, 7)
    assert f"KVQuant cache uses nuq3-1% ({folder / CONFIG_NAME})" in caplog.text


def test_damaged_config_beside_the_model_raises_instead_of_falling_through(tmp_path, shipped):
    config = tiny_config(0)
    ship(shipped, "tiny", "nuq3-1pct", tiny_config(0, metadata=True))  # a usable fallback exists
    model, folder = model_folder(tmp_path, with_config=config)
    text = (folder / CONFIG_NAME).read_text()
    (folder / CONFIG_NAME).write_text(text[:-200])
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(model)
    assert str(folder / CONFIG_NAME) in str(info.value) and "truncated" in str(info.value)


def test_config_beside_the_model_for_another_model_is_refused(tmp_path, shipped):
    other = tiny_config(1)
    model, _ = model_folder(tmp_path, seed=0, with_config=other)
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(model)
    assert info.value.field == "fingerprint.weights_signature"


def test_beside_config_with_other_bits_defers_to_the_shipped_ones(tmp_path, shipped, caplog):
    model, _ = model_folder(tmp_path, seed=0, with_config=tiny_config(0, bits=4))
    two_bit = tiny_config(0, metadata=True, bits=2)
    ship(shipped, "tiny", "nuq2-1pct", two_bit)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model, bits=2)
    assert cache.settings.config == two_bit
    assert "is nuq4-1%, not the requested bits/outliers" in caplog.text
    assert "using the shipped config hub_configs/tiny/nuq2-1pct" in caplog.text


# ------------------------------------------------------------------------------------------------- shipped configs
GRID = [(4, 0.01), (3, 0.01), (3, 0.0), (2, 0.01)]


@pytest.fixture(scope="module")
def grid_folder(tmp_path_factory):
    """Configs for tiny_llama(seed=0) at several settings, an ablation, and one for a same-shape model (seed=1)."""
    root = new_hub_configs(tmp_path_factory.mktemp("grid") / "hub_configs")
    for bits, frac in GRID:
        ship(root, "tiny-0", f"nuq{bits}-{frac}", tiny_config(0, metadata=True, bits=bits, outlier_fraction=frac, seed=bits))
    ship(root, "tiny-0", "nuq3-0.01-post-rope", tiny_config(0, metadata=True, key_rope="post", seed=9))
    ship(root, "tiny-1", "nuq3-0.01", tiny_config(1, metadata=True))
    return root


@pytest.fixture
def shipped_grid(grid_folder, shipped):
    """The grid, copied into this test's stand-in hub_configs/; returns the configs by (bits, outlier_fraction)."""
    shutil.rmtree(shipped)
    shutil.copytree(grid_folder, shipped)
    return {(bits, frac): tiny_config(0, metadata=True, bits=bits, outlier_fraction=frac, seed=bits) for bits, frac in GRID}


@pytest.mark.parametrize(
    "request_,expected",
    [({}, (3, 0.01)), ({"bits": 2}, (2, 0.01)), ({"outlier_fraction": 0.0}, (3, 0.0)), ({"bits": 4}, (4, 0.01))],
    ids=["defaults-3bit-1pct", "bits2", "no-outliers", "bits4"],
)
def test_shipped_config_preference(shipped_grid, request_, expected, caplog):
    model = tiny_llama(seed=0)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model, **request_)
    chosen = cache.settings.config
    assert chosen == shipped_grid[expected]
    assert chosen.key_rope == "pre"
    assert f"using the shipped config {cache.settings.source}" in caplog.text


def test_same_shape_other_weights_never_gets_a_shipped_config(shipped_grid):
    stranger = tiny_llama(seed=2)
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(stranger)
    assert "kvquant calibrate" in str(info.value) and "no shipped hub_configs entry matches" in str(info.value)


def test_seed1_model_gets_its_own_config(shipped_grid, shipped):
    cache = KVQuantCache(tiny_llama(seed=1))
    assert cache.settings.source == "hub_configs/tiny-1/nuq3-0.01"


def test_unavailable_setting_names_the_calibrate_command(shipped_grid):
    with pytest.raises(KVQuantConfigError, match=r"kvquant calibrate .* --bits 4 --outliers 0.0"):
        KVQuantCache(tiny_llama(seed=0), bits=4, outlier_fraction=0.0)


def test_stale_index_is_refused(shipped_grid, shipped):
    tiny_config(0, seed=42).save_pretrained(shipped / "tiny-0" / "nuq3-0.01")  # index not updated
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(tiny_llama(seed=0))
    assert "index is stale" in str(info.value)


def test_index_entries_and_readme_table(shipped_grid, shipped):
    entries = {e["path"]: e for e in discovery.shipped_index(shipped)}
    assert len(entries) == 6
    e = entries["tiny-0/nuq3-0.01"]
    assert (e["bits"], e["outlier_fraction"], e["key_rope"], e["codebook_kind"]) == (3, 0.01, "pre", "nuq")
    assert e["ppl"] == CALIBRATION_METADATA["ppl"] and e["fingerprint"]["num_layers"] == 2
    assert entries["tiny-0/nuq3-0.01-post-rope"]["key_rope"] == "post"
    # Updating an entry replaces it; rebuilding from the folders gives the same index.
    before = (shipped / discovery.INDEX_NAME).read_text()
    discovery.update_index(shipped / "tiny-0" / "nuq3-0.01", shipped)
    assert (shipped / discovery.INDEX_NAME).read_text() == before
    discovery.rebuild_index(shipped)
    assert (shipped / discovery.INDEX_NAME).read_text() == before
    table = (shipped / "README.md").read_text()
    assert "| tiny-0 | nuq3-1% | 3 | 1% | nuq, pre-RoPE | 11.250 → 11.500 | +2.22% |" in table
    assert table.count("`tiny-") == 6


def test_update_index_checks_its_input(shipped, tmp_path):
    config = tiny_config(0)
    config.save_pretrained(shipped / "tiny" / "no-ppl")
    with pytest.raises(KVQuantConfigError) as info:
        discovery.update_index(shipped / "tiny" / "no-ppl", shipped)
    assert info.value.field == "calibration.ppl"
    assert discovery.update_index(shipped / "tiny" / "no-ppl", shipped, require_ppl=False)["ppl"] is None
    config.save_pretrained(tmp_path / "elsewhere")
    with pytest.raises(KVQuantConfigError, match="must be inside"):
        discovery.update_index(tmp_path / "elsewhere", shipped)
    (shipped / discovery.INDEX_NAME).write_text('{"index_version": 1, "models": {"x": [{"path": "../../etc"}]}}')
    with pytest.raises(KVQuantConfigError, match="index.json"):
        discovery.shipped_index(shipped)


def test_the_shipped_stories260k_configs(stories, tmp_path, monkeypatch, caplog):
    """The configs calibrated in this repository: each loads, carries its perplexity change, and discovery
    picks the 3-bit 1% one for the real stories260K model (indexed afresh in a copy of hub_configs/)."""
    folders = sorted(p.parent for p in (REPO / "hub_configs").glob(f"stories260k/*/{CONFIG_NAME}"))
    assert folders, "hub_configs/stories260k/ holds no configs: run hub_configs/recreate.py"
    root = tmp_path / "hub_configs"
    for folder in folders:
        shutil.copytree(folder, root / "stories260k" / folder.name)
        config = KVQuantConfig.from_pretrained(folder)
        assert {"fp", "quantized", "change_pct"} <= set(config.calibration["ppl"])
    discovery.rebuild_index(root)
    monkeypatch.setattr(discovery, "hub_configs_dir", lambda: root)
    model, _ = stories
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model)
    assert (cache.settings.config.bits, cache.settings.config.outlier_fraction, cache.settings.config.key_rope) == (3, 0.01, "pre")
    assert "using the shipped config hub_configs/stories260k/" in caplog.text
    assert str(model.name_or_path) == str(STORIES)


def test_the_shipped_index_matches_its_files():
    """hub_configs/index.json lists every shipped config folder, with the current sha256 of each, and only
    configs that carry their perplexity change."""
    root = discovery.hub_configs_dir()
    assert root.resolve() == (REPO / "hub_configs").resolve()
    entries = discovery.shipped_index()
    assert {e["path"] for e in entries} == {p.parent.relative_to(root).as_posix() for p in root.glob(f"*/*/{CONFIG_NAME}")}
    for entry in entries:
        config = discovery._load_shipped(str(root / entry["path"]), entry["sha256"])  # raises if stale
        assert (config.bits, config.outlier_fraction, config.key_rope) == (entry["bits"], entry["outlier_fraction"], entry["key_rope"])
        assert entry["ppl"] == config.calibration["ppl"]


# ------------------------------------------------------------------------------------------------- never a mismatch
def test_explicit_config_for_same_shape_other_weights_is_refused(tmp_path):
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    config = tiny_config(0)
    config.save_pretrained(tmp_path)
    for given in (config, tmp_path, tmp_path / CONFIG_NAME):
        with pytest.raises(KVQuantConfigError) as info:
            KVQuantCache(b, given)
        assert info.value.field == "fingerprint.weights_signature"
    with pytest.raises(KVQuantConfigError, match="weights_signature"):
        b.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, cache_implementation="kvquant", cache_config={"config": str(tmp_path)})
    KVQuantCache(a, tmp_path)  # the model it was made for is accepted


@pytest.mark.parametrize(
    "other,field",
    [
        (lambda: tiny_llama(layers=3), "fingerprint.num_layers"),
        (lambda: tiny_llama(kv_heads=4), "fingerprint.num_key_value_heads"),
        (lambda: tiny_llama(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "fingerprint.rope"),
    ],
    ids=["layers", "kv-heads", "rope-theta"],
)
def test_other_geometry_or_rope_is_refused(other, field):
    config = tiny_config(0)
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(other(), config)
    assert info.value.field == field


def test_other_hub_model_id_is_refused():
    model = tiny_llama(seed=0)
    config = tiny_config(0)
    config = KVQuantConfig(**{**config.__dict__, "fingerprint": replace(config.fingerprint, model_id="org/model-a")})
    model.name_or_path = "org/model-b"
    with pytest.raises(KVQuantConfigError) as info:
        KVQuantCache(model, config)
    assert info.value.field == "fingerprint.model_id"
    model.name_or_path = "org/model-a"
    assert KVQuantCache(model, config).settings.config is config


# ------------------------------------------------------------------------------------------------- Hub-id models
def test_config_in_the_models_hub_repo(hub, shipped, caplog):
    model = tiny_llama(seed=0)
    config = tiny_config(0)
    config.push_to_hub("org/tiny")
    config_b = tiny_config(0, bits=2)
    config_b.push_to_hub("org/tiny", revision="two-bit")
    model.name_or_path = "org/tiny"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model)
    assert cache.settings.config == config
    assert "using org/tiny/kvquant_config.json (nuq3-1%), found beside the model org/tiny" in caplog.text
    # At another revision of the model's repo.
    assert KVQuantCache(model, bits=2, revision="two-bit").settings.config == config_b


def test_damaged_config_in_the_models_hub_repo_raises(hub, shipped):
    from huggingface_hub import HfApi

    model = tiny_llama(seed=0)
    ship(shipped, "tiny", "nuq3", tiny_config(0, metadata=True))  # a fallback that must not be used
    HfApi().create_repo("org/broken")
    HfApi().upload_file(path_or_fileobj=b'{"format_version": 1, "bits": 3', path_in_repo=CONFIG_NAME, repo_id="org/broken")
    model.name_or_path = "org/broken"
    with pytest.raises(KVQuantConfigError, match="truncated or corrupted"):
        KVQuantCache(model)


def test_hub_repo_without_config_falls_through_to_shipped(hub, shipped, caplog):
    from huggingface_hub import HfApi

    model = tiny_llama(seed=0)
    fallback = tiny_config(0, metadata=True)
    ship(shipped, "tiny", "nuq3-1pct", fallback)
    HfApi().create_repo("org/plain")
    model.name_or_path = "org/plain"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        cache = KVQuantCache(model)
    assert cache.settings.config == fallback
    assert "no config beside org/plain" in caplog.text
