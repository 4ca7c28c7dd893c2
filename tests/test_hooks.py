"""Hook points: names, capture equal to the model's own hidden states, early stop, and edits."""

from __future__ import annotations

import pytest
import torch
from saecore import hooks


@pytest.fixture(scope="module")
def ids(tiny_model):
    _, tok = tiny_model
    text = "The quick brown fox jumps over the lazy dog. Python's assert statement checks a condition."
    one = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :16]
    return torch.cat([one, one.flip(1)])  # (2, 16)


def test_valid_names_cover_every_block(tiny_model):
    model, _ = tiny_model
    names = hooks.valid_hook_names(model)
    assert len(names) == 4 * model.config.num_hidden_layers
    assert "blocks.0.hook_resid_pre" in names and "blocks.3.hook_mlp_out" in names


def test_resid_hooks_equal_hidden_states(tiny_model, ids):
    model, _ = tiny_model
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states  # embeddings, then each layer's output
    got = hooks.run_to_hooks(
        model, ids, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_post", "blocks.2.hook_resid_pre"]
    )
    torch.testing.assert_close(got["blocks.0.hook_resid_pre"], hidden[0], rtol=0, atol=0)
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], hidden[2], rtol=0, atol=0)
    torch.testing.assert_close(got["blocks.2.hook_resid_pre"], hidden[2], rtol=0, atol=0)


def test_attn_and_mlp_outputs_sum_to_the_residual_update(tiny_model, ids):
    model, _ = tiny_model
    names = [f"blocks.2.{k}" for k in hooks.KINDS]
    got = hooks.run_to_hooks(model, ids, names)
    rebuilt = got["blocks.2.hook_resid_pre"] + got["blocks.2.hook_attn_out"] + got["blocks.2.hook_mlp_out"]
    torch.testing.assert_close(rebuilt, got["blocks.2.hook_resid_post"], rtol=1e-5, atol=1e-5)
    assert all(got[n].shape == (2, 16, 64) for n in names)


def test_forward_stops_after_last_hooked_layer(tiny_model, ids):
    model, _ = tiny_model
    layers = hooks.decoder_layers(model)
    calls = []
    handle = layers[3].register_forward_hook(lambda *a: calls.append(3))
    head = model.lm_head.register_forward_hook(lambda *a: calls.append("head"))
    try:
        hooks.run_to_hooks(model, ids, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"])
        assert calls == []
        hooks.run_to_hooks(model, ids, ["blocks.3.hook_resid_post"])
        assert calls == [3]
    finally:
        handle.remove()
        head.remove()


@pytest.mark.parametrize("bad", ["blocks.4.hook_resid_post", "blocks.1.resid_post", "layer1", "blocks.x.hook_mlp_out"])
def test_wrong_hook_name_lists_valid_names(tiny_model, ids, bad):
    model, _ = tiny_model
    with pytest.raises(ValueError) as e:
        hooks.run_to_hooks(model, ids, [bad])
    msg = str(e.value)
    assert bad in msg and "hook_resid_post" in msg and "0..3" in msg


def test_edit_replaces_activation_and_is_removed_afterwards(tiny_model, ids):
    model, _ = tiny_model
    with torch.no_grad():
        clean = model(ids).logits
        shift = torch.randn(64, generator=torch.Generator().manual_seed(1))
        base = hooks.run_to_hooks(model, ids, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
        with hooks.edit(model, "blocks.1.hook_mlp_out", lambda a: a + shift):
            edited = hooks.run_to_hooks(model, ids, ["blocks.1.hook_resid_post"])["blocks.1.hook_resid_post"]
            steered = model(ids).logits
        after = model(ids).logits
    # mlp_out is the last thing added to the stream in a block, so the shift passes straight through.
    torch.testing.assert_close(edited, base + shift, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(steered, clean)
    torch.testing.assert_close(after, clean, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["blocks.2.hook_resid_pre", "blocks.2.hook_resid_post", "blocks.2.hook_attn_out"])
def test_identity_edit_changes_nothing_and_zero_edit_does(tiny_model, ids, name):
    model, _ = tiny_model
    with torch.no_grad():
        clean = model(ids).logits
        with hooks.edit(model, name, lambda a: a.clone()):
            same = model(ids).logits
        with hooks.edit(model, name, torch.zeros_like):
            zeroed = model(ids).logits
    torch.testing.assert_close(same, clean, rtol=0, atol=0)
    assert not torch.allclose(zeroed, clean)


def test_edit_rejects_wrong_shape(tiny_model, ids):
    model, _ = tiny_model
    with hooks.edit(model, "blocks.0.hook_resid_post", lambda a: a[..., :10]), pytest.raises(ValueError, match="shape"):
        model(ids)
    with torch.no_grad():  # the failed edit left no hook behind
        model(ids)


@pytest.mark.slow
def test_real_model_hook_matches_hidden_state(smollm2):
    model, tok = smollm2
    ids = tok("Water boils at 100 degrees Celsius at sea level.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    got = hooks.run_to_hooks(model, ids, ["blocks.6.hook_resid_post"])["blocks.6.hook_resid_post"]
    torch.testing.assert_close(got, hidden[7], rtol=1e-5, atol=1e-4)
    assert len(hooks.valid_hook_names(model)) == 4 * 30
