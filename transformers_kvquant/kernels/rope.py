"""Rotary position embeddings (RoPE), written once for the whole package.

KVQuant stores keys *before* RoPE and rotates them at attention time, so RoPE is needed in several places: the
attention integration (queries and the returned keys, with the model's own ``(cos, sin)``), calibration (the
post-RoPE ablation) and the kernels' PyTorch references (keys at their stored integer positions). They all use
these functions. The Triton kernels rotate inside the kernel and are tested against :func:`rope_at`.

Conventions are transformers' LLaMA/Mistral ones (rotate-half): ``x * cos + rotate_half(x) * sin`` with
``cos = cat(cos(p * inv_freq), cos(p * inv_freq)) * attention_scaling`` (likewise ``sin``).
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split at the middle of the last dim."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` ``[B, H, T, D]`` with ``cos, sin: [B or 1, T, D]`` broadcast over heads.

    The same operations, in the same order, as transformers' LLaMA/Mistral ``apply_rotary_pos_emb``, so results
    are bit-identical to the model's own.
    """
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def rope_inv_freq(head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """LLaMA's default RoPE inverse frequencies ``[D/2]`` (fp32), as transformers computes them."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos, sin`` ``[B, N, D]`` at integer ``positions`` ``[B, N]`` (angle = fp32(position * inv_freq))."""
    angle = positions.float().unsqueeze(-1) * inv_freq.float().to(positions.device)  # [B, N, D/2]
    cos = torch.cat([angle.cos(), angle.cos()], -1) * attention_scaling
    sin = torch.cat([angle.sin(), angle.sin()], -1) * attention_scaling
    return cos, sin


def rope_at(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float = 1.0) -> torch.Tensor:
    """fp32 RoPE of ``x`` ``[B, H, N, D]`` at ``positions`` ``[B, N]``: what the kernels compute for stored keys."""
    cos, sin = rope_cos_sin(positions.to(x.device), inv_freq, attention_scaling)
    return apply_rope(x.float(), cos, sin)
