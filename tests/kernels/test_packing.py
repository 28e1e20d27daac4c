import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers_kvquant.kernels.layout import group_size, pack, packed_words, unpack


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 300), rows=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_pack_then_unpack_is_identity(bits, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (rows, packed_words(n, bits))
    assert torch.equal(unpack(words, bits, n), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_extreme_codes_round_trip(bits):
    # All-ones codes set the sign bit of every word; all-max codes exercise the straddling 3-bit values.
    for value in (0, 2**bits - 1):
        codes = torch.full((2, 3, 67), value, dtype=torch.uint8)
        assert torch.equal(unpack(pack(codes, bits), bits, 67), codes)


def test_three_bit_layout_matches_kvquant():
    # 32 codes fill 3 words; code i occupies bits 3i..3i+2 of the 96-bit group, so codes 10 and 21 straddle.
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[10] = 0b111
    w = pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert w.tolist() == [0b11 << 30, 0b1, 0]
    codes = torch.zeros(32, dtype=torch.uint8)
    codes[21] = 0b101
    w = pack(codes, 3).to(torch.int64) & 0xFFFFFFFF
    assert w.tolist() == [0, 1 << 31, 0b10]


def test_words_per_head_dim():
    assert packed_words(128, 4) == 16 and packed_words(128, 3) == 12 and packed_words(128, 2) == 8
    assert packed_words(64, 3) == 6
    assert packed_words(8, 4) == 1 and packed_words(8, 2) == 1 and packed_words(8, 3) == 3
    assert group_size(3) == 32


def test_bad_bits_and_shapes_raise():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack(torch.zeros(4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="expected 6 packed words"):
        unpack(torch.zeros(5, dtype=torch.int32), 3, 64)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_no_vectors_pack_and_unpack(bits):
    """An empty cache (no slots yet) packs and unpacks to empty tensors of the right width."""
    codes = torch.zeros(2, 1, 0, 64, dtype=torch.uint8)
    words = pack(codes, bits)
    assert words.shape == (2, 1, 0, packed_words(64, bits))
    assert unpack(words, bits, 64).shape == codes.shape


# ------------------------------------------------------------------------------------------------ reader layout
from transformers_kvquant.kernels.layout import (
    nibble_channels,
    pack_codes,
    unpack_codes,
    words_per_vector,
)


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), d=st.sampled_from([8, 16, 24, 40, 64, 96, 128]), keys=st.booleans(),
       rows=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_reader_layout_round_trip(bits, d, keys, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, 2, d), generator=g)
    words = pack_codes(codes, bits, keys)
    assert words.dtype == torch.int32 and words.shape == (rows, 2, words_per_vector(d, bits))
    assert torch.equal(unpack_codes(words, bits, keys, d), codes)


def test_reader_layout_places_rope_pairs_in_one_selector():
    """4 bits: word w, nibble n holds the channel nibble_channels gives; keys pair channel j with j + D/2."""
    d = 64
    chan = nibble_channels(d, True)
    assert chan[:8] == (0, 1, 32, 33, 2, 3, 34, 35)
    assert sorted(chan) == list(range(d)) and nibble_channels(d, False) == tuple(range(d))
    codes = torch.zeros(d, dtype=torch.long)
    codes[33] = 9
    words = pack_codes(codes, 4, True)
    assert (int(words[0]) >> 12) & 15 == 9 and int(words[1:].abs().sum()) == 0


def test_three_bits_use_exactly_three_bits_a_code():
    assert words_per_vector(128, 3) == 12 and words_per_vector(64, 2) == 4 and words_per_vector(64, 4) == 8
    assert words_per_vector(40, 3) == 6  # padded to 64 channels (reference path only)
