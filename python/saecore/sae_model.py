"""An SAE together with the model it reads: load the model an SAE was trained on and check the pair.

Shared by every verb that runs a model through an SAE (``steer``, ``attribute``, ``probe`` in
:mod:`saecore.interventions`, ``logit-lens`` in :mod:`saecore.logit_lens`); it sits below both so
neither has to import the other.
"""

from __future__ import annotations

from typing import Any

import torch

from . import hooks, models
from .sae import SAE


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters."""
    return next(model.parameters()).device


def check_compatible(model: torch.nn.Module, sae: Any) -> None:
    """Raise ValueError if the SAE's hook point does not exist in ``model`` or its width differs."""
    hook = sae.cfg.hook_name
    valid = hooks.valid_hook_names(model)
    if hook not in valid:
        shown = ", ".join([*valid[:4], "...", *valid[-2:]]) if len(valid) > 8 else ", ".join(valid)
        raise ValueError(
            f"SAE hook {hook!r} (SAE trained on model {getattr(sae.cfg, 'model_name', '?')!r}) is not a hook "
            f"point of model {models.name_of(model)!r}; valid hooks: {shown}"
        )
    d_model = int(model.config.hidden_size)
    d_in = int(sae.cfg.d_in)
    if d_in != d_model:
        raise ValueError(
            f"SAE hook {hook!r} expects d_in={d_in} but model {models.name_of(model)!r} has d_model={d_model} "
            f"(SAE trained on model {getattr(sae.cfg, 'model_name', '?')!r})"
        )


def load_model_for(sae: Any, model: str | None = None, device: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load the model an SAE was trained on (or ``model``), in eval mode, and check it matches the SAE."""
    name = model or getattr(sae.cfg, "model_name", None)
    if not name:
        raise ValueError("the SAE records no model_name; pass the model explicitly (--model)")
    lm, tokenizer = models.load(name, device=device)  # also takes the "NAME@CHECKSUM" a harvest records
    check_compatible(lm, sae)
    return lm, tokenizer


def load_sae_and_model(args: Any) -> tuple[torch.nn.Module, Any, SAE]:
    """(model, tokenizer, SAE on the model's device) from a verb's config: its ``sae`` folder, ``model``
    (None: the SAE's model_name) and ``device`` (None: CUDA when present)."""
    sae = SAE.load(args.sae).eval()
    model, tokenizer = load_model_for(sae, args.model, args.device)
    return model, tokenizer, sae.to(model_device(model))
