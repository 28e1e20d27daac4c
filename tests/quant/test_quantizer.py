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


def _channel_quantizer(x, outliers, bits=3, pct=0.99):
    flat = x.permute(1, 3, 0, 2).reshape(x.shape[1], x.shape[3], -1)
    hi, lo = flat.quantile(pct, dim=-1), flat.quantile(1 - pct, dim=-1)
    return ChannelKeyQuantizer(uniform_codebook(bits), (hi + lo) / 2, (hi - lo) / 2, outliers)


def test_outlier_slots():
    assert outlier_slots(0.0, 192) == 0
    assert outlier_slots(0.01, 192) == 2
    assert outlier_slots(0.01, 4096) == 41
    assert outlier_slots(0.01, 32) == 1
    with pytest.raises(ValueError, match="outlier fraction"):
        outlier_slots(0.7, 10)


def test_every_out_of_range_key_is_kept_exactly_in_token_order():
    x = _keys()
    q = _channel_quantizer(x, outliers=True)
    qv = q.quantize(x)
    assert qv.codes.dtype == torch.uint8 and qv.codes.max() < 8
    normalized = ((x - q.zero[None, :, None]) / q.scale[None, :, None]).permute(0, 2, 1, 3).reshape(2, 17, -1)
    flat = x.permute(0, 2, 1, 3).reshape(2, 17, -1)
    outside = normalized.abs() > 1
    sp = qv.sparse
    assert torch.equal(sp.counts, outside.sum(-1).int())
    assert 0.01 < outside.float().mean() < 0.2  # some, not all, values are outliers here
    # Entries are sorted by (row, token, channel) and hold the exact 16-bit values.
    where = outside.nonzero()
    assert torch.equal(sp.channels.long(), where[:, 2])
    assert torch.equal(sp.values, flat[outside].half())
    deq = q.dequantize(qv, torch.float32).permute(0, 2, 1, 3).reshape(2, 17, -1)
    assert torch.equal(deq[outside], flat[outside].half().float())
    # In-range values land within half a grid step (uniform 3-bit grid step is 2/7 of the scale).
    scale = q.scale.reshape(-1).expand_as(flat)
    assert ((deq - flat).abs()[~outside] <= (1 / 7) * scale[~outside] + 1e-5).all()


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
