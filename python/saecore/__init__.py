"""saecore: sparse-autoencoder dictionary learning on transformer activations, end to end.

Stages (each a module and a CLI verb): ``harvest`` activations of a Hugging Face causal LM into a Zarr
store, ``train`` SAEs on them, ``encode`` the store into sparse features, ``index`` those features
(statistics, top-k, quantile samples), ``neighbours`` of decoder directions, interventions
(``steer``, ``attribute``), and feature ``pages``.
"""

from __future__ import annotations

from ._native import __version__
from .activations import ActivationStore
from .errors import CorruptDataError, SaecoreError, StoreError, StoreMismatchError

__all__ = [
    "ActivationStore",
    "CorruptDataError",
    "SaecoreError",
    "StoreError",
    "StoreMismatchError",
    "__version__",
]


def __getattr__(name: str):  # lazy attributes keep `import saecore` light (no torch)
    lazy = {
        "harvest": ("saecore.harvesting", "harvest"),
        "train": ("saecore.training", "train"),
        "train_on_the_fly": ("saecore.onthefly", "train_on_the_fly"),
        "FeatureIndex": ("saecore.index", "FeatureIndex"),
        "SAE": ("saecore.sae", "SAE"),
        "SAEConfig": ("saecore.sae", "SAEConfig"),
        "TrainConfig": ("saecore.training", "TrainConfig"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'saecore' has no attribute {name!r}")
