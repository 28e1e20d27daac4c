"""Decode attention on the packed cache equals the fp32 PyTorch reference (run under the Triton interpreter on CPU,
compiled on a GPU with KVQUANT_TEST_COMPILED=1)."""

from __future__ import annotations

import pytest
import torch
from transformers_kvquant.kernels.decode import decode_attention
from transformers_kvquant.kernels.layout import kernel_constants
from transformers_kvquant.kernels.naive import decode_reference
from transformers_kvquant.kernels.synthetic import random_cache, rope_inv_freq

from tests.kernels.common import DEVICE, rel_err

# (batch, kv heads, query heads per kv head, head_dim, length, bits, outliers per token and head): MHA, GQA 2..8 and
# SmolLM2's 3, head_dim 64 and 128, odd lengths, batch > 1, every width with and without outliers (1, 2 and a
# non-power-of-two 3).
GRID = [
    (1, 2, 1, 64, 21, 3, 2),
    (3, 2, 1, 64, 7, 2, 0),
    (1, 2, 4, 64, 45, 4, 1),
    (2, 1, 4, 128, 37, 3, 2),
    (1, 1, 8, 128, 13, 2, 3),
    (3, 2, 8, 64, 5, 4, 0),
    (1, 4, 2, 128, 19, 4, 2),
    (2, 3, 3, 64, 70, 3, 1),  # SmolLM2: 3 KV heads x 64, 9 query heads
]
TOL = 2e-3  # relative error: the kernel decodes and rotates keys in fp16 (the reference in fp32)
BLOCK = 64 if DEVICE == "cuda" else 16  # small blocks keep the interpreter fast; 64 is what the cache launches


def case_id(c):
    b, h, g, d, n, bits, s = c
    return f"B{b}-H{h}x{g}-D{d}-L{n}-b{bits}-o{s}"


def run(cache, groups=1, mask=None, window=0, splits=3, seed=0, prefetch=1, block=BLOCK, direct_keys=True, value_prefetch=None,
        **kw):
    g = torch.Generator().manual_seed(seed)
    b, h, d = cache.batch, cache.heads, cache.head_dim
    inv_freq = rope_inv_freq(d)
    q = (torch.randn(b, h * groups, d, generator=g) * 0.4).to(DEVICE)
    length = int(cache.length)
    out = decode_attention(q, cache, kernel_constants(cache, inv_freq.to(DEVICE), block), mask=mask, sliding_window=window, n_splits=splits,
                           prefetch=prefetch, direct_keys=direct_keys,
                           **({} if value_prefetch is None else {"value_prefetch": value_prefetch}), **kw)
    ref = decode_reference(q, cache, inv_freq.to(DEVICE), length, mask=mask, sliding_window=window)
    return out, ref


@pytest.mark.parametrize("c", GRID, ids=case_id)
def test_decode_matches_reference(c):
    b, h, g, d, n, bits, s = c
    cache = random_cache(b, h, d, bits, n, outliers=s, sink_tokens=1, recent_window=2, pads=[0, 2, 5][:b], device=DEVICE, seed=n)
    out, ref = run(cache, groups=g)
    assert out.shape == (b, h * g, d) and out.dtype == torch.float32
    assert rel_err(out, ref) < TOL  # fp16 codebook lookups and key rotation in the kernel


@pytest.mark.parametrize("c", [(2, 1, 4, 128, 150, 3, 2), (1, 2, 1, 128, 131, 2, 0), (1, 1, 8, 128, 70, 4, 1)], ids=case_id)
def test_keys_decoded_straight_into_the_tensor_core_operand(c):
    """head_dim 128, 64-slot blocks, 4 warps: the key tile is built in the tensor-core operand's layout (its columns
    and slots permuted, decode.load_words_dot); several blocks, so each block's slots and in-block RoPE offsets must
    land on the right rows. It equals the reference and the tile built the other way."""
    from transformers_kvquant.kernels.decode import _direct

    b, h, g, d, n, bits, s = c
    assert _direct(d, 64, 4)
    cache = random_cache(b, h, d, bits, n, outliers=s, sink_tokens=1, recent_window=2, pads=[0, 3][:b], device=DEVICE, seed=n)
    direct, ref = run(cache, groups=g, splits=2, block=64)
    tiled, _ = run(cache, groups=g, splits=2, block=64, direct_keys=False)
    assert rel_err(direct, ref) < TOL and rel_err(direct, tiled) < 1e-3


@pytest.mark.parametrize("c", [GRID[0], GRID[3], GRID[7]], ids=case_id)
def test_two_blocks_in_flight(c):
    """Two blocks of code words in flight in the key loop, the value loop or both: the same attention."""
    b, h, g, d, n, bits, s = c
    cache = random_cache(b, h, d, bits, n, outliers=s, sink_tokens=1, recent_window=2, pads=[0, 2, 5][:b], device=DEVICE, seed=n)
    out, ref = run(cache, groups=g, prefetch=2, value_prefetch=2, splits=2)
    one, _ = run(cache, groups=g, prefetch=1, value_prefetch=1, splits=2)
    keys2, _ = run(cache, groups=g, prefetch=2, value_prefetch=1, splits=2)
    for o in (out, one, keys2):  # compiled, the schedules may round apart
        assert rel_err(o, ref) < TOL and rel_err(o, out) < 1e-5


@pytest.mark.parametrize("c", [GRID[0], GRID[3], GRID[4], GRID[7]], ids=case_id)
def test_outlier_query_gathered_a_block_ahead(c):
    """The key outliers' query components gathered a block ahead (``query_ahead``): the same attention, over several
    blocks per split so the carried gathers must belong to the right block."""
    b, h, g, d, n, bits, s = c
    n = max(n, 3 * BLOCK + 5)
    cache = random_cache(b, h, d, bits, n, outliers=s, sink_tokens=1, recent_window=2, pads=[0, 2, 5][:b], device=DEVICE, seed=n)
    ahead, ref = run(cache, groups=g, splits=2, query_ahead=True)
    now, _ = run(cache, groups=g, splits=2, query_ahead=False)
    assert rel_err(ahead, ref) < TOL and rel_err(ahead, now) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_model_dtypes(dtype):
    cache = random_cache(2, 2, 64, 3, 29, outliers=2, recent_window=3, dtype=dtype, device=DEVICE, seed=3)
    out, ref = run(cache, groups=2)
    assert rel_err(out, ref) < TOL


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_left_padding_mask(kind):
    pads = [0, 4]
    cache = random_cache(2, 2, 64, 4, 30, outliers=1, recent_window=1, pads=pads, device=DEVICE, seed=5)
    keep = torch.ones(2, cache.capacity, dtype=torch.bool)
    keep[1, : pads[1]] = False
    keep[0, 7] = False
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    out, ref = run(cache, mask=mask.to(DEVICE))
    assert rel_err(out, ref) < TOL
    unmasked, _ = run(cache)
    assert rel_err(unmasked, ref) > 1e-2  # the masked slots really were hidden


def test_sliding_window():
    cache = random_cache(1, 2, 64, 2, 40, outliers=2, recent_window=2, device=DEVICE, seed=7)
    out, ref = run(cache, groups=2, window=19)
    assert rel_err(out, ref) < TOL
    full, _ = run(cache, groups=2)
    assert rel_err(full, ref) > 1e-2


def test_everything_in_the_exact_window():
    cache = random_cache(2, 1, 64, 3, 5, outliers=2, recent_window=5, device=DEVICE, seed=9)
    out, ref = run(cache, groups=4)
    assert rel_err(out, ref) < TOL


def test_capacity_beyond_the_length_and_split_count():
    """A static cache: capacity far past the length (the splits share the written blocks, read on the device)."""
    cache = random_cache(1, 2, 64, 3, 50, outliers=1, capacity=512, device=DEVICE, seed=11)
    one, ref = run(cache, splits=1)
    many, _ = run(cache, splits=7)
    assert rel_err(one, ref) < TOL and rel_err(many, ref) < TOL
    assert rel_err(one, many) < 1e-4


def test_non_consecutive_positions_take_the_per_slot_rotation():
    cache = random_cache(1, 1, 64, 3, 40, outliers=1, device=DEVICE, seed=13)
    cache.positions[:, 5:9] += 7  # a block whose positions are not its base plus offsets
    out, ref = run(cache)
    assert rel_err(out, ref) < TOL


def test_every_slot_of_a_block_off_the_base():
    """Positions shuffled inside the first blocks: each slot needs its own base (one round per distinct base)."""
    cache = random_cache(2, 2, 64, 2, 45, outliers=2, device=DEVICE, seed=17)
    g = torch.Generator().manual_seed(0)
    cache.positions[:, :32] = (torch.randperm(32, generator=g) * 5 + 3).to(cache.positions)
    out, ref = run(cache, groups=2)
    assert rel_err(out, ref) < TOL
    cache.positions[:, :32] = torch.arange(32).to(cache.positions)
    moved, _ = run(cache, groups=2)
    assert rel_err(moved, out) > 1e-2  # the positions really enter the scores


def test_outliers_over_many_blocks_and_a_dominant_outlier():
    """Key and value outliers over a dozen blocks of one split, GQA with batch 2; then one key outlier so large that
    its corrected score exceeds every uncorrected one by far (the softmax max must be taken after the corrections:
    before, ``2^(s - max)`` would overflow)."""
    cache = random_cache(2, 2, 64, 3, 3 * 4 * BLOCK + 9, outliers=2, recent_window=2, pads=[0, 5], device=DEVICE, seed=19)
    out, ref = run(cache, groups=2, splits=1)
    assert rel_err(out, ref) < TOL
    # large residuals: a corrected score far above every uncorrected one
    cache.key_outlier_values[1, 0, 0, 4 * BLOCK + 3] = -240.0  # signs that raise the scores (this seed's queries)
    cache.key_outlier_values[0, 1, 1, 2 * BLOCK + 1] = 240.0
    big, big_ref = run(cache, groups=2, splits=1)
    assert torch.isfinite(big).all() and rel_err(big, big_ref) < TOL
    assert rel_err(big, out) > 0.5  # those slots took their rows' attention


def test_outliers_window_and_sink_change_the_output():
    """The comparison can fail: dropping outliers, the exact window or the sink moves the result beyond tolerance."""
    cache = random_cache(1, 2, 64, 2, 33, outliers=2, recent_window=3, device=DEVICE, seed=15)
    out, _ = run(cache)
    for edit in ("outliers", "window", "sink"):
        other = random_cache(1, 2, 64, 2, 33, outliers=2, recent_window=3, device=DEVICE, seed=15)
        if edit == "outliers":
            other.key_outlier_values.zero_()
            other.value_outlier_values.zero_()
        elif edit == "window":
            other.window_keys.mul_(-1)
        else:
            other.sink_values.mul_(50)
        changed, changed_ref = run(other)
        assert rel_err(changed, changed_ref) < TOL
        assert rel_err(changed, out) > 1e-3, edit


def test_split_rule_fills_one_wave():
    """Programs per SM follow registers (per warp, in units of 256) and shared memory; the splits fill one wave."""
    from transformers_kvquant.kernels.decode import default_splits, programs_per_sm

    h200 = (132, 65536, 233472, 2048)  # SMs, registers, shared bytes, threads per SM
    assert programs_per_sm(255, 22528, 4, h200) == 2
    assert programs_per_sm(128, 22528, 4, h200) == 4
    assert programs_per_sm(64, 100_000, 4, h200) == 2  # shared memory binds
    assert programs_per_sm(32, 0, 1, h200) == 32  # at most 32 programs
    cache = random_cache(1, 2, 64, 3, 40, capacity=4096, device="cpu", seed=1)
    assert default_splits(cache, 64, resident=2) == 4  # CPU stands for 4 SMs: 4 x 2 programs over 2 (row, head)
    small = random_cache(1, 2, 64, 3, 40, capacity=128, device="cpu", seed=1)
    assert default_splits(small, 64, resident=8) == 2  # never more splits than blocks
