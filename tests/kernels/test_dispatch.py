"""KVQuantCache with the kernels on gives the reference path's tokens and near-identical logits."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config, tiny_llama, tiny_mistral
from tests.kernels.common import DEVICE
from transformers_kvquant import KVQuantCache
from transformers_kvquant.integration.kernel_dispatch import (
    KernelUnavailableError,
    kernels_enabled,
)


def generate(model, cfg, backend, inputs, new_tokens=3, **cache_config):
    cache = KVQuantCache(model, cfg, backend=backend, **cache_config)
    with torch.no_grad():
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    used = [layer._kernels for layer in cache.layers]
    return out, used


def compare(model, inputs, bits=3, fraction=0.05, **cache_config):
    cfg = quick_config(model, bits=bits, outlier_fraction=fraction)
    ref, used_ref = generate(model, cfg, "reference", inputs, **cache_config)
    fused, used = generate(model, cfg, "triton", inputs, **cache_config)
    assert not any(used_ref) and all(used)
    assert torch.equal(ref.sequences, fused.sequences)
    worst = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref.logits, fused.logits))
    scale = max(float(a.float().abs().max()) for a in ref.logits)
    return worst / scale


def batch(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n :] = 1
    return {"input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE)}


def test_generate_same_tokens_left_padded_gqa():
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    assert compare(model, batch(128, (6, 3)), bits=3) < 1e-3


def test_generate_same_tokens_sliding_window_with_recent_window_and_sink():
    model = tiny_mistral(layers=1, heads=2, kv_heads=1, head_dim=64, sliding_window=6).to(DEVICE)
    assert compare(model, batch(128, (8,)), bits=2, fraction=0.02, recent_window=2, sink_tokens=2) < 1e-3


def test_forcing_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=64)
    cfg = quick_config(model, bits=3, outlier_fraction=0.0)
    cache = KVQuantCache(model, cfg, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(1, 2, 1, 64), torch.zeros(1, 2, 1, 64))
    with pytest.raises(KernelUnavailableError, match="TRITON_INTERPRET"):
        kernels_enabled(cache.settings, layer.store)
    cache.settings.backend = "auto"
    assert not kernels_enabled(cache.settings, layer.store)  # auto: CPU tensors take the reference path


def test_unsupported_head_dim_is_refused_when_forced_and_skipped_by_auto():
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=16)
    cfg = quick_config(model, bits=3, outlier_fraction=0.0)
    cache = KVQuantCache(model, cfg, backend="triton")
    layer = cache.layers[0]
    layer.lazy_initialization(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16))
    with pytest.raises(KernelUnavailableError, match="head_dim"):
        kernels_enabled(cache.settings, layer.store)


def test_launchers_switch_to_the_inputs_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: a launcher called with tensors on another GPU (a layer that
    device_map placed on cuda:1) must make that GPU current for the launch, and leave CPU inputs alone."""
    import contextlib

    from transformers_kvquant.kernels.layout import on_input_device

    current = {"device": 0}
    entered = []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(dev)
        before, current["device"] = current["device"], torch.device(dev).index
        try:
            yield
        finally:
            current["device"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["device"])
    monkeypatch.setattr(torch.cuda, "device", fake_device)

    class OnGpu:  # stands in for a CUDA tensor: only .is_cuda and .device are read
        def __init__(self, index):
            self.is_cuda, self.device = True, torch.device("cuda", index)

    seen = []
    launch = on_input_device(lambda first, *rest: seen.append(current["device"]) or len(rest))
    assert launch(OnGpu(1), 2, 3) == 2
    assert launch(OnGpu(0)) == 0
    assert launch(torch.zeros(1)) == 0
    assert seen == [1, 0, 0] and entered == [torch.device("cuda", 1)]
    assert current["device"] == 0  # restored after the launch
    # a PackedCache argument: its tensors' device
    from transformers_kvquant.kernels.synthetic import random_cache

    cache = random_cache(1, 1, 64, 3, 5)
    cache.key_codes = OnGpu(1)
    seen.clear()
    launch(cache)
    assert seen == [1]


def test_chunked_prefill_without_padding_takes_the_causal_kernel_path(monkeypatch):
    """A prompt prefilled in chunks with no padding: the kernels' prefill attends with SDPA's bottom-right causal
    pattern (no mask tensor); the result is the reference path's."""
    from transformers_kvquant.integration import kernel_dispatch

    calls = []
    original = kernel_dispatch._causal_chunk
    monkeypatch.setattr(kernel_dispatch, "_causal_chunk", lambda *a: calls.append(1) or original(*a))
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    cfg = quick_config(model, bits=3, outlier_fraction=0.02)
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits = {}
    for backend in ("reference", "triton"):
        cache = KVQuantCache(model, cfg, backend=backend, max_cache_len=64)
        with torch.no_grad():
            for a in range(0, 40, 16):
                where = torch.arange(a, min(a + 16, 40), device=DEVICE)
                out = model(ids[:, a : a + 16], attention_mask=torch.ones(1, int(where[-1]) + 1, dtype=torch.long, device=DEVICE),
                            past_key_values=cache, cache_position=where, position_ids=where[None], use_cache=True)
        logits[backend] = out.logits
    assert torch.allclose(logits["reference"], logits["triton"], atol=1e-4, rtol=1e-4)
    assert len(calls) == 2  # the second and third chunks (the first has no prefix: transformers passes no mask)


def test_every_tensor_a_compiled_step_reads_has_a_fixed_address():
    """A CUDA graph copies each input it does not know to be static before every replay (for the kernel tables of
    a 32-layer model that was ~290 small copies and ~3 ms per step): the static cache's buffers and the layers'
    kernel tables are all marked, as transformers' StaticLayer marks its keys and values."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    cfg = quick_config(model, bits=3, outlier_fraction=0.05)
    cache = KVQuantCache(model, cfg, backend="triton", max_cache_len=64)
    with torch.no_grad():
        model(**batch(128, (5,)), past_key_values=cache, use_cache=True)
        model(input_ids=torch.tensor([[7]], device=DEVICE), past_key_values=cache, use_cache=True)  # a decode step
    for layer in cache.layers:
        tables = [t for t in vars(layer.kernel_tables[1]).values() if isinstance(t, torch.Tensor)]
        buffers = list(layer.store.cache.tensors().values())
        assert len(tables) == 10 and buffers  # nine tables and the buffer they are views into
        unmarked = [i for i, t in enumerate(tables + buffers) if getattr(t, "_dynamo_static_input_type", None) is None]
        assert unmarked == []


@pytest.mark.parametrize("nq, nk, g", [(5, 9, 1), (16, 16, 2), (7, 13, 3), (1, 2, 1)])
def test_square_causal_is_the_bottom_right_pattern(nq, nk, g):
    """The GPU's chunk attention (queries padded at the front to a square, plain causal) is SDPA's bottom-right
    causal pattern, also for GQA heads and batch > 1."""
    from torch.nn.attention.bias import causal_lower_right

    from transformers_kvquant.integration.kernel_dispatch import _square_causal

    gen = torch.Generator().manual_seed(nq * 100 + nk)
    q = torch.randn(2, 2 * g, nq, 16, generator=gen)
    k, v = (torch.randn(2, 2 * g, nk, 16, generator=gen) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(nq, nk), scale=0.3)
    torch.testing.assert_close(_square_causal(q, k, v, 0.3), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("elements", [1 << 26, 7])  # one block of rows; a few rows at a time
def test_plain_causal_recognizes_only_the_bottom_right_pattern(monkeypatch, elements):
    """The prefill's plain-causal check, also when it compares the mask a block of rows at a time (what keeps a
    32K x 512K mask from doubling in memory): bool and additive masks, square and chunk-over-prefix shapes."""
    from transformers_kvquant.integration import kernel_dispatch

    monkeypatch.setattr(kernel_dispatch, "MASK_CHECK_ELEMENTS", elements)

    def check(mask):
        kernel_dispatch._VERDICT[:] = [None, None, None]  # the verdict is kept per forward's mask
        return kernel_dispatch._plain_causal(mask, mask)

    for nq, nk in ((5, 5), (5, 9), (1, 4), (6, 13)):
        causal = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)[None, None].expand(2, 1, nq, nk).clone()
        assert check(causal)
        additive = torch.zeros(2, 1, nq, nk).masked_fill(~causal, torch.finfo(torch.float32).min)
        assert check(additive)
        shifted = causal.clone()
        shifted[1, 0, -1, -1] = False  # the last query may not see its own key
        assert not check(shifted)
        padded = causal.clone()
        padded[0, 0, :, 0] = False  # left padding in one row of the batch
        assert not check(padded)
        if nq > 1:
            late = causal.clone()
            late[1, 0, 0, nk - nq + 1] = True  # the first query sees the second's key
            assert not check(late)


def test_prefill_chunks_read_their_window_exactly_with_the_kernels():
    """A prompt in two chunks through the kernels (dequantized prefix + the chunk's exact window) gives the logits of
    the reference path fed one token at a time (each a decode step reading its newest tokens exactly)."""
    from tests.integration.test_chunk_window import logits_by_chunks, worst

    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    cfg = quick_config(model, bits=2, outlier_fraction=0.05)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    opts = dict(recent_window=5, sink_tokens=1)
    ref = logits_by_chunks(model, cfg, ids, (1,) * 24, backend="reference", **opts)
    fused = logits_by_chunks(model, cfg, ids, (9, 15), backend="triton", **opts)
    assert worst(fused.float().cpu(), ref.float().cpu()) < 2e-3
    plain = logits_by_chunks(model, cfg, ids, (9, 15), backend="triton", recent_window=0, sink_tokens=1)
    assert worst(plain.float().cpu(), ref.float().cpu()) > 2e-2


def test_compiled_step_with_the_kernels_reads_one_buffer_per_layer_and_matches_eager():
    """gpt-fast style compiled decode steps over a static cache with the kernels: the same logits as eager steps,
    and the compiled graph takes from the cache only each layer's buffer and kernel tables (two tensors per layer:
    TorchDynamo guards every tensor input, and a view of a mutated buffer as a second input is refused), and the
    slots' positions, one tensor for all layers."""
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=64).to(DEVICE)
    cfg = quick_config(model, bits=3, outlier_fraction=0.05)
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    placeholders = []

    def recording(gm, example_inputs):
        placeholders.append([n.name for n in gm.graph.nodes if n.op == "placeholder"])
        return gm.forward

    def steps(compiled):
        cache = KVQuantCache(model, cfg, backend="triton", max_cache_len=64)
        forward = torch.compile(model.forward, fullgraph=True, backend=recording) if compiled else model.forward
        logits = []
        with torch.no_grad():
            token = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for p in range(5, 8):
                where = torch.tensor([p], device=DEVICE)
                out = forward(input_ids=token, past_key_values=cache, cache_position=where, position_ids=where[None],
                              use_cache=True)
                logits.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        return torch.stack(logits)

    eager = steps(False)
    torch._dynamo.reset()
    compiled = steps(True)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert len(placeholders) == 1  # one graph for every step
    from_cache = [n for n in placeholders[0] if "past_key_values" in n]
    # each layer's buffer and kernel tables, and the one positions tensor the layers share (an input once)
    arenas = [n for n in from_cache if n.endswith("arena")]
    shared = [n for n in from_cache if n.endswith("store_cache_positions")]
    assert len(arenas) == 4 and len(shared) == 1 and len(from_cache) == 5, from_cache
