"""A small OpenAI-compatible HTTP server for tests (there is no provider here): the real
`openai` and `litellm` packages talk to it over real HTTP.

- `POST /v1/chat/completions` and `POST /v1/responses`, streaming (server-sent events) and
  not, with usage as OpenAI reports it: `prompt_tokens` with
  `prompt_tokens_details.cached_tokens`, `completion_tokens`, and, when streaming with
  `stream_options.include_usage`, a last chunk with `choices: []` and the usage.
- A prompt's tokens are its words plus OpenAI's chat overhead (3 per message, 3 to prime the
  reply); `cached_fraction` of them are reported cached. The reply is `reply_tokens` words,
  cut at the request's max tokens (each word one token).
- a model named `…-error-<code>` (e.g. gpt-4o-error-500) answers that HTTP status with an
  OpenAI error body.
- `chunk_delay_s` paces streamed words; `latency_s` delays every answer.
- It counts what it served (`served_tokens`: prompt plus completion tokens of every call it
  answered, streamed words included even when the client left early).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

OVERHEAD_PER_MESSAGE = 3
REPLY_PRIMING = 3


def words(value: Any) -> int:
    """Words of a message content: a string, or a list of parts with text."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(p.get("text", "")) for p in value if isinstance(p, dict))
    return 0


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    return sum(OVERHEAD_PER_MESSAGE + words(m.get("content")) for m in messages) + REPLY_PRIMING


class OpenAIServer:
    def __init__(
        self,
        *,
        reply_tokens: int = 20,
        cached_fraction: float = 0.5,
        chunk_delay_s: float = 0.0,
        latency_s: float = 0.0,
        count_prompt: Callable[[list[dict[str, Any]]], int] | None = None,
    ) -> None:
        """`count_prompt`: how prompt tokens are counted (default: words plus overhead); a
        real tokenizer makes the reported usage what a provider would report."""
        self.count_prompt = count_prompt or prompt_tokens
        self.reply_tokens = reply_tokens
        self.cached_fraction = cached_fraction
        self.chunk_delay_s = chunk_delay_s
        self.latency_s = latency_s
        self.requests: list[dict[str, Any]] = []
        self.served_tokens = 0
        self.completions = 0
        self.streamed_words: list[int] = []
        """Words each stream wrote before it ended or its client left."""
        self.lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}/v1"

    def start(self) -> OpenAIServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def usage(self, prompt: int, completion: int) -> dict[str, Any]:
        cached = int(prompt * self.cached_fraction)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.streamed_words.clear()
            self.served_tokens = self.completions = 0

    def served(self, tokens: int, completed: bool = True) -> None:
        with self.lock:
            self.served_tokens += tokens
            self.completions += int(completed)


def _handler(server: OpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            with server.lock:
                server.requests.append(body)
            if server.latency_s:
                time.sleep(server.latency_s)
            model = str(body.get("model", ""))
            if "-error-" in model:
                return self._error(int(model.rsplit("-", 1)[1]))
            if self.path.endswith("/chat/completions"):
                return _chat(self, server, body)
            if self.path.endswith("/responses"):
                return _responses(self, server, body)
            return self._error(404)

        def _error(self, status: int) -> None:
            payload = {"error": {"message": f"test server says {status}", "type": "server_error",
                                 "param": None, "code": str(status)}}  # fmt: skip
            self.json(payload, status)

        def json(self, payload: Any, status: int = 200) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def sse_start(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("cache-control", "no-cache")
            self.end_headers()

        def sse(self, payload: Any, event: str = "") -> None:
            prefix = f"event: {event}\n" if event else ""
            text = payload if isinstance(payload, str) else json.dumps(payload)
            self.wfile.write(f"{prefix}data: {text}\n\n".encode())
            self.wfile.flush()

    return Handler


def _reply_words(server: OpenAIServer, max_tokens: Any) -> list[str]:
    limit = int(max_tokens) if max_tokens else server.reply_tokens
    return [f"w{i}" for i in range(min(limit, server.reply_tokens))]


def _chat(h: Any, server: OpenAIServer, body: dict[str, Any]) -> None:
    prompt = server.count_prompt(body.get("messages", []))
    reply = _reply_words(server, body.get("max_completion_tokens") or body.get("max_tokens"))
    finish = "length" if len(reply) < server.reply_tokens else "stop"
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), body["model"]
    if not body.get("stream"):
        server.served(prompt + len(reply))
        message = {"role": "assistant", "content": " ".join(reply), "refusal": None}
        return h.json({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": server.usage(prompt, len(reply)), "system_fingerprint": "fp_test",
        })  # fmt: skip
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {**base, "choices": [choice]}

    h.sse_start()
    sent = 0
    try:
        h.sse(chunk({"role": "assistant", "content": ""}))
        for i, word in enumerate(reply):
            h.sse(chunk({"content": word if i == 0 else " " + word}))
            sent += 1
            if server.chunk_delay_s:
                time.sleep(server.chunk_delay_s)
        h.sse(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            h.sse({**base, "choices": [], "usage": server.usage(prompt, len(reply))})
        h.sse("[DONE]")
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        with server.lock:
            server.streamed_words.append(sent)
        server.served(prompt + sent, completed=sent == len(reply))


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return [m for m in value if isinstance(m, dict)]


def _responses(h: Any, server: OpenAIServer, body: dict[str, Any]) -> None:
    messages = _input_messages(body.get("input", ""))
    if body.get("instructions"):
        messages.insert(0, {"role": "system", "content": body["instructions"]})
    prompt = server.count_prompt(messages)
    reply = _reply_words(server, body.get("max_output_tokens"))
    cached = int(prompt * server.cached_fraction)
    usage = {
        "input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": len(reply), "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + len(reply),
    }  # fmt: skip
    text = " ".join(reply)
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}]}  # fmt: skip
    response = {
        "id": f"resp_{uuid.uuid4().hex[:12]}", "object": "response", "created_at": time.time(),
        "model": body["model"], "status": "completed", "output": [item], "usage": usage,
        "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        "max_output_tokens": body.get("max_output_tokens"),
    }  # fmt: skip
    server.served(prompt + len(reply))
    if not body.get("stream"):
        return h.json(response)
    h.sse_start()
    h.sse({"type": "response.created", "sequence_number": 0,
           "response": {**response, "status": "in_progress", "output": [], "usage": None}},
          "response.created")  # fmt: skip
    for i, word in enumerate(reply):
        h.sse({"type": "response.output_text.delta", "sequence_number": i + 1, "item_id": "msg_1",
               "output_index": 0, "content_index": 0, "delta": (" " if i else "") + word,
               "logprobs": []}, "response.output_text.delta")  # fmt: skip
    h.sse({"type": "response.completed", "sequence_number": len(reply) + 1, "response": response},
          "response.completed")  # fmt: skip
