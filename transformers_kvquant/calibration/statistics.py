"""The expensive pass of calibration: activations and Fisher information of a model's keys and values.

One forward and backward pass per calibration window records every layer's ``k_proj`` and ``v_proj`` outputs
(pre-RoPE keys and values) and the gradients of the loss with respect to them; their squares are the diagonal
Fisher information, the sensitivity of the loss to an error in each element. The result
(:class:`CalibrationStatistics`) serves every bit width and outlier fraction (:mod:`.fit`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .fingerprint import ModelFingerprint
from .support import check_supported, find_rotary


@dataclass
class CalibrationStatistics:
    """Per-layer activations and loss gradients of the calibration windows (float32, on ``device``)."""

    keys: list[torch.Tensor]  # [N, L, kv_heads * head_dim] pre-RoPE k_proj outputs
    key_grads: list[torch.Tensor]
    values: list[torch.Tensor]  # [N, L, kv_heads * head_dim]
    value_grads: list[torch.Tensor]
    cos: torch.Tensor  # [L, head_dim] RoPE of positions 0..L-1 (for the post-RoPE ablation)
    sin: torch.Tensor
    attention_scaling: float
    fingerprint: ModelFingerprint
    metadata: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return len(self.keys)


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from ``text`` (deterministic given ``seed``)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() <= seqlen:
        raise ValueError(
            f"the calibration text has {ids.numel()} tokens, fewer than one window of {seqlen}; use a longer "
            "--dataset or a smaller --seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def collect_statistics(model, samples: torch.Tensor, *, progress: bool = True, device="cpu") -> CalibrationStatistics:
    """Run each window forward and backward, recording k/v projections and the loss gradients w.r.t. them."""
    check_supported(model)
    if samples.ndim != 2:
        raise ValueError(f"samples must be token ids of shape [N, L], got {tuple(samples.shape)}")
    names = [n for n, _ in model.named_modules() if n.endswith("k_proj")]
    vnames = [n for n, _ in model.named_modules() if n.endswith("v_proj")]
    modules = dict(model.named_modules())
    n, seqlen = samples.shape
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(mod, inputs, output):
            output.retain_grad()
            captured[name] = output

        return hook

    def needs_grad(mod, inputs, output):
        # Gradients flow to activations only: weights stay frozen, which halves the backward's cost.
        return output.requires_grad_(True)

    grad_flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [modules[nm].register_forward_hook(keep(nm)) for nm in names + vnames]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    out = {nm: [] for nm in names + vnames}
    grads = {nm: [] for nm in names + vnames}
    start = time.time()
    was_training = model.training
    model.eval()
    try:
        first_device = model.get_input_embeddings().weight.device
        for i in tqdm(range(n), desc="Fisher information", disable=not progress, unit="window"):
            ids = samples[i : i + 1].to(first_device)
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            for nm in names + vnames:
                t = captured[nm]
                out[nm].append(t.detach()[0].to(device, torch.float32))
                grads[nm].append(t.grad.detach()[0].to(device, torch.float32))
            captured.clear()
    finally:
        for h in handles:
            h.remove()
        for p, flag in grad_flags.items():
            p.requires_grad_(flag)
        model.train(was_training)

    rotary = find_rotary(model)
    positions = torch.arange(seqlen).unsqueeze(0)
    probe = torch.zeros(1, dtype=torch.float32, device=next(rotary.buffers()).device if list(rotary.buffers()) else "cpu")
    cos, sin = rotary(probe, positions.to(probe.device))
    return CalibrationStatistics(
        keys=[torch.stack(out[nm]) for nm in names],
        key_grads=[torch.stack(grads[nm]) for nm in names],
        values=[torch.stack(out[nm]) for nm in vnames],
        value_grads=[torch.stack(grads[nm]) for nm in vnames],
        cos=cos[0].float().to(device),
        sin=sin[0].float().to(device),
        attention_scaling=float(getattr(rotary, "attention_scaling", 1.0) or 1.0),
        fingerprint=ModelFingerprint.from_model(model),
        metadata={"num_samples": n, "seqlen": seqlen, "statistics_s": round(time.time() - start, 1)},
    )
