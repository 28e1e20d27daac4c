import os

# Triton kernels run under the interpreter on CPU machines. This must be set before anything imports triton;
# on a GPU machine, KVQUANT_TEST_COMPILED=1 runs the same tests compiled.
if os.environ.get("KVQUANT_TEST_COMPILED") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
