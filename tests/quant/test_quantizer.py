import pytest
import torch

from transformers_kvquant.quant.codebook import Codebook, uniform_codebook
from transformers_kvquant.quant.quantizer import (
    ChannelKeyQuantizer,
    TokenQuantizer,
    fake_quantize,
    outlier_slots,
)


def _keys(b=2, h=3, t=17, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h, t, d, generator=g)
    x[..., 1] += 4.0  # an all-positive channel: needs an unrounded zero point
    return x


def _channel_quantizer(x, slots, bits=3, pct=0.99):
    flat = x.permute(1, 3, 0, 2).reshape(x.shape[1], x.shape[3], -1)
    hi, lo = flat.quantile(pct, dim=-1), flat.quantile(1 - pct, dim=-1)
    return ChannelKeyQuantizer(uniform_codebook(bits), (hi + lo) / 2, (hi - lo) / 2, slots)


def test_outlier_slots():
    assert outlier_slots(0.0, 192) == 0
    assert outlier_slots(0.01, 192) == 2
    assert outlier_slots(0.01, 4096) == 41
    assert outlier_slots(0.01, 32) == 1
    with pytest.raises(ValueError, match="outlier fraction"):
        outlier_slots(0.7, 10)


def test_key_outliers_are_exact_and_the_largest_out_of_range_values():
    x = _keys()
    q = _channel_quantizer(x, slots=2)
    qv = q.quantize(x)
    assert qv.codes.dtype == torch.uint8 and qv.codes.max() < 8
    normalized = ((x - q.zero[None, :, None]) / q.scale[None, :, None]).permute(0, 2, 1, 3).reshape(2, 17, -1)
    flat = x.permute(0, 2, 1, 3).reshape(2, 17, -1)
    for b in range(2):
        for t in range(17):
            out_of_range = (normalized[b, t].abs() > 1).nonzero().flatten()
            idx = qv.outlier_index[b, t]
            chosen = set(idx[idx >= 0].tolist())
            expected = set(normalized[b, t].abs().argsort(descending=True)[: min(2, len(out_of_range))].tolist())
            assert chosen == (expected if len(out_of_range) else set())
            for slot, c in enumerate(idx.tolist()):
                if c >= 0:
                    assert qv.outlier_values[b, t, slot] == flat[b, t, c].half()
    deq = q.dequantize(qv, torch.float32).permute(0, 2, 1, 3).reshape(2, 17, -1)
    is_out = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, qv.outlier_index.long().clamp(min=0), qv.outlier_index >= 0)
    assert torch.equal(deq[is_out], flat[is_out].half().float())
    # In-range values land within half a grid step (uniform 3-bit grid step is 2/7 of the scale).
    scale = q.scale.reshape(-1).expand_as(flat)
    in_range = (normalized.abs() <= 1) & ~is_out
    assert ((deq - flat).abs()[in_range] <= (1 / 7) * scale[in_range] + 1e-5).all()


def test_no_outliers_means_empty_slots_and_saturation():
    x = _keys()
    q = _channel_quantizer(x, slots=0, pct=0.9)
    qv = q.quantize(x)
    assert qv.outlier_index.shape[-1] == 0
    deq = q.dequantize(qv, torch.float32)
    lo = q.zero - q.scale
    hi = q.zero + q.scale
    assert (deq >= lo[None, :, None] - 1e-5).all() and (deq <= hi[None, :, None] + 1e-5).all()


def test_value_outliers_minimize_the_remaining_range():
    x = torch.randn(1, 2, 5, 16)
    x[0, 1, 0, 3] = -50.0  # one huge negative value: both slots can go there or split
    x[0, 0, 0, 7] = 9.0
    q = TokenQuantizer(uniform_codebook(4), slots=2)
    qv = q.quantize(x)
    flat = x.permute(0, 2, 1, 3).reshape(1, 5, 32)
    for t in range(5):
        chosen = set(qv.outlier_index[0, t].tolist())
        rest = torch.tensor([flat[0, t, c] for c in range(32) if c not in chosen])
        best = min(
            (flat[0, t].sort().values[32 - 1 - (2 - j)] - flat[0, t].sort().values[j]).item() for j in range(3)
        )
        assert abs((rest.max() - rest.min()).item() - best) < 1e-5
        assert len(chosen) == 2
    assert {16 + 3, 7} == set(qv.outlier_index[0, 0].tolist())
    deq = q.dequantize(qv, torch.float32)
    assert deq[0, 1, 0, 3] == -50.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_value_error_shrinks_with_bits_and_nuq_codebook_is_used(bits):
    x = torch.randn(2, 4, 33, 16)
    err = (fake_quantize(TokenQuantizer(uniform_codebook(bits), 2), x) - x).pow(2).mean()
    assert err < {2: 0.15, 3: 0.03, 4: 0.008}[bits]
    # A different (non-uniform) codebook changes the result: the codebook is really used.
    book = Codebook(torch.linspace(-1, 1, 2**bits) ** 3)
    assert not torch.equal(fake_quantize(TokenQuantizer(book, 2), x), fake_quantize(TokenQuantizer(uniform_codebook(bits), 2), x))


def test_bf16_inputs_keep_bf16_side_tensors():
    x = torch.randn(1, 2, 4, 8, dtype=torch.bfloat16)
    qv = TokenQuantizer(uniform_codebook(3), 1).quantize(x)
    assert qv.outlier_values.dtype == torch.bfloat16 and qv.scale.dtype == torch.bfloat16
    assert fake_quantize(TokenQuantizer(uniform_codebook(3), 1), x).dtype == torch.bfloat16
