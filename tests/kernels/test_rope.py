"""The one RoPE module equals transformers' RoPE bit for bit (what the exactness of the cache rests on)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)
from transformers_kvquant.kernels.rope import (
    apply_rope,
    rope_at,
    rope_cos_sin,
    rope_inv_freq,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_apply_rope_is_transformers_apply_rotary_pos_emb(dtype):
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rotary = LlamaRotaryEmbedding(config)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 7, 16, generator=g).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 4, 5, 9, 10, 11, 40]])
    cos, sin = rotary(q, positions)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(apply_rope(q, cos, sin), want_q) and torch.equal(apply_rope(k, cos, sin), want_k)


def test_rope_at_integer_positions_matches_the_rotary_module():
    """fp32 cos/sin from ``inv_freq`` at stored positions are the model's own (default RoPE, scaling 1)."""
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    rotary = LlamaRotaryEmbedding(config)
    positions = torch.tensor([[0, 5, 17, 200]])
    inv_freq = rope_inv_freq(16)
    assert torch.allclose(inv_freq, rotary.inv_freq)
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    got_cos, got_sin = rope_cos_sin(positions, rotary.inv_freq, float(rotary.attention_scaling))
    assert torch.allclose(got_cos, cos, atol=1e-6) and torch.allclose(got_sin, sin, atol=1e-6)
    x = torch.randn(1, 2, 4, 16)
    assert torch.allclose(rope_at(x, positions, rotary.inv_freq), apply_rope(x, cos, sin), atol=1e-5)
