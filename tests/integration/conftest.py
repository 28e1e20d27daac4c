import pytest
import torch

from transformers_kvquant import KVQuantCache, unpatch_model


@pytest.fixture(autouse=True)
def _unpatch_shared_models(request):
    """Leave the session-wide models as other test areas expect them: unpatched, attention restored."""
    yield
    for name in ("stories", "smollm2"):
        if name in request.fixturenames:
            unpatch_model(request.getfixturevalue(name)[0])


_STORIES_VARIANTS: dict = {}


@pytest.fixture
def stories_variant():
    """stories260K loaded in a given dtype and attention implementation (cached per variant for the session)."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import STORIES

    def load(dtype=torch.float32, attn="sdpa", **kwargs):
        key = (dtype, attn, tuple(sorted(kwargs.items())))
        if key not in _STORIES_VARIANTS:
            model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=dtype, attn_implementation=attn, **kwargs)
            _STORIES_VARIANTS[key] = model.eval()
        model = _STORIES_VARIANTS[key]
        unpatch_model(model)
        return model

    return load


@pytest.fixture
def crop_calls(monkeypatch):
    """Records every ``KVQuantCache.crop`` argument (assisted decoding must really crop)."""
    calls = []
    original = KVQuantCache.crop

    def spy(self, n):
        calls.append(n)
        return original(self, n)

    monkeypatch.setattr(KVQuantCache, "crop", spy)
    return calls
