"""Matryoshka BatchTopK: nested prefixes, each reconstructing on its own, held to an independent
re-implementation; inference threshold; checkpoints in both directions with SAELens."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore.sae import SAE, SAEConfig, default_matryoshka_groups
from saecore.training import TrainConfig, sae_step


def _reference_prefix_mses(sae: SAE, x: np.ndarray) -> np.ndarray:
    """NumPy, dense, written from the definition: batch top-(B·k) of the pre-activations, ReLU; the
    loss of prefix m is mean over rows of ‖s·x − (b_dec + Σ_{i<m} fᵢ W_dec,i)‖²."""
    p = {k: v.detach().double().numpy() for k, v in sae.named_parameters()}
    xs = x.astype(np.float64) * sae.cfg.input_scale
    pre = xs @ p["W_enc"] + p["b_enc"]
    B = x.shape[0]
    keep = np.argsort(pre.ravel())[::-1][: B * sae.cfg.k]
    f = np.zeros(pre.size)
    f[keep] = np.maximum(pre.ravel()[keep], 0)
    f = f.reshape(pre.shape)
    out = []
    for m in np.cumsum(sae.cfg.matryoshka_groups):
        recon = p["b_dec"] + f[:, :m] @ p["W_dec"][:m]
        out.append(((xs - recon) ** 2).sum(1).mean())
    return np.array(out)


def _matryoshka(d_in=12, d_sae=32, k=3, groups=(4, 4, 8, 16), scale=1.0, seed=0, fast=True) -> SAE:
    cfg = SAEConfig("matryoshka", d_in=d_in, d_sae=d_sae, k=k, matryoshka_groups=list(groups), input_scale=scale)
    sae = SAE(cfg, seed=seed, fast=fast)
    with torch.no_grad():  # non-zero biases so b_dec's place in every prefix is tested
        sae.b_dec.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
        sae.b_enc.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 2))
    return sae.train()


def test_default_groups_are_bussmanns_halvings():
    assert default_matryoshka_groups(4096) == [256, 256, 512, 1024, 2048]
    assert sum(default_matryoshka_groups(1000)) == 1000
    assert default_matryoshka_groups(1) == [1]
    assert SAEConfig("matryoshka", d_in=4, d_sae=64).matryoshka_groups == [4, 4, 8, 16, 32]


@pytest.mark.parametrize("groups", [[3, 3], [0, 8], [8, -1, 1]])
def test_groups_must_be_positive_and_sum_to_d_sae(groups):
    with pytest.raises(ValueError, match="matryoshka_groups"):
        SAEConfig("matryoshka", d_in=4, d_sae=8, k=2, matryoshka_groups=groups)
    with pytest.raises(ValueError, match="matryoshka_groups"):
        TrainConfig(architecture="matryoshka", d_sae=8, k=2, matryoshka_groups=groups)
    with pytest.raises(ValueError, match="matryoshka_groups is set"):
        SAEConfig("topk", d_in=4, d_sae=8, k=2, matryoshka_groups=[8])


@settings(max_examples=25, deadline=None)
@given(
    groups=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    k=st.integers(1, 4),
    rows=st.integers(1, 24),
    scale=st.sampled_from([1.0, 0.37]),
    fast=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_each_prefix_loss_is_the_error_of_its_first_m_latents(groups, k, rows, scale, fast, seed):
    d_sae = sum(groups)
    k = min(k, d_sae)
    sae = _matryoshka(d_sae=d_sae, k=k, groups=groups, scale=scale, seed=seed, fast=fast)
    x = np.random.default_rng(seed).standard_normal((rows, 12)).astype(np.float32)
    out = sae(torch.from_numpy(x))
    np.testing.assert_allclose(out.prefix_mses.detach().numpy(), _reference_prefix_mses(sae, x), rtol=2e-4, atol=1e-4)
    # The last prefix is the whole dictionary: its loss is the reported MSE, and the training loss
    # is the mean over prefixes.
    assert float(out.prefix_mses[-1]) == pytest.approx(float(out.mse), rel=1e-5)
    assert float(out.reconstruction_loss) == pytest.approx(float(out.prefix_mses.mean()), rel=1e-6)


def test_fast_and_dense_paths_give_the_same_loss_and_gradients():
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(5))
    grads = []
    for fast in (True, False):
        sae = _matryoshka(fast=fast, seed=3)
        loss = sae(x).reconstruction_loss
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_later_group_does_not_change_an_earlier_prefix_loss():
    """The nesting itself: moving a later group's decoder rows changes only the prefixes containing it."""
    sae = _matryoshka(seed=11)
    x = torch.randn(128, 12, generator=torch.Generator().manual_seed(2))
    before = sae(x).prefix_mses.detach()
    with torch.no_grad():
        sae.W_dec[16:] += 0.5  # the last group (latents 16…31)
    after = sae(x).prefix_mses.detach()
    torch.testing.assert_close(after[:3], before[:3])
    assert not torch.isclose(after[3], before[3])


def test_training_learns_a_threshold_used_at_inference():
    sae = _matryoshka(seed=4)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    x = torch.randn(256, 12, generator=torch.Generator().manual_seed(9))
    for _ in range(5):
        sae_step(sae, opt, x, 0.0, 1 / 32, None, 1.0)
    theta = float(sae.threshold[0])
    assert theta > 0 and torch.all(sae.threshold == theta)
    sae.eval()
    pre = x @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(sae.encode(x), torch.relu(pre) * (pre > theta))
    assert sae(x).prefix_mses is None  # inference: one reconstruction, no batch selection


def test_checkpoint_round_trip_keeps_the_groups(tmp_path):
    sae = _matryoshka(scale=0.5, seed=8)
    with torch.no_grad():
        sae.threshold.fill_(0.2)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens' inference form of its MatryoshkaBatchTopK
    assert cfg["metadata"]["matryoshka_widths"] == [4, 8, 16, 32]
    back = SAE.load(tmp_path)
    assert back.cfg.architecture == "matryoshka" and back.cfg.matryoshka_groups == [4, 4, 8, 16]
    x = torch.randn(50, 12)
    sae.eval()
    torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)


def test_sae_lens_loads_a_saecore_matryoshka(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _matryoshka(seed=6)
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    x = torch.randn(40, 12)
    sae.eval()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)


def test_saecore_loads_a_sae_lens_matryoshka_training_checkpoint(tmp_path):
    saes = pytest.importorskip("sae_lens.saes.matryoshka_batchtopk_sae")
    cfg = saes.MatryoshkaBatchTopKTrainingSAEConfig(d_in=12, d_sae=32, k=3, matryoshka_widths=[4, 8, 16, 32],
                                                     rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True)
    theirs = saes.MatryoshkaBatchTopKTrainingSAE(cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(p.numel()))
        theirs.topk_threshold.fill_(0.05)
    theirs.save_model(str(tmp_path))
    ours = SAE.load(tmp_path)
    assert ours.cfg.architecture == "matryoshka" and ours.cfg.matryoshka_groups == [4, 4, 8, 16]
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    # SAELens' inference rule for it: JumpReLU at the global threshold on the norm-rescaled activations.
    pre = (x - theirs.b_dec) @ theirs.W_enc + theirs.b_enc
    acts = torch.relu(pre) * theirs.W_dec.norm(dim=1)
    expected = acts * (acts > 0.05)
    torch.testing.assert_close(ours.encode(x), expected.detach(), rtol=1e-4, atol=1e-5)
