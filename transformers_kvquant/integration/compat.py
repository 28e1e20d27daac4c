"""What differs between the transformers versions this package runs on, and the probe that checks the hook.

transformers 5.17-5.23 pass the cache to the attention module as ``past_key_values=``; 5.24 renamed it ``cache=``
(the old name goes through a deprecation wrapper until 5.40). The attention hook finds the cache by what it is,
not by its name; :func:`cache_argument` names it for calls this package makes itself.

Instead of trusting a version number, :func:`check_hook_contract` runs, once per model class and attention
implementation, a few tokens through a tiny random model of the same class, once stock and once through the
KVQuant hook with an exact recording cache, and checks what the hook relies on: the hook sees the cache and the
position embeddings, the cache receives the keys as ``k_proj`` made them (before RoPE), the KVQuant attention
function receives the real ``(cos, sin)``, and the outputs equal the stock model's bit for bit. If not, it raises
:class:`IncompatibleTransformersError` naming both versions and what changed: never post-RoPE keys in a cache.
"""

from __future__ import annotations

import inspect

import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer

from .._version import __version__
from .attention import install_hooks, unpatch_model
from .prerope import PreRopeCache, PreRopeLayer


class IncompatibleTransformersError(RuntimeError):
    """The installed transformers changed an internal that the KVQuant integration relies on."""


def versions() -> str:
    return f"transformers {transformers.__version__} with transformers-kvquant {__version__}"


def cache_argument(model, cache) -> dict:
    """``{"cache": cache}`` where the model's forward takes ``cache`` (5.24+), else ``{"past_key_values": cache}``."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def returned_cache(output):
    """The cache a forward or ``generate(return_dict_in_generate=True)`` returned (``.cache`` since 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# --------------------------------------------------------------------------------------------- the probe
_CHECKED: dict = {}
PROBE_POSITIONS = ([[0, 3, 4]], [[7]])  # a prefill with a gap (as left padding makes), then one decode step


def check_hook_contract(model) -> None:
    """Raise :class:`IncompatibleTransformersError` unless the KVQuant hook works for this model's class (cached)."""
    inner = (model.config._attn_implementation or "eager").removeprefix("kvquant_")
    key = (type(model), type(model.config), inner)
    if key not in _CHECKED:
        _CHECKED[key] = _probe(type(model), model.config, inner)
    if _CHECKED[key]:
        raise IncompatibleTransformersError(
            f"{versions()}: the KVQuant attention hook does not work with {type(model).__name__}: {_CHECKED[key]}. "
            "The cache would store post-RoPE keys, so it is refused; use a transformers version this package "
            "supports (see the README) or a newer transformers-kvquant."
        )


def _tiny_config(config, inner: str):
    """The model's config class at a tiny size (1 layer, 2 query heads sharing 1 KV head of 8 channels)."""
    tiny = type(config)(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, vocab_size=32, max_position_embeddings=64)
    tiny._attn_implementation = inner
    return tiny


def _probe(model_class, config, inner: str) -> str:
    """'' if the hook contract holds for ``model_class``, else what broke."""
    torch_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        with torch.device("cpu"):
            probe = model_class(_tiny_config(config, inner)).float().eval()
    except Exception as e:  # noqa: BLE001 - any failure to build the probe is reported, not hidden
        return f"a tiny {model_class.__name__} could not be built for the check ({type(e).__name__}: {e})"
    finally:
        torch.random.set_rng_state(torch_state)
    ids = torch.tensor([[3, 5, 7]]), torch.tensor([[11]])

    def run(cache):
        outs = []
        for step, pos in zip(ids, PROBE_POSITIONS):
            out = probe(input_ids=step, position_ids=torch.tensor(pos), use_cache=True, **cache_argument(probe, cache))
            outs.append(out[0])
        return outs

    with torch.no_grad():
        expected = run(DynamicCache())
        projected = []
        attention = [m for m in probe.modules() if hasattr(m, "k_proj")][0]
        watch = attention.k_proj.register_forward_hook(lambda m, a, out: projected.append(out.detach().clone()))
        install_hooks(probe)
        recorder = _RecordingCache()
        try:
            actual = run(recorder)
        except Exception as e:  # noqa: BLE001 - reported with the versions
            return f"a forward through the hook failed ({type(e).__name__}: {e})"
        finally:
            watch.remove()
            unpatch_model(probe)
    layer = recorder.layers[0]
    if layer.staged != len(PROBE_POSITIONS):
        return "the attention module did not receive the cache in its arguments (the hook never saw it)"
    if layer.attended != len(PROBE_POSITIONS):
        return "the KVQuant attention function was not called with the hook's context"
    _, heads, _, head_dim = layer.keys.shape
    pre_rope = torch.cat([p.view(1, -1, heads, head_dim).transpose(1, 2) for p in projected], dim=-2)
    if not torch.equal(layer.keys, pre_rope):
        return "the cache did not receive the keys as k_proj made them (RoPE is no longer neutralised by the hook)"
    if any(not torch.equal(a, b) for a, b in zip(actual, expected)):
        return "the outputs through the hook differ from the stock model's"
    return ""


class _RecordingLayer(PreRopeLayer, DynamicLayer):
    """An exact layer that stores pre-RoPE keys with their positions and attends like KVQuantLayer at bits=16."""

    _layer_type = None  # never register in transformers' global layer mappings

    def __init__(self):
        super().__init__()
        self.staged = self.attended = 0
        self.positions = None

    def stage(self, position_ids, query_length):
        self.staged += 1
        super().stage(position_ids, query_length)

    def update(self, key_states, value_states, *args, **kwargs):
        if self._staged is None:  # the hook did not run: record the default positions, so the probe can say so
            super().stage(None, key_states.shape[-2])
        pos = self.take_staged_positions(key_states.shape[-2])
        self.positions = pos if self.positions is None else torch.cat([self.positions, pos], dim=-1)
        return super().update(key_states, value_states)

    def returned_positions(self):
        return self.positions

    def attend(self, module, query, key, value, attention_mask, ctx, inner, **kwargs):
        self.attended += 1
        return super().attend(module, query, key, value, attention_mask, ctx, inner, **kwargs)


class _RecordingCache(PreRopeCache):
    def __init__(self):
        super().__init__(layers=[_RecordingLayer()])
