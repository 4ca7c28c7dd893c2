"""The SAE module: fast paths equal the dense reference, input scaling folds exactly, configs validate,
checkpoints round-trip, and the JumpReLU / BatchTopK pieces behave as their papers define them."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saecore.sae import SAE, SAEConfig, dense_decode, sparse_decode

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def _pair(arch: str, d_in: int, d_sae: int, k: int, seed: int = 0) -> tuple[SAE, SAE]:
    cfg = SAEConfig(arch, d_in=d_in, d_sae=d_sae, k=k, input_scale=1.7)
    fast = SAE(cfg, fast=True, seed=seed)
    ref = SAE(cfg, fast=False, seed=seed)
    with torch.no_grad():  # non-trivial biases and thresholds so every term is exercised
        g = torch.Generator().manual_seed(seed + 1)
        for p in (fast.b_enc, fast.b_dec):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(["topk", "batchtopk"]),
    d_in=st.integers(2, 12),
    d_sae=st.integers(4, 40),
    batch=st.integers(1, 17),
    k=st.integers(1, 4),
    dead_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_sparse_fast_path_matches_dense_reference(arch, d_in, d_sae, batch, k, dead_frac, seed):
    fast, ref = _pair(arch, d_in, d_sae, min(k, d_sae), seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, d_in, generator=g) * 3
    dead = torch.rand(d_sae, generator=g) < dead_frac
    outs = []
    for sae in (fast, ref):
        out = sae(x, dead_mask=dead)
        (out.mse + out.aux_loss).backward()
        outs.append(out)
    a, b = outs
    # float32 sums in another order: differences of a few ulps of values up to ~10 (x is scaled by 3).
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.aux_loss, b.aux_loss, rtol=1e-4, atol=1e-4)
    assert torch.equal(a.fired, b.fired) and float(a.l0) == float(b.l0)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_auxk_loss_is_in_the_units_of_the_mse(arch):
    """Gao et al.'s loss is MSE/Var(x) + α·MSE_aux/Var(e); ours is the plain MSE, so the AuxK term carries
    Var(x): when no dead latent can fire it equals Var(x)·‖e‖²/‖e − ē‖², and it grows with the input scale
    exactly as the MSE does (so α means the same at any d_in)."""
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3)) * 2 + 0.5
    dead = torch.zeros(32, dtype=torch.bool)
    dead[16:] = True
    outs = []
    for scale in (1.0, 3.0):
        sae = SAE(SAEConfig(arch, d_in=8, d_sae=32, k=2, input_scale=scale), seed=0)
        with torch.no_grad():
            sae.b_enc[16:] = -1e4  # dead latents never fire: their reconstruction of the residual is 0
        outs.append((sae(x, dead_mask=dead), scale))
    for out, scale in outs:
        xs = x * scale
        e = xs - out.x_hat * scale
        var_x = (xs - xs.mean(0)).pow(2).sum() / x.shape[0]
        expected = var_x * e.pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        torch.testing.assert_close(out.aux_loss.detach(), expected.detach(), rtol=1e-4, atol=1e-6)
    (a, _), (b, _) = outs
    torch.testing.assert_close(b.aux_loss / a.aux_loss, b.mse / a.mse, rtol=1e-4, atol=0)


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 9), d_sae=st.integers(1, 20), d_in=st.integers(1, 7), nnz=st.integers(0, 40), seed=st.integers(0, 99))
def test_sparse_decode_matches_dense(n_rows, d_sae, d_in, nnz, seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, n_rows, (nnz,), generator=g).sort().values
    latents = torch.randint(0, d_sae, (nnz,), generator=g)
    values = torch.randn(nnz, generator=g)
    W = torch.randn(d_sae, d_in, generator=g)
    torch.testing.assert_close(sparse_decode(rows, latents, values, W, n_rows), dense_decode(rows, latents, values, W, n_rows))


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_agrees_with_encode_decode_in_eval_mode(arch):
    sae, _ = _pair(arch, 8, 32, 3)
    sae.eval()
    x = torch.randn(10, 8) * 5
    out = sae(x)
    torch.testing.assert_close(out.x_hat, sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    assert out.x_hat.shape == (10, 8)


@pytest.mark.parametrize("arch", ARCHS)
def test_folding_the_input_scale_keeps_latents_and_reconstruction(arch):
    sae, _ = _pair(arch, 6, 24, 3)
    if arch == "batchtopk":
        sae.threshold.fill_(0.2)
    x = torch.randn(7, 6) * 4
    folded = sae.folded()
    assert folded.cfg.input_scale == 1.0
    torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.decode(folded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)


def test_encode_takes_raw_activations_with_leading_dims():
    sae, _ = _pair("topk", 5, 20, 2)
    x = torch.randn(3, 4, 5)
    f = sae.encode(x)
    assert f.shape == (3, 4, 20)
    assert ((f > 0).sum(-1) <= 2).all()
    assert sae.decode(f).shape == (3, 4, 5)


def test_anthropic_initialisation():
    sae = SAE(SAEConfig("relu", d_in=16, d_sae=64), seed=3)
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.full((64,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    assert not sae.b_enc.any() and not sae.b_dec.any()
    topk = SAE(SAEConfig("topk", d_in=16, d_sae=64, k=4))
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.ones(64))


def test_relu_sparsity_loss_is_decoder_norm_weighted_l1():
    sae, _ = _pair("relu", 6, 12, 1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 3.0, 12)[:, None])
    x = torch.randn(9, 6)
    out = sae(x)
    f = out.feature_acts
    expected = (f * sae.W_dec.norm(dim=1)).sum(-1).mean()
    torch.testing.assert_close(out.sparsity_loss, expected)
    xs = x * sae.cfg.input_scale
    torch.testing.assert_close(out.mse, (xs - out.x_hat * sae.cfg.input_scale).pow(2).sum(-1).mean())


def test_jumprelu_straight_through_gradients():
    cfg = SAEConfig("jumprelu", d_in=4, d_sae=3, jumprelu_bandwidth=0.5, jumprelu_init_threshold=1.0)
    sae = SAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4)[:, :3])
    x = torch.tensor([[1.1, 0.5, 3.0, 0.0]])  # pre = [1.1, 0.5, 3.0]: near θ, below θ, far above θ
    out = sae(x)
    out.sparsity_loss.backward()
    g = sae.threshold.grad
    # L0 STE: −(1/ε)·K((z−θ)/ε): only latent 0 is within ε/2 of θ.
    torch.testing.assert_close(g, torch.tensor([-2.0, 0.0, 0.0]))
    assert float(out.sparsity_loss) == 2.0  # latents 0 and 2 are active


def test_batchtopk_threshold_is_learned_and_used_at_inference():
    sae, _ = _pair("batchtopk", 6, 30, 2)
    sae.train()
    x = torch.randn(64, 6)
    out = sae(x)
    assert float(out.l0) == pytest.approx(2.0)  # B·k kept over the batch (all positive here)
    theta = float(sae.threshold[0])
    assert theta > 0 and theta == pytest.approx(float(out.values[out.values > 0].min()))
    sae.eval()
    f = sae.encode(x)
    assert (f[f > 0] > theta).all()


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"architecture": "gated"}, "architecture"),
        ({"d_sae": 0}, "d_sae"),
        ({"architecture": "topk", "k": 99}, "k"),
        ({"input_scale": float("nan")}, "input_scale"),
    ],
)
def test_config_validation_names_the_field(kwargs, word):
    base = {"architecture": "relu", "d_in": 4, "d_sae": 8}
    with pytest.raises(ValueError, match=word):
        SAEConfig(**{**base, **kwargs})


def test_forward_rejects_wrong_width():
    sae, _ = _pair("relu", 6, 12, 1)
    with pytest.raises(ValueError, match="d_in=6"):
        sae(torch.randn(3, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(tmp_path, arch):
    sae, _ = _pair(arch, 6, 24, 3)
    if arch == "batchtopk":
        sae.threshold.fill_(0.3)
    sae.save(tmp_path / "sae", extra_metadata={"note": "x"})
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["saecore"]["note"] == "x"
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.architecture == arch and loaded.cfg.input_scale == 1.0
    x = torch.randn(11, 6) * 3
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.decode(loaded.encode(x)), sae.decode(sae.encode(x)), rtol=1e-5, atol=1e-5)
    assert not list((tmp_path / "sae").glob(".*partial"))


def test_load_reports_truncated_weights(tmp_path):
    from saecore import CorruptDataError

    sae, _ = _pair("relu", 6, 12, 1)
    sae.save(tmp_path)
    path = tmp_path / "sae_weights.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CorruptDataError, match="sae_weights.safetensors"):
        SAE.load(tmp_path)


def test_load_missing_folder_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load(tmp_path / "nope")


@settings(max_examples=20, deadline=None)
@given(d_in=st.integers(2, 10), d_sae=st.integers(20, 80), batch=st.integers(1, 30), shift=st.floats(1.0, 4.0), seed=st.integers(0, 999))
def test_relu_sparse_path_matches_dense_reference(d_in, d_sae, batch, shift, seed):
    fast, ref = _pair("relu", d_in, d_sae, 1, seed)
    with torch.no_grad():
        fast.W_dec.mul_(torch.linspace(0.5, 2.0, d_sae)[:, None])
        fast.b_enc.sub_(shift)  # few latents fire, so the fast path takes its sparse branch
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(seed)) * 3
    outs = []
    for sae in (fast, ref):
        out = sae(x)
        (out.mse + 5.0 * out.sparsity_loss).backward()
        outs.append(out)
    a, b = outs
    if float(a.l0) / d_sae <= SAE.RELU_SPARSE_MAX_DENSITY:
        assert a.feature_acts is None and a.latents is not None  # the sparse branch ran
    torch.testing.assert_close(a.x_hat, b.x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.sparsity_loss, b.sparsity_loss, rtol=1e-5, atol=1e-6)
    assert float(a.l0) == pytest.approx(float(b.l0)) and torch.equal(a.fired, b.fired)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(ref, name).grad, rtol=1e-4, atol=1e-4)
