"""SAELens reads saecore checkpoints and saecore reads SAELens checkpoints; encodings agree both ways.

sae-lens is in the ``test`` extra (it installs without replacing torch, transformers or numpy).
"""

from __future__ import annotations

import json

import pytest
import sae_lens
import torch
from saecore.sae import SAE, SAEConfig


def _saecore_sae(arch: str) -> SAE:
    sae = SAE(SAEConfig(arch, d_in=12, d_sae=40, k=5, input_scale=2.5, hook_name="blocks.3.hook_resid_post",
                        model_name="tiny"), seed=4)
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        sae.b_enc.copy_(0.2 * torch.randn(40, generator=g))
        sae.b_dec.copy_(0.3 * torch.randn(12, generator=g))
        if arch == "jumprelu":
            sae.threshold.copy_(torch.rand(40, generator=g) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_saelens_loads_saecore_checkpoints_with_equal_encodings(tmp_path, arch):
    ours = _saecore_sae(arch).eval()
    ours.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    expected = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}[arch]
    assert theirs.cfg.architecture() == expected
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    x = torch.randn(32, 12) * 4
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), ours.decode(ours.encode(x)), rtol=1e-5, atol=1e-5)


def _saelens_sae(kind: str):
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )

    torch.manual_seed(0)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(d_in=10, d_sae=30, apply_b_dec_to_input=True))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=10, d_sae=30, k=4, apply_b_dec_to_input=True))
    elif kind == "topk_rescaled":
        sae = TopKSAE(TopKSAEConfig(d_in=10, d_sae=30, k=4, rescale_acts_by_decoder_norm=True))
    else:
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=10, d_sae=30, apply_b_dec_to_input=True))
    with torch.no_grad():  # SAELens initialises biases and thresholds to 0; make every term count
        for p in sae.parameters():
            p.add_(0.3 * torch.randn_like(p))
        if kind == "jumprelu":
            sae.threshold.abs_()
    return sae


@pytest.mark.parametrize("kind", ["standard", "topk", "topk_rescaled", "jumprelu"])
def test_saecore_loads_saelens_checkpoints_with_equal_encodings(tmp_path, kind):
    theirs = _saelens_sae(kind)
    theirs.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    x = torch.randn(25, 10) * 3
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.decode(ours.encode(x)), theirs.decode(theirs.encode(x)), rtol=1e-4, atol=1e-5)
    # and back out again: SAELens reads what saecore writes of it.
    ours.save(tmp_path / "again")
    back = sae_lens.SAE.load_from_disk(str(tmp_path / "again"), device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-5)


def test_documented_file_format(tmp_path):
    """The layout promised in saecore.saelens' docstring, checked without SAELens."""
    from safetensors.torch import load_file

    _saecore_sae("topk").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 5 and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none" and cfg["metadata"]["sae_lens_version"].startswith("6")
    shapes = {k: tuple(v.shape) for k, v in load_file(str(tmp_path / "sae_weights.safetensors")).items()}
    assert shapes == {"W_enc": (12, 40), "b_enc": (40,), "W_dec": (40, 12), "b_dec": (12,)}


def test_unsupported_saelens_options_are_refused_by_name(tmp_path):
    _saecore_sae("relu").save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["saecore"]
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer_norm"):
        SAE.load(tmp_path)
    cfg["normalize_activations"], cfg["architecture"] = "none", "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gated"):
        SAE.load(tmp_path)
