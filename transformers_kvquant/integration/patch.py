"""``patch_model``: the checked way to install the KVQuant attention hooks on a model."""

from __future__ import annotations

from ..calibration.support import check_supported
from .attention import install_hooks, is_patched
from .compat import check_hook_contract


def patch_model(model) -> None:
    """Install the KVQuant attention hooks on a LLaMA/Mistral model (idempotent).

    Checks first that the architecture is supported and that this transformers still hands the hook what it needs
    (:func:`~transformers_kvquant.integration.compat.check_hook_contract`). Other caches (the default
    ``DynamicCache``, ``StaticCache``, ...) are unaffected: with them the hook returns at once and
    ``kvquant_<inner>`` delegates to ``<inner>`` unchanged.
    """
    if not is_patched(model):
        check_supported(model)
        check_hook_contract(model)
    install_hooks(model)
