"""``cache_implementation="kvquant"``: the version-checked monkeypatches, and saved models that stay loadable.

A ``generation_config.json`` naming ``"cache_implementation": "kvquant"`` cannot be loaded by anyone without this
package, so the name is saved under a custom ``"kvquant"`` key and restored when the package is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import transformers
import transformers.generation.configuration_utils as cu
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GenerationConfig,
    StaticCache,
)
from transformers.generation.utils import GenerationMixin

from tests.helpers import STORIES
from transformers_kvquant import KVQuantCache
from transformers_kvquant.integration import registration
from transformers_kvquant.integration.attention import is_patched
from transformers_kvquant.integration.registration import IncompatibleTransformersError

from .common import EXACT, generate, left_padded


# ------------------------------------------------------------------------------------------------ the monkeypatches
def test_register_is_idempotent():
    before = GenerationMixin._prepare_cache_for_generation
    registration.register()
    registration.register()
    assert cu.ALL_CACHE_IMPLEMENTATIONS.count("kvquant") == 1
    assert cu.ALL_STATIC_CACHE_IMPLEMENTATIONS.count("kvquant") == 1  # max_cache_len is not warned about as ignored
    assert GenerationMixin._prepare_cache_for_generation is before
    wrapped = GenerationMixin._prepare_cache_for_generation
    assert wrapped._kvquant and not getattr(wrapped.__wrapped__, "_kvquant", False)  # wrapped exactly once
    for method in (GenerationConfig.save_pretrained, GenerationConfig.__init__):
        assert method._kvquant and not getattr(method.__wrapped__, "_kvquant", False)


@pytest.mark.parametrize("version", ["4.57.1", "5.16.0", "6.0.0"])
def test_unsupported_transformers_version_raises(version, monkeypatch):
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(IncompatibleTransformersError, match=rf"needs transformers >=5.17,<6, found {version}"):
        registration.register()


def test_newer_version_registers_without_a_version_warning(monkeypatch):
    """A newer 5.x is judged by the hook probe at patch time (tests/integration/test_compat.py), not by its number."""
    monkeypatch.setattr(transformers, "__version__", "5.99.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        registration.register()
    assert "kvquant" in cu.ALL_CACHE_IMPLEMENTATIONS


def test_changed_generation_internals_raise_with_the_patch_free_route(monkeypatch):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, batch_size):  # a hypothetical new API
        return None

    monkeypatch.setattr(GenerationMixin, "_prepare_cache_for_generation", _prepare_cache_for_generation)
    with pytest.raises(IncompatibleTransformersError, match=r"different signature.*past_key_values=KVQuantCache"):
        registration.check_transformers()


INCOMPATIBLE_IMPORT = textwrap.dedent(
    """
    import json, sys, warnings
    import torch, transformers
    transformers.__version__ = "5.16.0"  # pretend an incompatible transformers is installed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import transformers_kvquant
    import transformers.generation.configuration_utils as cu
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    cache = transformers_kvquant.KVQuantCache(model, bits=16)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, past_key_values=cache, do_sample=False)
    print(json.dumps({
        "warnings": [str(w.message) for w in caught],
        "registered": "kvquant" in cu.ALL_CACHE_IMPLEMENTATIONS,
        "cache_length": cache.get_seq_length(),
    }))
    """
)


def run_clean(cwd, script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (outside the repository: no conftest) and return its last JSON line."""
    result = subprocess.run([sys.executable, "-c", script, *args], check=False, capture_output=True, text=True, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_incompatible_transformers_warns_at_import_and_keeps_the_cache_usable(tmp_path):
    """Import never fails on an incompatible transformers: the patch-free route named in the error stays usable."""
    report = run_clean(tmp_path, INCOMPATIBLE_IMPORT)
    assert report["registered"] is False
    assert any(
        "cache_implementation='kvquant' is not available" in w and "found 5.16.0" in w for w in report["warnings"]
    )
    assert report["cache_length"] == 4


def test_other_cache_implementations_are_untouched(stories):
    model, tok = stories
    batch = left_padded(tok)
    out = generate(model, batch, max_new_tokens=6, cache_implementation="static")
    assert isinstance(out.past_key_values, StaticCache)
    out = generate(model, batch, max_new_tokens=6, cache_implementation="dynamic")
    assert type(out.past_key_values) is DynamicCache
    out = generate(model, batch, max_new_tokens=6)
    assert type(out.past_key_values) is DynamicCache
    out = generate(model, batch, max_new_tokens=6, cache_implementation="kvquant", cache_config=EXACT)
    assert isinstance(out.past_key_values, KVQuantCache)
    # A plain generation config round-trips exactly as before.
    config = GenerationConfig(cache_implementation="static", max_new_tokens=5)
    assert GenerationConfig.from_dict(config.to_dict()).cache_implementation == "static"


def test_assistant_model_gets_the_default_cache(stories, stories_variant):
    """The drafter of assisted decoding keeps a DynamicCache: the KVQuant config belongs to the main model."""
    model, tok = stories
    drafter = stories_variant(torch.float32, "sdpa", num_hidden_layers=3)
    out = generate(
        model,
        tok(["Lily"], return_tensors="pt"),
        max_new_tokens=8,
        assistant_model=drafter,
        cache_implementation="kvquant",
        cache_config=EXACT,
    )
    assert isinstance(out.past_key_values, KVQuantCache)
    # Building a KVQuantCache for the drafter would have patched it.
    assert not is_patched(drafter) and drafter.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------ saved models
CLEAN_LOAD = textwrap.dedent(
    """
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    good, bad = sys.argv[1], sys.argv[2]
    model = AutoModelForCausalLM.from_pretrained(good)
    out = model.generate(torch.tensor([[1, 403, 407]]), max_new_tokens=3, do_sample=False)
    try:
        AutoModelForCausalLM.from_pretrained(bad)
        bad_error = None
    except Exception as e:
        bad_error = type(e).__name__ + ": " + str(e)
    print(json.dumps({
        "imported": sorted(m for m in sys.modules if m.startswith("transformers_kvquant")),
        "cache_implementation": model.generation_config.cache_implementation,
        "attn": model.config._attn_implementation,
        "tokens": out.shape[1],
        "bad_error": bad_error,
    }))
    """
)


def test_saved_model_loads_without_the_package(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    KVQuantCache(model, bits=16)  # patched when saved: nothing of the patch may leak into config.json
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"bits": 16, "sink_tokens": 2}
    good = tmp_path / "good"
    model.save_pretrained(good)
    saved = json.loads((good / "generation_config.json").read_text())
    assert "cache_implementation" not in saved and "cache_config" not in saved
    assert saved["kvquant"] == {"cache_implementation": "kvquant", "cache_config": {"bits": 16, "sink_tokens": 2}}
    assert "kvquant" not in (good / "config.json").read_text()
    # The in-memory config is unchanged by saving.
    assert model.generation_config.cache_implementation == "kvquant"

    # What the custom key avoids: the same model with the name written in the standard field.
    bad = tmp_path / "bad"
    model.save_pretrained(bad)
    raw = json.loads((bad / "generation_config.json").read_text())
    raw.pop("kvquant")
    raw["cache_implementation"] = "kvquant"
    (bad / "generation_config.json").write_text(json.dumps(raw))

    # A clean interpreter that never imports transformers_kvquant (run outside the repository, so no conftest).
    report = run_clean(tmp_path, CLEAN_LOAD, str(good), str(bad))
    assert report["imported"] == []
    assert report["cache_implementation"] is None
    assert report["attn"] == "sdpa"
    assert report["tokens"] == 6
    assert report["bad_error"] is not None and "kvquant" in report["bad_error"]

    # With the package imported, loading restores the cache implementation and generate uses it.
    loaded = AutoModelForCausalLM.from_pretrained(good).eval()
    assert loaded.generation_config.cache_implementation == "kvquant"
    assert loaded.generation_config.cache_config == {"bits": 16, "sink_tokens": 2}
    out = generate(loaded, {"input_ids": torch.tensor([[1, 403, 407]])}, max_new_tokens=3)
    assert isinstance(out.past_key_values, KVQuantCache)
    assert out.past_key_values.settings.sink_tokens == 2


def test_kvquant_config_object_is_not_saved(tmp_path):
    """A KVQuantConfig object cannot go into JSON: it is dropped with a warning, the rest is kept."""
    from tests.helpers import quick_config

    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    model.generation_config.cache_implementation = "kvquant"
    model.generation_config.cache_config = {"config": quick_config(model, 3), "sink_tokens": 1}
    model.generation_config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    assert saved["kvquant"] == {"cache_implementation": "kvquant", "cache_config": {"sink_tokens": 1}}
    assert "config" in model.generation_config.cache_config  # the object itself is still in memory
