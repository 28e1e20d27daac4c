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


# ------------------------------------------------------------------------------------------------- the knapsack
def _brute_force(errors, costs, budget):
    best = None
    for choice in itertools.product(*[sorted(e) for e in errors]):
        cost = sum(c[w] for c, w in zip(costs, choice))
        if cost <= budget:
            err = sum(e[w] for e, w in zip(errors, choice))
            if best is None or (err, cost) < best[:2]:
                best = (err, cost, list(choice))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_exact_against_brute_force(seed):
    from transformers_kvquant.calibration.mixed import allocate_bits

    g = torch.Generator().manual_seed(seed)
    layers = 1 + seed % 6
    errors, costs = [], []
    for _ in range(layers):
        # errors fall with width, costs rise; random magnitudes so layers differ in sensitivity and size
        e = sorted((torch.rand(3, generator=g) * 10 ** float(torch.rand(1, generator=g) * 3)).tolist(), reverse=True)
        c = sorted(torch.randint(1, 50, (3,), generator=g).tolist())
        errors.append(dict(zip((2, 3, 4), e)))
        costs.append(dict(zip((2, 3, 4), c)))
    lo, hi = sum(c[2] for c in costs), sum(c[4] for c in costs)
    for budget in {lo, (lo + hi) // 2, lo + (hi - lo) // 3, hi, hi + 5}:
        chosen = allocate_bits(errors, costs, budget)
        expected = _brute_force(errors, costs, budget)
        assert sum(c[w] for c, w in zip(costs, chosen)) <= budget
        assert sum(e[w] for e, w in zip(errors, chosen)) == pytest.approx(expected[0], rel=1e-12)


def test_allocation_extremes_and_infeasible_budget():
    from transformers_kvquant.calibration.mixed import allocate_bits

    errors = [{2: 9.0, 3: 4.0, 4: 1.0}, {2: 100.0, 3: 10.0, 4: 1.0}]
    costs = [{2: 2, 3: 3, 4: 4}, {2: 2, 3: 3, 4: 4}]
    assert allocate_bits(errors, costs, 8) == [4, 4]
    assert allocate_bits(errors, costs, 4) == [2, 2]
    assert allocate_bits(errors, costs, 6) == [2, 4]  # the sensitive layer gets the bits
    assert allocate_bits(errors, costs, 7) == [3, 4]
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        allocate_bits(errors, costs, 3)


# ------------------------------------------------------------------------------------------------- calibration
@pytest.fixture(scope="module")
def stories_stats(stories):
    from transformers_kvquant.calibration import collect_statistics

    model, _ = stories
    g = torch.Generator().manual_seed(0)
    samples = torch.randint(3, model.config.vocab_size, (2, 128), generator=g)
    return collect_statistics(model, samples, progress=False)


# stories260K's head_dim of 8 packs 2 and 4 bits into the same int32 word per head, and 3 bits into more (8.14 and
# 16.14 stored bits per element at 128 tokens with 1% outliers): so its mixtures are of 2 and 3 bits.
LOW, MIDDLE, HIGH = 8.2, 12.0, 17.0


@pytest.fixture(scope="module")
def mixed_fits(stories_stats):
    """Mixed 2/3-bit configs of stories260K at a low, a middle and a high budget (1% outliers)."""
    from transformers_kvquant.config.calibrate import fit_mixed_config

    return {avg: fit_mixed_config(stories_stats, average_bits=avg, outlier_fraction=0.01, widths=(2, 3), progress=False)
            for avg in (LOW, MIDDLE, HIGH)}


def test_mixed_calibration_respects_the_budget_and_spends_it(mixed_fits, stories_stats):
    from transformers_kvquant.calibration.mixed import positions_bytes, stored_bytes

    fp = stories_stats.fingerprint
    tokens = stories_stats.keys[0].shape[1]
    elements = 2 * fp.num_key_value_heads * fp.head_dim * tokens * fp.num_layers
    totals = {}
    for avg, config in mixed_fits.items():
        meta = config.calibration["mixed_precision"]
        # each layer's own bytes, and the slots' positions once for the cache
        stored = (sum(stored_bytes(layer, config.layer_width(i), 0.01, fp.num_key_value_heads, fp.head_dim, tokens)
                      for i, layer in enumerate(config.layers)) + positions_bytes(tokens)) * 8 / elements
        assert stored <= avg and stored == pytest.approx(meta["stored_bits"], abs=1e-5)
        # the allocation is optimal for the measured errors: brute force over the 3**5 allocations agrees
        errors = [{int(w): e for w, e in le.items()} for le in meta["layer_errors"]]
        costs = [{w: stored_bytes(layer, w, 0.01, fp.num_key_value_heads, fp.head_dim, tokens) for w in (2, 3)}
                 for layer in config.layers]
        budget = int(avg * elements / 8) - positions_bytes(tokens)
        assert meta["total_error"] == pytest.approx(_brute_force(errors, costs, budget)[0], rel=1e-9)
        totals[avg] = meta["total_error"]
        assert config.bits == max(config.layer_bits) and config.format_version == 2
        for i, w in enumerate(config.layer_bits):
            assert config.layers[i].key_codebook.bits == w == config.layers[i].value_codebook.bits
    assert totals[LOW] > totals[MIDDLE] > totals[HIGH]  # more bits err less
    assert mixed_fits[LOW].layer_bits == [2] * 5 and mixed_fits[HIGH].layer_bits == [3] * 5
    assert sorted(set(mixed_fits[MIDDLE].layer_bits)) == [2, 3]  # a budget between widths mixes them


def test_errors_fall_with_width(mixed_fits):
    for le in mixed_fits[MIDDLE].calibration["mixed_precision"]["layer_errors"]:
        assert le["2"] > le["3"] > 0


def test_all_widths_pick_the_cheaper_and_better_four_bits_at_head_dim_8(stories_stats):
    """At head_dim 8, 4 bits cost what 2 bits cost and less than 3: the allocation gives every layer 4 bits."""
    from transformers_kvquant.config.calibrate import fit_mixed_config

    config = fit_mixed_config(stories_stats, average_bits=LOW, outlier_fraction=0.01, progress=False)
    assert config.layer_bits == [4] * 5
    for le in config.calibration["mixed_precision"]["layer_errors"]:
        assert le["2"] > le["3"] > le["4"] > 0


def test_budget_below_the_cheapest_allocation(stories_stats):
    from transformers_kvquant.config.calibrate import fit_mixed_config

    with pytest.raises(ValueError, match="below the lowest average"):
        fit_mixed_config(stories_stats, average_bits=1.0, outlier_fraction=0.01, progress=False)


def test_mixed_config_round_trips(mixed_fits, tmp_path):
    config = mixed_fits[MIDDLE]
    config.save_pretrained(tmp_path)
    assert read_config_json(tmp_path)["layer_bits"] == config.layer_bits
    assert KVQuantConfig.from_pretrained(tmp_path) == config


# ------------------------------------------------------------------------------------------------- cache and harness
def _teacher_forced(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits


@pytest.fixture(scope="module")
def text_ids(stories):
    from tests.helpers import WIKITEXT
    from transformers_kvquant.evaluation.datasets import load_text
    from transformers_kvquant.evaluation.perplexity import token_windows

    _, tok = stories
    return token_windows(tok, load_text(WIKITEXT)[:20000], 200, 2)


def test_each_layer_store_packs_with_its_own_width(stories, mixed_fits, text_ids):
    from transformers_kvquant import KVQuantCache

    model, _ = stories
    config = mixed_fits[MIDDLE]
    cache = KVQuantCache(model, config)
    _teacher_forced(model, text_ids, cache)
    assert [layer.store.bits for layer in cache.layers] == config.layer_bits
    assert [layer.store.cache.bits for layer in cache.layers] == config.layer_bits
    for layer, w in zip(cache.layers, config.layer_bits):
        assert layer.store.key_quantizer.codebook.bits == w and layer.store.value_quantizer.codebook.bits == w


def test_cache_agrees_with_the_simulation_and_between_its_widths(stories, mixed_fits, text_ids):
    """Teacher forcing through the real cache equals the harness's simulation; the mixed config's logits lie
    between the all-2-bit and all-3-bit configs' in error against fp (a fit with the same statistics)."""
    from transformers_kvquant import KVQuantCache
    from transformers_kvquant.evaluation.simulation import KVQuantMethod, SimulationCache

    model, _ = stories
    plain = _teacher_forced(model, text_ids, None)
    errs = {}
    for avg, config in mixed_fits.items():
        sim = _teacher_forced(model, text_ids, SimulationCache(model, KVQuantMethod(config)))
        real = _teacher_forced(model, text_ids, KVQuantCache(model, config))
        torch.testing.assert_close(real, sim, rtol=0, atol=1e-6)
        errs[avg] = (sim - plain).square().mean().item()
    assert errs[LOW] > errs[HIGH] > 0
    assert errs[LOW] > errs[MIDDLE]


def test_harness_bits_are_the_cache_bytes_and_the_calibration_budget(stories, mixed_fits):
    """The harness's average bits of a mixed config sum every layer's own width, equal what calibration budgeted,
    and equal the real cache's bytes (16-bit model, same token count)."""
    from transformers_kvquant import KVQuantCache
    from transformers_kvquant.evaluation.simulation import KVQuantMethod

    model, _ = stories
    config = mixed_fits[MIDDLE]
    method = KVQuantMethod(config)
    bits = method.avg_bits(4, 8, 128)
    assert bits == pytest.approx(config.calibration["mixed_precision"]["stored_bits"], abs=1e-6)
    assert LOW < bits <= MIDDLE
    import copy

    half = copy.deepcopy(model).to(torch.float16)  # a copy: the session's model stays fp32
    cache = KVQuantCache(half, config)
    with torch.no_grad():
        half(torch.randint(3, 500, (1, 128)), past_key_values=cache, use_cache=True)
    assert cache.memory_report().avg_bits == pytest.approx(bits, abs=1e-9)


def test_mixed_config_generates(stories, mixed_fits, tmp_path):
    import transformers_kvquant  # noqa: F401  (registers cache_implementation="kvquant")

    model, tok = stories
    mixed_fits[MIDDLE].save_pretrained(tmp_path)
    inputs = tok(["Once upon a time"], return_tensors="pt")
    for static in (False, True):
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False, cache_implementation="kvquant",
                             cache_config={"config": str(tmp_path), "static": static, **({"max_cache_len": 64} if static else {})})
        text = tok.decode(out[0, inputs.input_ids.shape[1]:])
        assert out.shape[1] == inputs.input_ids.shape[1] + 20 and len(text.split()) > 3


def test_bits_16_ignores_the_widths(stories, text_ids):
    """bits=16 (no config) stays exact, whatever configs exist: layers untouched."""
    from transformers_kvquant import KVQuantCache

    model, _ = stories
    real = _teacher_forced(model, text_ids, KVQuantCache(model, bits=16))
    torch.testing.assert_close(real, _teacher_forced(model, text_ids, None), rtol=0, atol=1e-5)


def test_kernel_dispatch_sees_each_layer_width(stories, mixed_fits, monkeypatch):
    """The kernels are chosen per layer from that layer's store: the width asked of supported_head_dim is the
    layer's own."""
    from transformers_kvquant import KVQuantCache
    from transformers_kvquant.integration import kernel_dispatch

    model, _ = stories
    config = mixed_fits[MIDDLE]
    seen = []
    monkeypatch.setattr(kernel_dispatch, "supported_head_dim", lambda d, bits: seen.append(bits) or False)
    monkeypatch.setattr(kernel_dispatch, "_triton_importable", lambda: True)
    cache = KVQuantCache(model, config)
    for layer in cache.layers:
        layer.store = cache.settings.make_store(layer.layer_idx, torch.float32)
        layer.store.device = torch.device("cuda")  # only read by the dispatch decision
        layer.store.head_dim = 8
        assert kernel_dispatch.kernels_enabled(cache.settings, layer.store) is False
    assert seen == config.layer_bits


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_calibrate_mixed_precision_and_info(tmp_path, capsys):
    from tests.helpers import STORIES
    from transformers_kvquant.cli import main as cli

    out = tmp_path / "cfg"
    code = cli(["calibrate", str(STORIES), "--mixed-precision", "9", "--outliers", "0.01", "--nsamples", "2", "--seqlen", "64",
                "-o", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    config = KVQuantConfig.from_pretrained(out)
    # head_dim 8: 4 bits cost what 2 bits cost, so every layer gets 4 (see above)
    assert config.layer_bits == [4] * 5 and config.format_version == 2
    stored = config.calibration["mixed_precision"]["stored_bits"]
    assert stored <= 9 and config.calibration["mixed_precision"]["tokens"] == 64
    assert "layer bits: 4 4 4 4 4" in printed
    assert cli(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "layer bits:   4 4 4 4 4 (layers 0-4; 5 at 4)" in shown and "format:       version 2" in shown
    assert "layer_errors" not in shown  # the per-layer errors stay in the file, not on the screen
    assert cli(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer_bits"] == [4] * 5


def test_cli_info_of_a_single_width_config_shows_no_widths(capsys):
    from transformers_kvquant.cli import main as cli

    assert cli(["info", str(REPO / "hub_configs" / "smollm2-135m-instruct" / "nuq3-1pct")]) == 0
    shown = capsys.readouterr().out
    assert "layer bits" not in shown and "version 1" in shown


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bits", "3", "--mixed-precision", "3"], "not allowed with argument"),
        ([], "one of the arguments --bits --mixed-precision is required"),
        (["--mixed-precision", "1.5", "--nsamples", "1", "--seqlen", "32"], "below the lowest average"),
        (["--mixed-precision", "3", "--key-rope", "post"], "--mixed-precision serves the cache"),
    ],
)
def test_cli_mixed_precision_errors(tmp_path, capsys, args, message):
    from tests.helpers import STORIES
    from transformers_kvquant.cli import main as cli

    try:
        code = cli(["calibrate", str(STORIES), *args, "-o", str(tmp_path / "x")])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
