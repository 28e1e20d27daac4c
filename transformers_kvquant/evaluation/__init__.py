"""Evaluation harnesses: perplexity with simulated quantization, long-context fidelity through the cache, passkey
retrieval, and the texts they read (:mod:`.datasets`)."""
