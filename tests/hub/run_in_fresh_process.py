"""Run steps in a fresh interpreter, so environment variables that huggingface_hub reads at import time
(HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_CACHE, HF_HUB_DISABLE_XET) take effect exactly as they do for a user.

    python tests/hub/run_in_fresh_process.py STEPS_JSON

STEPS_JSON is a list of steps; each is ``{"cli": [...]}`` (runs ``kvquant ...`` through ``cli.main``) or
``{"load": REPO, "save_to": DIR}`` (``KVQuantConfig.from_pretrained`` then ``save_pretrained``), or
``{"generate": MODEL_ID, "prompt_ids": [...]}`` (load the model from the Hub cache and generate with
``cache_implementation="kvquant"`` and no config named). Prints one JSON line: the outcome of every step.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys


def main() -> None:
    steps = json.loads(sys.argv[1])
    from huggingface_hub import is_offline_mode

    from transformers_kvquant import KVQuantConfig, KVQuantConfigError
    from transformers_kvquant.cli import main as cli_main

    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("transformers_kvquant").addHandler(handler)
    logging.getLogger("transformers_kvquant").setLevel(logging.INFO)
    results = {"offline": is_offline_mode(), "steps": []}
    for step in steps:
        out, err = io.StringIO(), io.StringIO()
        outcome = {}
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                if "cli" in step:
                    outcome["rc"] = cli_main(step["cli"])
                elif "load" in step:
                    config = KVQuantConfig.from_pretrained(step["load"])
                    config.save_pretrained(step["save_to"])
                    outcome["loaded"] = config.name
                elif "generate" in step:
                    import torch
                    from transformers import AutoModelForCausalLM

                    model = AutoModelForCausalLM.from_pretrained(step["generate"]).eval()
                    ids = torch.tensor([step["prompt_ids"]])
                    tokens = model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="kvquant")
                    outcome["tokens"] = tokens[0].tolist()
            except KVQuantConfigError as e:
                outcome["error"] = {"type": type(e).__name__, "message": str(e), "field": e.field, "remedy": e.remedy}
        outcome["stdout"], outcome["stderr"] = out.getvalue(), err.getvalue()
        results["steps"].append(outcome)
    results["log"] = log.getvalue()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
