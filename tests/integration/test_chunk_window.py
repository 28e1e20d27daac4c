"""A prefill chunk's queries read their own recent window exactly, as decode steps do.

With a recent window ``W``, token ``i`` fed alone reads slots ``(i - W, i]`` exactly and older slots quantized. The
same prompt fed as chunks (one forward, or several, of any size, including chunks longer than the window's ring)
must give the same logits up to float rounding; before chunk windows, a chunk read exactly only its own newest ``W``
tokens, and the logits differed by the quantization error (relative 0.10-0.16 here).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import quick_config, tiny_llama, tiny_mistral
from transformers_kvquant import KVQuantCache

WINDOW = 6
# The projections of a token fed alone and within a chunk differ in the last bit (matrix shapes), which now and then
# moves a value across a codebook boundary; the old chunk semantics differed from token by token by 0.10-0.16.
TOL = 2e-3


def logits_by_chunks(model, cfg, ids, chunks, mask=None, **cache_config):
    """Logits ``[B, T, V]`` of ``ids`` fed to one cache in chunks of the given sizes."""
    cache = KVQuantCache(model, cfg, **cache_config)
    out, t = [], 0
    with torch.no_grad():
        for n in chunks:
            kw = {}
            if mask is not None:
                kw["attention_mask"] = mask[:, : t + n]
                pos = (mask[:, : t + n].cumsum(-1) - 1).clamp_min(0)
                kw["position_ids"] = pos[:, t : t + n]
            out.append(model(ids[:, t : t + n], past_key_values=cache, use_cache=True, **kw).logits)
            t += n
    return torch.cat(out, 1)


def worst(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def llama():
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=128)
    return model, quick_config(model, bits=2, outlier_fraction=0.05)


@pytest.mark.parametrize("chunks", [(40,), (7, 13, 1, 19), (1, 39), (3, 37)])
@pytest.mark.parametrize("static", [False, True])
def test_chunks_equal_token_by_token(llama, chunks, static):
    model, cfg = llama
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(0))
    opts = dict(recent_window=WINDOW, sink_tokens=1, backend="reference")
    if static:
        opts["max_cache_len"] = 64
    ref = logits_by_chunks(model, cfg, ids, (1,) * 40, **opts)
    got = logits_by_chunks(model, cfg, ids, chunks, **opts)
    assert worst(got, ref) < TOL
    # and the window matters: without it the same chunks read every older key quantized
    plain = logits_by_chunks(model, cfg, ids, chunks, recent_window=0, sink_tokens=1, backend="reference")
    assert worst(plain, ref) > 10 * TOL


def test_chunk_longer_than_the_ring(llama):
    """A chunk of more than ring slots (window + 64) after a prefix: the prefix's exact tail was overwritten by the
    append, so it is taken before it."""
    model, cfg = llama
    ids = torch.randint(3, 128, (1, 110), generator=torch.Generator().manual_seed(1))
    opts = dict(recent_window=WINDOW, sink_tokens=2, backend="reference")
    ref = logits_by_chunks(model, cfg, ids, (1,) * 110, **opts)
    assert worst(logits_by_chunks(model, cfg, ids, (20, 90), **opts), ref) < TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_batch(attn):
    model = tiny_llama(layers=1, heads=4, kv_heads=1, head_dim=16, vocab=128, attn_implementation=attn)
    cfg = quick_config(model, bits=3, outlier_fraction=0.05)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :11] = 0
    opts = dict(recent_window=WINDOW, sink_tokens=1, backend="reference")
    ref = logits_by_chunks(model, cfg, ids, (1,) * 23, mask=mask, **opts)
    got = logits_by_chunks(model, cfg, ids, (9, 14), mask=mask, **opts)
    real = mask.bool()
    assert worst(got[real], ref[real]) < TOL


def test_sliding_window_layers():
    model = tiny_mistral(layers=1, heads=4, kv_heads=2, head_dim=16, sliding_window=10)
    cfg = quick_config(model, bits=3, outlier_fraction=0.05)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(3))
    opts = dict(recent_window=4, sink_tokens=1, backend="reference")
    ref = logits_by_chunks(model, cfg, ids, (1,) * 30, **opts)
    assert worst(logits_by_chunks(model, cfg, ids, (12, 18), **opts), ref) < TOL


def test_uncapped_outliers():
    model = tiny_llama(layers=1, heads=4, kv_heads=2, head_dim=16, vocab=128)
    cfg = quick_config(model, bits=2, outlier_fraction=0.05)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    opts = dict(recent_window=WINDOW, sink_tokens=1, outliers="uncapped", backend="reference")
    ref = logits_by_chunks(model, cfg, ids, (1,) * 30, **opts)
    assert worst(logits_by_chunks(model, cfg, ids, (11, 19), **opts), ref) < TOL


@pytest.mark.parametrize("static", [False, True])
def test_row_blocks_read_only_the_columns_they_can_see(llama, monkeypatch, static):
    """With the queries split into many blocks (a small mask budget), each block's attention call leaves out the
    store slots that are exact for all its queries and the slots after its newest query (a static cache's unwritten
    ones too): fewer keys per call, the same logits as token by token."""
    from transformers_kvquant.integration import chunk_window

    model, cfg = llama
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(5))
    opts = dict(recent_window=WINDOW, sink_tokens=1, backend="reference")
    if static:
        opts["max_cache_len"] = 64
    ref = logits_by_chunks(model, cfg, ids, (1,) * 40, **opts)
    monkeypatch.setattr(chunk_window, "MASK_ELEMENTS", 400)  # a few query rows per call
    calls = []
    original = chunk_window.attend

    def spy(module, q, k, v, ek, ev, attention_mask, chunk, begin, inner, **kw):
        def counted(mod, qq, kk, vv, mask, **kw2):
            calls.append((qq.shape[2], kk.shape[2], k.shape[2] + ek.shape[2]))
            return inner(mod, qq, kk, vv, mask, **kw2)
        return original(module, q, k, v, ek, ev, attention_mask, chunk, begin, counted, **kw)

    monkeypatch.setattr(chunk_window, "attend", spy)
    got = logits_by_chunks(model, cfg, ids, (25, 15), **opts)
    assert worst(got, ref) < TOL
    assert len(calls) > 4 and all(q >= 1 for q, _, _ in calls)
    assert sum(k for _, k, _ in calls) < 0.7 * sum(full for _, _, full in calls)  # the causal half left out
