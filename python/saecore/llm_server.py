"""A minimal OpenAI-compatible chat server on 127.0.0.1 for a local model (tests, offline use).

``POST /v1/chat/completions`` takes ``messages``, ``max_tokens``, ``logprobs`` and ``top_logprobs``
and answers greedily with :class:`saecore.llm.LocalLM`; with ``logprobs`` it returns the first reply
token's ``top_logprobs``, as OpenAI's API does. ``GET /v1/models`` lists the one model. Requests are
answered one at a time (one model, one lock). It is no production server: no streaming, no sampling.

    python -m saecore.llm_server --port 8000          # the built-in SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import http.server
import json
import threading
import time
from typing import Any

from .llm import LocalLM
from .models import BUILTIN_MODEL


def completion(llm: LocalLM, body: dict[str, Any]) -> dict[str, Any]:
    """The OpenAI-shaped reply to one chat-completion request body."""
    import torch

    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: expected a non-empty list")
    max_tokens = int(body.get("max_tokens") or 16)
    text = llm.generate([messages], max_tokens)[0]
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if body.get("logprobs"):
        logits = llm.next_token_logits([llm.tokenizer.encode(llm.prompt_text(messages), add_special_tokens=False)])[0]
        logp = torch.log_softmax(logits.double(), dim=-1)
        top = torch.topk(logp, int(body.get("top_logprobs") or 1))
        entries = [{"token": llm.tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(top.values, top.indices)]
        first = entries[0] if entries else {"token": "", "logprob": 0.0}
        choice["logprobs"] = {"content": [{**first, "top_logprobs": entries}]}
    return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
            "model": llm.name, "choices": [choice]}


def make_server(llm: LocalLM, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server for ``llm`` bound to 127.0.0.1 only (port 0 picks a free port). ``server.auth_seen``
    records the Authorization header of each request (for tests of the client)."""
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": llm.name, "object": "model"}]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            server.auth_seen.append(self.headers.get("Authorization"))  # type: ignore[attr-defined]
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with lock:
                    reply = completion(llm, body)
            except (ValueError, TypeError) as e:
                self._send(400, {"error": {"message": str(e)}})
                return
            self._send(200, reply)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.auth_seen = []  # type: ignore[attr-defined]
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m saecore.llm_server", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=BUILTIN_MODEL, help="built-in model name or local Hugging Face folder")
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0 picks a free one)")
    parser.add_argument("--device", default=None, help="torch device (default: CUDA when present)")
    args = parser.parse_args(argv)
    server = make_server(LocalLM(args.model, device=args.device), args.port)
    print(f"serving {args.model} at http://127.0.0.1:{server.server_address[1]}/v1  (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
