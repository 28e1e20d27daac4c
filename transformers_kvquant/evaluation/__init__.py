"""Evaluation harnesses: perplexity with simulated quantization, and long-context fidelity through the cache."""
