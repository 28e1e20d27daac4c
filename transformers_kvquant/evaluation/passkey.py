"""Passkey retrieval: a 5-digit key hidden at a random depth in filler text, asked for at the end.

A sanity check of retrieval through the quantized cache at lengths where the full-precision model succeeds
(SmolLM2-135M-Instruct retrieves reliably only up to about 1K tokens, so longer contexts say little here).
"""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm

INTRO = "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it.\n\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """Token ids of a prompt of about ``length`` tokens with the key at relative ``depth`` of the filler."""
    fixed = len(tokenizer(INTRO + NEEDLE.format(key=key) + QUESTION, add_special_tokens=False)["input_ids"])
    per_filler = len(tokenizer(FILLER * 10, add_special_tokens=False)["input_ids"]) / 10
    repeats = max(1, int((length - fixed) / per_filler))
    before = int(repeats * depth)
    text = INTRO + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@torch.no_grad()
def evaluate_passkey(model, tokenizer, methods: dict, lengths=(256, 512, 768, 1024), samples: int = 10, seed: int = 0, progress: bool = True) -> dict:
    """Accuracy per method and length. ``methods``: name -> ``cache_config`` dict (None: the default cache)."""
    rng = random.Random(seed)
    device = model.get_input_embeddings().weight.device
    cases = [(n, rng.random(), rng.randint(10000, 99999)) for n in lengths for _ in range(samples)]
    results = {name: {n: 0 for n in lengths} for name in methods}
    bar = tqdm(total=len(cases) * len(methods), desc="passkey", disable=not progress)
    for n, depth, key in cases:
        ids = passkey_prompt(tokenizer, n, depth, key).to(device)
        for name, cache_config in methods.items():
            kwargs = {} if cache_config is None else {"cache_implementation": "kvquant", "cache_config": dict(cache_config)}
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, **kwargs)
            answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            results[name][n] += int(str(key) in answer)
            bar.update(1)
    bar.close()
    return {name: {str(n): hits / samples for n, hits in acc.items()} for name, acc in results.items()}
