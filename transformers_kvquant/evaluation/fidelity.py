"""Long-context fidelity: how far the quantized model's next-token distributions drift from full precision.

Each document (real text, ``context`` tokens) is fed the way a user feeds a long prompt: chunk by chunk, every
chunk attending to the cache of everything before it. The full-precision reference is the default
``DynamicCache`` fed the same chunks; each KVQuant configuration runs through the real :class:`KVQuantCache`.
Baselines without a cache path (``int``, ``kivi``) run as simulations over the whole document (labelled as
such). Per position bucket (1K tokens by default): mean KL(fp || quantized) of the next-token distributions,
top-1 agreement with fp, and perplexity of the quantized model (and of fp, under the name ``fp``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..integration.cache import KVQuantCache
from ..integration.compat import cache_argument
from .simulation import SimulatedMethod, SimulationCache


@dataclass
class CacheMethod:
    """A configuration that runs through the real KVQuantCache."""

    name: str
    cache_config: dict
    avg_bits: float | None = None


@dataclass
class _Accumulator:
    bucket: int
    kl: dict = field(default_factory=dict)  # bucket -> [per-document sums]
    top1: dict = field(default_factory=dict)
    nll: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)

    def add(self, doc: int, first_position: int, kl: torch.Tensor, top1: torch.Tensor, nll: torch.Tensor) -> None:
        pos = torch.arange(first_position, first_position + kl.numel())
        for b in pos.div(self.bucket, rounding_mode="floor").unique().tolist():
            sel = (pos // self.bucket) == b
            key = (b, doc)
            self.kl[key] = self.kl.get(key, 0.0) + float(kl[sel].sum())
            self.top1[key] = self.top1.get(key, 0.0) + float(top1[sel].sum())
            self.nll[key] = self.nll.get(key, 0.0) + float(nll[sel].sum())
            self.count[key] = self.count.get(key, 0) + int(sel.sum())

    def buckets(self) -> list[dict]:
        out = []
        for b in sorted({k[0] for k in self.count}):
            docs = sorted(d for (bb, d) in self.count if bb == b)
            kl_docs = [self.kl[(b, d)] / self.count[(b, d)] for d in docs]
            n = sum(self.count[(b, d)] for d in docs)
            out.append(
                {
                    "start": b * self.bucket,
                    "end": (b + 1) * self.bucket,
                    "kl": sum(self.kl[(b, d)] for d in docs) / n,
                    "kl_doc_std": float(torch.tensor(kl_docs).std()) if len(docs) > 1 else 0.0,
                    "top1": sum(self.top1[(b, d)] for d in docs) / n,
                    "ppl": math.exp(sum(self.nll[(b, d)] for d in docs) / n),
                    "tokens": n,
                }
            )
        return out


def documents_from_text(tokenizer, text: str, context: int, count: int) -> torch.Tensor:
    """``count`` consecutive, non-overlapping documents of ``context`` tokens from ``text`` ``[count, context]``."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    available = ids.numel() // context
    if count > available:
        raise ValueError(f"--documents {count} needs {count * context} tokens but the text has {ids.numel()}; use --documents {available} or less")
    return ids[: count * context].view(count, context)


def _chunk_stats(ref_logp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    top1 = (ref_logp.argmax(-1) == logp.argmax(-1)).float()
    nll = -logp.gather(-1, targets[:, None]).squeeze(-1)
    return kl, top1, nll


@torch.no_grad()
def evaluate_fidelity(
    model,
    documents: torch.Tensor,
    methods: list,
    *,
    chunk: int = 512,
    bucket: int = 1024,
    progress: bool = True,
) -> dict:
    """Run every method on every document (``[N, context]`` token ids) and aggregate per position bucket.

    ``methods``: :class:`CacheMethod` (the real cache, fed chunk by chunk) or :class:`SimulatedMethod` (one
    simulated forward over the document).
    """
    from transformers import DynamicCache

    device = model.get_input_embeddings().weight.device
    base, head = model.get_decoder(), model.get_output_embeddings()
    acc = {"fp": _Accumulator(bucket)}
    for m in methods:
        acc[m.name] = _Accumulator(bucket)
    bits = {}
    start = time.time()
    n, context = documents.shape
    steps = tqdm(total=n * math.ceil(context / chunk), desc="fidelity", disable=not progress, unit="chunk")
    for d in range(n):
        ids = documents[d : d + 1].to(device)
        targets = ids[0, 1:]
        ref = DynamicCache(config=model.config)
        caches = {m.name: KVQuantCache(model, **m.cache_config) for m in methods if isinstance(m, CacheMethod)}
        sims = [m for m in methods if isinstance(m, SimulatedMethod)]
        sim_hidden = {m.name: base(input_ids=ids, use_cache=True, **cache_argument(base, SimulationCache(model, m))).last_hidden_state for m in sims}
        for a in range(0, context, chunk):
            piece = ids[:, a : a + chunk]
            last = min(a + chunk, context - 1)  # positions with a next token
            tgt = targets[a:last]
            width = last - a
            ref_logits = model(input_ids=piece, use_cache=True, **cache_argument(model, ref)).logits[0, :width]
            ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
            nll_ref = -ref_logp.gather(-1, tgt[:, None]).squeeze(-1)
            acc["fp"].add(d, a, torch.zeros_like(nll_ref), torch.ones_like(nll_ref), nll_ref)
            for name, cache in caches.items():
                logits = model(input_ids=piece, use_cache=True, **cache_argument(model, cache)).logits[0, :width]
                acc[name].add(d, a, *_chunk_stats(ref_logp, logits, tgt))
            for m in sims:
                logits = head(sim_hidden[m.name][0, a:last])
                acc[m.name].add(d, a, *_chunk_stats(ref_logp, logits, tgt))
            steps.update(1)
        for name, cache in caches.items():
            bits[name] = cache.memory_report().avg_bits
    steps.close()
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    result = {"context": context, "chunk": chunk, "documents": n, "seconds": round(time.time() - start, 1), "methods": {}}
    for name, a in acc.items():
        m = next((x for x in methods if x.name == name), None)
        if name == "fp":
            avg = 16.0
        elif isinstance(m, SimulatedMethod):
            avg = m.avg_bits(text.num_key_value_heads, head_dim, context)
        else:
            avg = bits[name]
        result["methods"][name] = {"avg_bits": avg, "simulated": isinstance(m, SimulatedMethod), "buckets": a.buckets()}
    return result


def default_methods(model, *, bits=(4, 3, 2), include_baselines=True) -> list:
    """KVQuant 4/3/2 with and without 1% outliers (real cache), 2-bit window/sink variants, int/kivi (simulated)."""
    from .simulation import IntMethod, KiviMethod

    methods = []
    for b in bits:
        for frac in (0.0, 0.01):
            name = f"nuq{b}" + ("-1%" if frac else "")
            methods.append(CacheMethod(name, {"bits": b, "outlier_fraction": frac}))
    if 2 in bits:
        methods.append(CacheMethod("nuq2-1% +window128", {"bits": 2, "outlier_fraction": 0.01, "recent_window": 128}))
        methods.append(CacheMethod("nuq2-1% no-sink", {"bits": 2, "outlier_fraction": 0.01, "sink_tokens": 0}))
    if include_baselines:
        methods += [IntMethod(4), IntMethod(3), KiviMethod(4), KiviMethod(2)]
        for m in methods[-4:]:
            m.name += " (simulated)"
    return methods
