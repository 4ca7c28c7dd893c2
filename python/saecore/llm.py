"""Language-model backends for automated interpretability, behind one interface, with a disk cache.

Two backends answer the same two requests:

* :meth:`generate` — greedy chat completion of each conversation (the explainer);
* :meth:`choose` — for each conversation, the probability of each of a few one-token answers
  (``Yes``/``No``, ``0``–``3``) as the first token of the reply (the scorers).

:class:`LocalLM` runs a Hugging Face causal LM through transformers (the built-in SmolLM2-135M-Instruct
by default, or any local model folder), formatting prompts with the tokenizer's chat template. Its
``choose`` reads the next-token logits (a probability, not just an answer). With ``share_prefix`` a
batch's common token prefix runs once and is shared through the key/value cache (off by default: no
faster on CPU in bench/autointerp.py).

:class:`OpenAIChatLM` posts to any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, llama.cpp's
server, a hosted API) with the standard library. The API key is read from the environment variable the
caller names, sent only in the ``Authorization`` header, and never logged, hashed or cached. Its
``choose`` asks for ``logprobs`` and uses them when the server returns them; otherwise the parsed
answer counts as probability 1 (``soft`` is then False).

:class:`CachedLM` wraps either: every request and its answer is stored as one JSON file named by the
sha256 of the request (backend, model, request kind, messages, parameters), written atomically, so a
rerun or a resumed run sends nothing it has answered before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import read_json_object, write_json
from .config import option
from .models import BUILTIN_MODEL
from .run import llm_cache_entry

Chat = list[dict[str, str]]
"""One conversation: ``[{"role": "system"|"user"|"assistant", "content": ...}, ...]``."""

CACHE_FORMAT = "saecore.llm-cache/1"


@dataclass(frozen=True)
class Choice:
    """The answer to a ``choose`` request: probabilities of the choices (same order) and the raw answer."""

    probs: list[float]
    answer: str
    soft: bool
    """True when ``probs`` come from the model's probabilities, False when from a parsed answer."""

    @property
    def best(self) -> int:
        """Index of the most probable choice (the first on a tie)."""
        return max(range(len(self.probs)), key=lambda i: (self.probs[i], -i))


@dataclass(kw_only=True)
class LLMOptions:
    """The language-model options shared by ``saecore explain`` and ``saecore score``."""

    model: str = BUILTIN_MODEL
    """Model: a built-in name or a local Hugging Face folder; with --url, the model name sent to the server."""
    url: str | None = None
    """Base URL of an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1); unset: run the model locally."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key for --url (never logged or cached; unset variable: no key sent)."""
    device: str | None = None
    """Torch device of a local model (default: CUDA when present, else the CPU)."""
    batch_size: int = option(8, ge=1, le=4096)
    """Prompts per batch (a local model's forward pass; concurrent requests with --url)."""
    timeout: float = option(120.0, gt=0, le=86_400)
    """Seconds to wait for one answer from --url."""


def choice_token_ids(tokenizer: Any, choices: Sequence[str]) -> list[list[int]]:
    """For each choice, every single token that reads as it (case and surrounding spaces ignored: "Yes",
    " yes" …), as the OpenAI-compatible path matches ``top_logprobs``; ValueError when a choice has none."""
    want = {c.strip().lower(): i for i, c in enumerate(choices)}
    out: list[list[int]] = [[] for _ in choices]
    for token_id in range(len(tokenizer)):
        i = want.get(tokenizer.decode([token_id]).strip().lower())
        if i is not None:
            out[i].append(token_id)
    missing = [c for c, ids in zip(choices, out) if not ids]
    if missing:
        raise ValueError(f"choices {missing} are not single tokens of this model's tokenizer")
    return out


def _softmax_pick(logits: Any, ids: list[list[int]]) -> list[float]:
    """Probability of each group of tokens under ``logits`` [vocab], renormalised over the groups."""
    import torch

    p = torch.softmax(logits.double(), dim=-1)
    mass = [float(p[group].sum()) for group in ids]
    total = sum(mass)
    return [m / total for m in mass] if total > 0 else [1.0 / len(ids)] * len(ids)


class LocalLM:
    """A local causal LM (transformers), greedy decoding, batched. ``calls`` counts prompts run.

    The model is loaded on first use, so a run answered wholly from the cache never loads it (a bad
    name or folder is refused at once)."""

    kind = "local"

    def __init__(self, model: str = BUILTIN_MODEL, device: str | None = None, batch_size: int = 8,
                 loaded: Any = None):
        from . import models

        self.name = str(model)
        self._device = device
        self._loaded = loaded
        if loaded is None:
            models.model_dir(model)  # an unknown name or a folder that is no model fails here, before any work
        self.batch_size = batch_size
        self.calls = 0
        self.share_prefix = False
        """Run a batch's common token prefix once and share its key/value cache. Off by default: measured
        no faster on CPU at batch 16 with the scorers' prompt mix (bench/autointerp.py, docs/autointerp.md)."""
        self._choice_ids: dict[tuple[str, ...], list[list[int]]] = {}

    def _load(self) -> Any:
        from . import models

        if self._loaded is None:
            self._loaded = models.load(self.name, device=self._device)
        if not getattr(self._loaded[1], "chat_template", None):
            raise ValueError(f"model {self.name!r}: its tokenizer has no chat template; use an instruction-tuned model")
        return self._loaded

    @property
    def model(self) -> Any:
        return self._load()[0]

    @property
    def tokenizer(self) -> Any:
        return self._load()[1]

    @property
    def identity(self) -> dict[str, str]:
        """What the cache key records about this backend."""
        return {"backend": self.kind, "model": self.name}

    def prompt_text(self, chat: Chat) -> str:
        """The chat formatted by the model's template, ending where the assistant's reply begins."""
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def _encode(self, chats: Sequence[Chat]) -> list[list[int]]:
        return [self.tokenizer.encode(self.prompt_text(c), add_special_tokens=False) for c in chats]

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        """Greedy completions of ``chats``, in order."""
        out: list[str] = []
        for start in range(0, len(chats), self.batch_size):
            out += self._generate_batch(self._encode(chats[start:start + self.batch_size]), max_new_tokens)
        return out

    def _generate_batch(self, encoded: list[list[int]], max_new_tokens: int) -> list[str]:
        import torch

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        width = max(map(len, encoded))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])  # left padding: replies start together
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        device = self.model.device
        with torch.no_grad():
            gen = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                      max_new_tokens=max_new_tokens, pad_token_id=pad)
        self.calls += len(encoded)
        return [self.tokenizer.decode(g[width:], skip_special_tokens=True) for g in gen.cpu()]

    def choose(self, chats: Sequence[Chat], choices: Sequence[str]) -> list[Choice]:
        """Probability of each choice as the reply's first token, for each chat."""
        key = tuple(choices)
        if key not in self._choice_ids:
            self._choice_ids[key] = choice_token_ids(self.tokenizer, choices)
        ids = self._choice_ids[key]
        out: list[Choice] = []
        for start in range(0, len(chats), self.batch_size):
            for logits in self.next_token_logits(self._encode(chats[start:start + self.batch_size])):
                probs = _softmax_pick(logits, ids)
                out.append(Choice(probs, choices[max(range(len(probs)), key=probs.__getitem__)], True))
        return out

    def next_token_logits(self, encoded: list[list[int]]) -> list[Any]:
        """Logits [vocab] of the token after each prompt. The batch's common token prefix runs once and
        its key/value cache is repeated for the rest (right-padded, so padding never precedes a real token)."""
        import torch

        shared = _common_prefix_length(encoded) if self.share_prefix else 0
        shared = min(shared, min(map(len, encoded)) - 1)  # every prompt keeps at least one token of its own
        device = self.model.device
        cache = None
        # transformers 5.2x renamed the key/value cache argument and output from past_key_values to cache.
        cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        if shared > 0:
            with torch.no_grad():
                first = self.model(input_ids=torch.tensor([encoded[0][:shared]], device=device), use_cache=True)
            cache = getattr(first, cache_kw)
            cache.batch_repeat_interleave(len(encoded))
        rest = [e[shared:] for e in encoded]
        width = max(map(len, rest))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rest], device=device)
        mask = torch.tensor([[1] * (shared + len(r)) + [0] * (width - len(r)) for r in rest], device=device)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None, **{cache_kw: cache}).logits
        self.calls += len(encoded)
        return [logits[i, len(r) - 1].float().cpu() for i, r in enumerate(rest)]


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(map(len, seqs))
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


class OpenAIChatLM:
    """A client of an OpenAI-compatible ``/chat/completions`` endpoint (standard library only).

    ``calls`` counts requests sent. The key (from ``api_key_env``) lives only in the request header.
    """

    kind = "openai"

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 concurrency: int = 4):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"--url {url!r}: expected an http:// or https:// base URL (e.g. http://127.0.0.1:8000/v1)")
        self.url = url.rstrip("/")
        self.name = str(model)
        self._api_key_env = api_key_env
        self.timeout = timeout
        self.concurrency = concurrency
        self.calls = 0

    @property
    def identity(self) -> dict[str, str]:
        return {"backend": self.kind, "model": self.name, "url": self.url}

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self._api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(f"{self.url}/chat/completions", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
        self.calls += 1
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = json.loads(resp.read())
        except urllib.error.HTTPError as e:
            raise OSError(f"{self.url}/chat/completions: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise OSError(f"{self.url}/chat/completions: cannot connect ({e.reason})") from None
        except ValueError as e:
            raise OSError(f"{self.url}/chat/completions: the reply is not JSON ({e})") from None
        if not isinstance(payload, dict) or not payload.get("choices"):
            raise OSError(f"{self.url}/chat/completions: the reply has no choices")
        return payload

    def _map(self, fn: Any, items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        def one(chat: Chat) -> str:
            reply = self._post({"model": self.name, "messages": chat, "max_tokens": max_new_tokens, "temperature": 0})
            return str(reply["choices"][0].get("message", {}).get("content") or "")

        return self._map(one, chats)

    def choose(self, chats: Sequence[Chat], choices: Sequence[str]) -> list[Choice]:
        def one(chat: Chat) -> Choice:
            reply = self._post({"model": self.name, "messages": chat, "max_tokens": 1, "temperature": 0,
                                "logprobs": True, "top_logprobs": 20})
            return choice_from_reply(reply["choices"][0], choices)

        return self._map(one, chats)


def choice_from_reply(choice: dict[str, Any], choices: Sequence[str]) -> Choice:
    """A :class:`Choice` from one entry of an OpenAI reply: its first token's ``top_logprobs`` when present
    (probability mass of the listed choices, renormalised), else the answer text matched to a choice."""
    answer = str(choice.get("message", {}).get("content") or "")
    content = (choice.get("logprobs") or {}).get("content") or []
    if content:
        mass = [0.0] * len(choices)
        for entry in content[0].get("top_logprobs") or []:
            token = str(entry.get("token", "")).strip().lower()
            for i, c in enumerate(choices):
                if token == c.lower():
                    mass[i] += math.exp(float(entry.get("logprob", -math.inf)))
        if sum(mass) > 0:
            return Choice([m / sum(mass) for m in mass], answer, True)
    return Choice(parse_choice(answer, choices), answer, False)


def parse_choice(answer: str, choices: Sequence[str]) -> list[float]:
    """One-hot on the choice the answer begins with (case-insensitive); uniform when it matches none."""
    text = answer.strip().lstrip("*\"'[(").lower()
    for i, c in enumerate(choices):
        if text.startswith(c.lower()):
            return [1.0 if j == i else 0.0 for j in range(len(choices))]
    return [1.0 / len(choices)] * len(choices)


class CachedLM:
    """A backend whose answers are cached on disk, one JSON file per request, named by its sha256.

    ``hits`` and ``misses`` count requests answered from the cache and sent to the backend.
    """

    def __init__(self, backend: LocalLM | OpenAIChatLM, folder: str | os.PathLike[str], progress: bool = False):
        self.backend = backend
        self.folder = Path(folder)
        self.progress = progress
        self.hits = 0
        self.misses = 0

    @property
    def name(self) -> str:
        return self.backend.name

    def key(self, request: dict[str, Any]) -> str:
        """sha256 of the backend identity and the request (messages and parameters), canonical JSON."""
        body = {"format": CACHE_FORMAT, **self.backend.identity, **request}
        return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return llm_cache_entry(self.folder, key)

    def _cached(self, requests: list[dict[str, Any]]) -> tuple[list[str], list[Any], list[int]]:
        keys = [self.key(r) for r in requests]
        answers: list[Any] = [None] * len(requests)
        missing = []
        for i, k in enumerate(keys):
            path = self._path(k)
            if path.exists():
                answers[i] = read_json_object(path)["answer"]
            else:
                missing.append(i)
        self.hits += len(requests) - len(missing)
        self.misses += len(missing)
        return keys, answers, missing

    def _store(self, key: str, request: dict[str, Any], answer: Any) -> None:
        write_json(self._path(key), {"format": CACHE_FORMAT, **self.backend.identity, "request": request,
                                     "answer": answer})

    def _ask(self, missing: list[int], ask: Any, store: Any) -> None:
        """Send the uncached requests ``missing`` in chunks, storing each chunk's answers as it returns, so
        a killed run keeps what it has paid for."""
        from tqdm.auto import tqdm

        step = max(1, getattr(self.backend, "batch_size", 0) or getattr(self.backend, "concurrency", 8))
        with tqdm(total=len(missing), desc=f"{self.backend.name}", unit="prompt", disable=not self.progress,
                  file=sys.stderr) as bar:
            for start in range(0, len(missing), step):
                chunk = missing[start:start + step]
                for i, answer in zip(chunk, ask(chunk)):
                    store(i, answer)
                bar.update(len(chunk))

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> tuple[list[str], list[str]]:
        """(completions, request hashes) of ``chats``; only uncached ones reach the backend."""
        requests = [{"kind": "generate", "messages": c, "max_new_tokens": max_new_tokens} for c in chats]
        keys, answers, missing = self._cached(requests)

        def store(i: int, text: str) -> None:
            self._store(keys[i], requests[i], text)
            answers[i] = text

        self._ask(missing, lambda chunk: self.backend.generate([chats[i] for i in chunk], max_new_tokens), store)
        return [str(a) for a in answers], keys

    def choose(self, chats: Sequence[Chat], choices: Sequence[str]) -> list[Choice]:
        """Choice probabilities of ``chats``; only uncached ones reach the backend."""
        requests = [{"kind": "choose", "messages": c, "choices": list(choices)} for c in chats]
        keys, answers, missing = self._cached(requests)

        def store(i: int, ch: Choice) -> None:
            answers[i] = {"probs": ch.probs, "answer": ch.answer, "soft": ch.soft}
            self._store(keys[i], requests[i], answers[i])

        self._ask(missing, lambda chunk: self.backend.choose([chats[i] for i in chunk], choices), store)
        return [Choice([float(p) for p in a["probs"]], str(a["answer"]), bool(a["soft"])) for a in answers]


def make_backend(opts: LLMOptions) -> LocalLM | OpenAIChatLM:
    """The backend ``opts`` ask for: the OpenAI-compatible client with ``url``, else the local model."""
    if opts.url:
        return OpenAIChatLM(opts.url, opts.model, opts.api_key_env, opts.timeout, concurrency=opts.batch_size)
    return LocalLM(opts.model, device=opts.device, batch_size=opts.batch_size)
