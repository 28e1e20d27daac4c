import os

# Triton kernels run under the interpreter on CPU machines. This must be set before anything imports triton;
# on a GPU machine, KVQUANT_TEST_COMPILED=1 runs the same tests compiled.
if os.environ.get("KVQUANT_TEST_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

# transformers >= 5.25 loads Hub kernels in from_pretrained by default (use_kernels): a download, which the tests
# (offline, like CI) must not attempt, and with an older `kernels` package installed an error. Child processes inherit it.
os.environ.setdefault("USE_HUB_KERNELS", "0")

import pytest
import torch

from tests.helpers import STORIES

# One thread by default: the tests are many small ops, where extra threads mostly add synchronization (and on a
# shared machine oversubscribe it). KVQUANT_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("KVQUANT_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def stories():
    """(model, tokenizer) of the real tiny LLaMA stories260K (GQA 8q/4kv, head_dim 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(STORIES)
    model = AutoModelForCausalLM.from_pretrained(STORIES).eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default model SmolLM2-135M-Instruct, fp32."""
    from transformers_kvquant.models import load_model

    return load_model("smollm2")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The local Hub stand-in (tests/hub/hub_server.py), with this process's huggingface_hub pointed at it.

    huggingface_hub reads HF_ENDPOINT and friends when it is imported, so in-process tests set the constants it
    derives from them; tests/hub/test_hub.py::test_cli_round_trip_through_hf_endpoint sets the real environment
    variables in a fresh process instead.
    """
    from huggingface_hub import constants

    from tests.hub.hub_server import HubStandIn

    with HubStandIn() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setenv("HF_TOKEN", "hf_stand_in_token")
        yield server
