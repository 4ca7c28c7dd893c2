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

import os
from pathlib import Path
from typing import Any

import torch

from ._atomic import read_json_object
from ._digest import file_sha256, json_sha256
from .errors import CorruptDataError, MissingDataError
from .run import CFG_FILE, WEIGHTS_FILE

# SAELens treats configs without a version as pre-6.0 and rewrites them; we write its 6.x layout.
SAELENS_FORMAT_VERSION = "6.0.0"
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
WEIGHTS_SHA256_KEY = "weights_sha256"
CFG_SHA256_KEY = "cfg_sha256"
"""``metadata.saecore`` key: sha256 of the rest of ``cfg.json`` in canonical form (:func:`seal_cfg`)."""
"""Key under cfg.json's ``metadata.saecore``: sha256 of sae_weights.safetensors, checked on load."""


def saelens_config(sae: Any, extra_metadata: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, cfg.json dict) of a :class:`saecore.sae.SAE` whose input scale is already folded."""
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


def seal_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (saecore's metadata in it) with the digest :func:`read_cfg` checks."""
    meta = cfg["metadata"]["saecore"]
    meta.pop(CFG_SHA256_KEY, None)
    meta[CFG_SHA256_KEY] = json_sha256(cfg)
    return cfg


def read_cfg(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """An SAE folder's ``cfg.json``; CorruptDataError naming it when saecore sealed it and it changed since.

    A foreign (SAELens) config, or one an older saecore wrote, has no seal and is read as it is.
    """
    path = Path(directory) / CFG_FILE
    if not path.exists():
        raise MissingDataError(f"{path}: no SAE config here (expected cfg.json + sae_weights.safetensors)")
    data = read_json_object(path)
    meta = (data.get("metadata") or {}).get("saecore")
    if isinstance(meta, dict) and CFG_SHA256_KEY in meta:
        want = meta.pop(CFG_SHA256_KEY)
        if json_sha256(data) != want:
            raise CorruptDataError(f"{path}: sha256 does not match its content; the SAE config is corrupt or was edited")
        meta[CFG_SHA256_KEY] = want
    return data


def _read_weights(directory: Path, sha256: str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``sae_weights.safetensors``, checked against ``sha256`` when the cfg recorded one
    (saecore's checkpoints do; a foreign SAELens checkpoint has none and is read unchecked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    if not path.exists():
        raise MissingDataError(f"{path}: no SAE weights here")
    if sha256 is not None and file_sha256(path) != sha256:
        raise CorruptDataError(f"{path}: sha256 differs from the one {CFG_FILE} recorded at save; the weights "
                               "are corrupt or were replaced")
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


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(saecore SAEConfig fields, tensors in saecore's form) of a checkpoint written by saecore or SAELens.

    The SAELens options are folded into the tensors here (see the module docstring), so
    :meth:`saecore.sae.SAE.load` only builds the module and copies them in.
    """
    data = read_cfg(directory)
    saecore_meta = (data.get("metadata") or {}).get("saecore") or {}
    weights = _read_weights(directory, saecore_meta.get(WEIGHTS_SHA256_KEY))
    own = saecore_meta.get("config")
    if own is not None:
        fields, fold = dict(own), {"apply_b_dec_to_input": bool(data.get("apply_b_dec_to_input", False))}
        fold["rescale_acts_by_decoder_norm"] = bool(data.get("rescale_acts_by_decoder_norm", False))
    else:
        fields, fold = _foreign_config(data, directory)
    if "threshold" not in weights and "topk_threshold" in weights:  # a SAELens (Matryoshka)BatchTopK training SAE
        weights["threshold"] = weights.pop("topk_threshold").reshape(()).expand(int(fields["d_sae"])).clone()
    _check_shapes(weights, fields, directory)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["threshold"] if fields["architecture"] in _WITH_THRESHOLD else [])
    tensors = {name: weights[name] for name in names}
    with torch.no_grad():
        if fold["rescale_acts_by_decoder_norm"]:
            norms = tensors["W_dec"].norm(dim=1).clamp_min(1e-8)
            tensors["W_dec"] = tensors["W_dec"] / norms[:, None]
            tensors["W_enc"] = tensors["W_enc"] * norms[None, :]
            tensors["b_enc"] = tensors["b_enc"] * norms
        if fold["apply_b_dec_to_input"]:
            # (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc): same latents, no subtraction.
            tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"] @ tensors["W_enc"]
    return fields, tensors


def _check_shapes(weights: dict[str, torch.Tensor], fields: dict[str, Any], directory: Path) -> None:
    d_in, d_sae = int(fields["d_in"]), int(fields["d_sae"])
    expected = {
        "W_enc": (d_in, d_sae),
        "b_enc": (d_sae,),
        "W_dec": (d_sae, d_in),
        "b_dec": (d_in,),
    }
    if fields["architecture"] in _WITH_THRESHOLD:
        expected["threshold"] = (d_sae,)
    for name, shape in expected.items():
        if name not in weights:
            raise ValueError(f"{directory}: sae_weights.safetensors has no tensor {name!r} (has {sorted(weights)})")
        if tuple(weights[name].shape) != shape:
            raise ValueError(
                f"{directory}: tensor {name} has shape {tuple(weights[name].shape)}, cfg.json implies {shape}"
            )
