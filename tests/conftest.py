import os

import pytest
import torch

from tests.helpers import STORIES

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
