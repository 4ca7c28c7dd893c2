"""SAELens interop: the checkpoint layout both libraries read.

A checkpoint is a folder with ``cfg.json`` and ``sae_weights.safetensors`` (SAELens ≥ 6 layout):

* tensors ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``, plus
  ``threshold [d_sae]`` for ``jumprelu`` (saecore's batchtopk and matryoshka are saved as a jumprelu whose
  thresholds all equal the learned global one, exactly as SAELens saves its BatchTopK and
  MatryoshkaBatchTopK: SAELens has ``matryoshka_batchtopk`` only as a training architecture, whose
  inference form is ``jumprelu``; the nested groups live on in ``metadata.saecore``, so saecore reloads
  its own checkpoint as matryoshka, and a SAELens-trained one — saved as jumprelu — as jumprelu);
* ``cfg.json``: ``architecture`` (``standard`` | ``topk`` | ``jumprelu``), ``d_in``, ``d_sae``, ``k``
  (topk), ``apply_b_dec_to_input = false`` (Anthropic's encoder does not subtract b_dec),
  ``normalize_activations = "none"`` (saecore folds its input scale into the weights on save),
  ``dtype``, ``device``, and ``metadata`` (``model_name``, ``hook_name``, ``sae_lens_version`` …, and
  ``metadata.saecore``: saecore's own :class:`~saecore.sae.SAEConfig` plus training facts).

Loading a foreign SAELens checkpoint folds its options into saecore's form, exactly (same latents):
``apply_b_dec_to_input`` → b_enc −= b_decᵀW_enc; topk ``rescale_acts_by_decoder_norm`` → decoder norms
folded into the encoder; pre-6.0 key names (``hook_point``, ``activation_fn_str`` …) are read too.
Options that change the function in a way saecore does not model (runtime layer norm, whitening,
gated SAEs …) are refused with a message naming them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .sae import SAE

_TO_SAELENS = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
               "matryoshka": "jumprelu"}
# Architectures saved with a per-latent ``threshold`` tensor.
_WITH_THRESHOLD = ("jumprelu", "batchtopk", "matryoshka")
# SAELens' batchtopk / matryoshka_batchtopk appear only in training checkpoints (cfg.json of a training
# SAE, a scalar ``topk_threshold`` buffer); their saved inference form is jumprelu.
_FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk",
                 "matryoshka_batchtopk": "matryoshka"}
_SAELENS_TOPK_FAMILY = ("topk", "batchtopk", "matryoshka_batchtopk")
# normalize_activations values that are the identity on a saved (inference) SAE.
_IDENTITY_NORMALISATION = (None, False, "none", "expected_average_only_in")


def saelens_config(sae: SAE, extra_metadata: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, cfg.json dict) of an SAE whose input scale is already folded (input_scale = 1)."""
    from .sae import SAELENS_FORMAT_VERSION

    cfg = sae.cfg
    if cfg.input_scale != 1.0:
        raise ValueError("saelens_config needs a folded SAE (input_scale = 1); call SAE.folded() first")
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if cfg.architecture in _WITH_THRESHOLD:
        tensors["threshold"] = sae.threshold
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            "hook_head_index": None,
            "prepend_bos": True,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "saecore": {"config": cfg.to_dict(), **extra_metadata},
        },
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.architecture == "matryoshka":
        # Not read by SAELens' jumprelu; recorded so the nesting is visible without saecore's metadata.
        out["metadata"]["matryoshka_widths"] = _groups_to_widths(cfg.matryoshka_groups)
    return {k: v.detach().float() for k, v in tensors.items()}, out


def _read_cfg(directory: Path) -> dict[str, Any]:
    from .sae import CFG_FILENAME

    path = directory / CFG_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SAE config here (expected cfg.json + sae_weights.safetensors)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .errors import CorruptDataError
    from .sae import WEIGHTS_FILENAME

    path = directory / WEIGHTS_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SAE weights here")
    try:
        return {k: v.float() for k, v in load_file(str(path)).items()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptDataError(f"{path}: unreadable safetensors file ({e}); truncated or corrupt") from e


def _foreign_config(data: dict[str, Any], directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """saecore SAEConfig fields from a SAELens cfg.json (6.x or older), plus the options to fold."""
    meta = dict(data.get("metadata") or {})
    arch = data.get("architecture")
    if arch is None:  # pre-6.0: the activation function names the architecture
        arch = "topk" if data.get("activation_fn_str", data.get("activation_fn")) == "topk" else "standard"
    if arch not in _FROM_SAELENS:
        raise ValueError(f"{directory}: SAELens architecture {arch!r} is not supported; saecore reads {sorted(_FROM_SAELENS)}")
    norm = data.get("normalize_activations")
    if norm not in _IDENTITY_NORMALISATION:
        raise ValueError(f"{directory}: normalize_activations={norm!r} changes the SAE at run time; saecore reads only 'none'")
    if data.get("reshape_activations", "none") != "none" or data.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise ValueError(f"{directory}: per-head (hook_z) SAEs are not supported")
    k = data.get("k") or (data.get("activation_fn_kwargs") or {}).get("k") or 32
    if float(k) != int(k):
        raise ValueError(f"{directory}: k={k} is not a whole number; saecore's (batch)topk needs an integer k")
    fields = {
        "architecture": _FROM_SAELENS[arch],
        "d_in": int(data["d_in"]),
        "d_sae": int(data["d_sae"]),
        "k": int(k),
        "hook_name": meta.get("hook_name") or data.get("hook_name") or data.get("hook_point") or "",
        "model_name": meta.get("model_name") or data.get("model_name") or "",
    }
    if arch == "matryoshka_batchtopk":
        fields["matryoshka_groups"] = _groups_from_widths(data.get("matryoshka_widths") or [], int(data["d_sae"]))
    fold = {
        "apply_b_dec_to_input": bool(data.get("apply_b_dec_to_input", True)),
        "rescale_acts_by_decoder_norm": arch in _SAELENS_TOPK_FAMILY
        and bool(data.get("rescale_acts_by_decoder_norm", False)),
    }
    return fields, fold


def _groups_from_widths(widths: list[int], d_sae: int) -> list[int]:
    """SAELens' ``matryoshka_widths`` (prefix widths; it appends d_sae when missing) → group sizes."""
    widths = [int(w) for w in widths]
    if not widths or widths[-1] != d_sae:
        widths.append(d_sae)
    return [b - a for a, b in zip([0, *widths[:-1]], widths)]


def _groups_to_widths(groups: list[int]) -> list[int]:
    """saecore group sizes → SAELens ``matryoshka_widths`` (cumulative)."""
    out, total = [], 0
    for g in groups:
        total += g
        out.append(total)
    return out


def load_checkpoint(directory: Path, device: str | torch.device | None = None) -> SAE:
    """Load a checkpoint written by saecore or SAELens (see the module docstring)."""
    from .sae import SAE, SAEConfig

    data = _read_cfg(directory)
    weights = _read_weights(directory)
    own = ((data.get("metadata") or {}).get("saecore") or {}).get("config")
    if own is not None:
        cfg, fold = SAEConfig.from_dict(own), {"apply_b_dec_to_input": bool(data.get("apply_b_dec_to_input", False))}
        fold["rescale_acts_by_decoder_norm"] = bool(data.get("rescale_acts_by_decoder_norm", False))
    else:
        fields, fold = _foreign_config(data, directory)
        cfg = SAEConfig(**fields)
    if "threshold" not in weights and "topk_threshold" in weights:  # a SAELens (Matryoshka)BatchTopK training SAE
        weights["threshold"] = weights.pop("topk_threshold").reshape(()).expand(cfg.d_sae).clone()
    _check_shapes(weights, cfg, directory)
    sae = SAE(cfg, seed=None)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(weights[name])
        if cfg.architecture in _WITH_THRESHOLD:
            sae.threshold.copy_(weights["threshold"])
        if fold["rescale_acts_by_decoder_norm"]:
            norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
            sae.W_dec.div_(norms[:, None])
            sae.W_enc.mul_(norms[None, :])
            sae.b_enc.mul_(norms)
        if fold["apply_b_dec_to_input"]:
            # (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc): same latents, no subtraction.
            sae.b_enc.sub_(sae.b_dec @ sae.W_enc)
    sae.eval()
    return sae.to(device) if device is not None else sae


def _check_shapes(weights: dict[str, torch.Tensor], cfg: Any, directory: Path) -> None:
    expected = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_in),
        "b_dec": (cfg.d_in,),
    }
    if cfg.architecture in _WITH_THRESHOLD:
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"{directory}: sae_weights.safetensors has no tensor {name!r} (has {sorted(weights)})")
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{directory}: tensor {name} has shape {tuple(weights[name].shape)}, cfg.json implies {shape}"
            )
