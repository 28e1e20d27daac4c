"""The launchers as custom operators: a step traced by ``torch.compile`` (one graph, ``fullgraph=True``) writes the
same cache and returns the same attention as the eager launchers (under the Triton interpreter on CPU, compiled on
a GPU with KVQUANT_TEST_COMPILED=1): the operators' schemas (a list of mutated cache tensors) trace, and two steps
in a row see each other's writes."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels import ops
from transformers_kvquant.kernels.layout import block_size, consolidate, kernel_constants
from transformers_kvquant.kernels.rope import rope_inv_freq
from transformers_kvquant.kernels.synthetic import random_cache

from tests.kernels.common import DEVICE


def _step(cache, consts, k, v, pos, q):
    ops.append(cache, k, v, pos)
    return ops.decode(q, cache, consts)


@pytest.mark.parametrize("one_buffer", [False, True], ids=["tensors", "arena"])
def test_compiled_step_equals_eager(one_buffer):
    """Both forms of the operators: the cache's tensors one by one, and a static cache's one buffer (``consolidate``),
    whose compiled step reads three tensors of the layer (cache, its slot positions and kernel tables) instead of thirty."""
    from torch._dynamo.backends.common import aot_autograd

    b, h, g, d, bits = 2, 2, 2, 64, 3
    caches = [random_cache(b, h, d, bits, 60, outliers=1, recent_window=4, sink_tokens=1, capacity=128, device=DEVICE,
                           seed=7) for _ in range(2)]
    if one_buffer:
        caches = [consolidate(c) for c in caches]
    consts = kernel_constants(caches[0], rope_inv_freq(d).to(DEVICE), block_size(bits))
    if not one_buffer:
        consts.arena = None
    gen = torch.Generator().manual_seed(3)
    inputs = []

    def counting(gm, example_inputs):
        inputs.append(len(example_inputs))
        return gm.forward

    compiled = torch.compile(_step, fullgraph=True, backend=aot_autograd(fw_compiler=counting))
    for step in range(2):  # two steps: the second reads what the first appended
        k = torch.randn(b, h, 1, d, generator=gen).to(DEVICE, torch.float16)
        v = torch.randn(b, h, 1, d, generator=gen).to(DEVICE, torch.float16)
        q = (torch.randn(b, h * g, d, generator=gen) * 0.3).to(DEVICE)
        pos = torch.full((b, 1), 60 + step, dtype=torch.int32, device=DEVICE)
        eager = _step(caches[0], consts, k, v, pos, q)
        traced = compiled(caches[1], consts, k, v, pos, q)
        # the value outliers reach the output through atomic adds, whose order a GPU does not fix: the last bits of
        # the output may differ between two launches, the cache's bytes may not
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step}: {m}")
    for name, t in caches[0].tensors().items():
        assert torch.equal(t, caches[1].tensors()[name]), name
    assert int(caches[1].length) == 62
    # graph inputs: k, v, positions, q and the cache (+ the kernel tables): 7 with the buffers (the cache's buffer,
    # its slot positions beside it, which a cache's layers share, and the tables' buffer), 34 without
    assert inputs and inputs[0] == (7 if one_buffer else 4 + 21 + 9), inputs
