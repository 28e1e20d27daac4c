"""`make demo`'s main job, small: SmolLM2 with its shipped 3-bit config, through generate and a perplexity window."""

from __future__ import annotations

import math
import warnings

from transformers_kvquant import demo


def test_demo_runs_on_the_embedded_model(capsys):
    with warnings.catch_warnings():
        # No deprecated transformers names in the package's own calls (5.24 renamed past_key_values to cache).
        warnings.simplefilter("error", FutureWarning)
        result = demo.run("smollm2", bits=3, windows=1, seqlen=256, max_new_tokens=8)
    printed = capsys.readouterr().out
    assert 'generate(..., cache_implementation="kvquant")' in printed and "nuq3-1%" in printed
    assert result["answer"].strip()
    assert 0 < result["cache_bytes"] < 0.5 * result["fp16_bytes"]
    assert math.isfinite(result["ppl_kvquant"]) and 1 < result["ppl_fp"] < result["ppl_kvquant"] < 2 * result["ppl_fp"]
