"""Stand-in for vLLM 0.11's OpenAI-compatible server, for integration tests.

The orchestrator only sees an engine from the outside: its command line, its model
resolution against the Hugging Face cache, its log lines, when its port opens, how it
answers HTTP and how it dies. This script reproduces those parts with the standard
library alone, so the test image needs nothing but python3 and no GPU.

Behaviour is steered by environment variables (see README.md next to this file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

VLLM_VERSION = "0.11.0"
DEFAULT_MAX_MODEL_LEN = 4096
DEFAULT_MAX_TOKENS = 16
EMBEDDING_DIM = 8

# Reentrant because the SIGTERM handler logs on the main thread, which may already hold it.
_print_lock = threading.RLock()


def log(message: str, *, err: bool = False) -> None:
    # Handler threads log concurrently; one lock keeps each line whole in `docker logs`.
    stream = sys.stderr if err else sys.stdout
    with _print_lock:
        stream.write(message + "\n")
        stream.flush()


def die(message: str, code: int = 1) -> NoReturn:
    log(message, err=True)
    sys.exit(code)


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        die(f"ERROR: {name} must be a number of seconds, got {raw!r}", 2)


def env_flag(name: str) -> bool:
    # Same spellings huggingface_hub accepts for HF_HUB_OFFLINE, so one rule serves all flags.
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- command line


def parse_max_model_len(raw: str) -> int:
    # vLLM accepts human-readable sizes such as "32k"; compose files in the wild use them.
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", raw)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid --max-model-len: {raw!r}")
    number, suffix = float(match.group(1)), match.group(2)
    factor = {"": 1, "k": 1000, "K": 1024, "m": 1000**2, "M": 1024**2}[suffix]
    return int(number * factor)


def parse_args(argv: list[str]) -> argparse.Namespace:
    tokens = list(argv)
    # The vllm/vllm-openai entrypoint is `vllm serve`; accepting the word keeps a compose
    # `command:` written for either image working with both.
    if tokens and tokens[0] == "serve":
        tokens.pop(0)
    # Only the first token may be the positional model, as with `vllm serve MODEL`.
    # Letting argparse look for positionals anywhere would swallow the values of
    # unknown flags (the "0.9" of `--gpu-memory-utilization 0.9`) as the model.
    positional = tokens.pop(0) if tokens and not tokens[0].startswith("-") else None

    # allow_abbrev=False: unknown vLLM flags such as `--model-impl` must not be taken
    # for abbreviations of the few flags the stand-in understands.
    parser = argparse.ArgumentParser(prog="standin", allow_abbrev=False)
    parser.add_argument("--model")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--revision")
    parser.add_argument("--max-model-len", type=parse_max_model_len, default=None)
    args, _ignored = parser.parse_known_args(tokens)

    if positional is not None and args.model is not None:
        die(
            "ERROR: the model was given both as positional argument "
            f"({positional!r}) and as --model ({args.model!r}); give it only once.",
            2,
        )
    args.model = positional if positional is not None else args.model
    if not args.model:
        # Real vLLM would fall back to a default model and try to download it; in a test
        # that only ever hides a broken command line.
        die("ERROR: no model given (positional MODEL or --model MODEL)", 2)
    args.served_model_names = args.served_model_name or [args.model]
    return args


# --------------------------------------------------------------------------- hub cache


def hub_cache_root() -> Path:
    # Same precedence as huggingface_hub.constants.
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.environ[name])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(xdg) / "huggingface" / "hub"


_REPO_ID_RE = re.compile(r"^(\b[\w\-.]+\b/)?\b[\w\-.]+\b$")


def validate_repo_id(repo_id: str) -> None:
    # Messages copied from huggingface_hub's validate_repo_id: that text is what operators
    # find in the logs of a real engine, so tests can match on it.
    if repo_id.count("/") > 1 or repo_id.startswith(("/", ".")):
        die(
            "huggingface_hub.errors.HFValidationError: Repo id must be in the form "
            f"'repo_name' or 'namespace/repo_name': '{repo_id}'. "
            "Use `repo_type` argument if needed."
        )
    if not _REPO_ID_RE.match(repo_id) or "--" in repo_id or ".." in repo_id or len(repo_id) > 96:
        die(
            "huggingface_hub.errors.HFValidationError: Repo id must use alphanumeric chars "
            "or '-', '_', '.', '--' and '..' are forbidden, '-' and '.' cannot start or end "
            f"the name, max length is 96: '{repo_id}'."
        )


def cached_snapshot(repo_id: str, revision: str | None) -> Path | None:
    repo_dir = hub_cache_root() / ("models--" + repo_id.replace("/", "--"))
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        try:
            commit = (repo_dir / "refs" / revision).read_text().strip()
        except OSError:
            return None
    snapshot = repo_dir / "snapshots" / commit
    return snapshot if commit and (snapshot / "config.json").is_file() else None


def resolve_model(model: str, revision: str | None, offline: bool) -> str:
    """Return what vLLM would go on to load, or exit the way vLLM does when it cannot."""
    if model.startswith(("/", ".")):
        path = Path(model)
        if not path.exists():
            # A missing local path is not an error of its own in vLLM: it is handed to
            # huggingface_hub as a repo id, which then rejects it. Mounting the model
            # directory at the wrong place looks exactly like this in the logs.
            validate_repo_id(model)
        if not (path / "config.json").is_file():
            die(
                "ValueError: Invalid repository ID or local directory specified: "
                f"'{model}'. Please verify that the directory contains a config.json."
            )
        return model

    validate_repo_id(model)
    snapshot = cached_snapshot(model, revision)
    if offline:
        if snapshot is None:
            die(
                "OSError: We couldn't connect to 'https://huggingface.co' to load the files, "
                "and couldn't find them in the cached files. Checkout your internet "
                "connection or see how to run the library in offline mode at "
                "'https://huggingface.co/docs/transformers/installation#offline-mode'. "
                f"(repo: {model}, cache: {hub_cache_root()})"
            )
        log(f"INFO: HF_HUB_OFFLINE is True, replace model_id [{model}] to model_path [{snapshot}]")
        return str(snapshot)
    if snapshot is None:
        # Online mode with no network: the way an engine started without HF_HUB_OFFLINE
        # fails on an air-gapped host even though another revision may be on disk.
        log(f"INFO: Downloading {model} from https://huggingface.co ...")
        time.sleep(1)
        die(
            'requests.exceptions.ConnectionError: (MaxRetryError("HTTPSConnectionPool('
            f"host='huggingface.co', port=443): Max retries exceeded with url: "
            f"/api/models/{model}/revision/{revision or 'main'} (Caused by "
            "NameResolutionError(\"Failed to resolve 'huggingface.co' ([Errno -3] "
            'Temporary failure in name resolution)"))"))'
        )
    # vLLM keeps the repo id when it is not in offline mode; the hub resolves it internally.
    return model


# --------------------------------------------------------------------------- responses


# The demo's engines say what they are in every answer, so nobody mistakes them for a model.
FILLER_NOTICE = "[demo engine: generated filler text, not a model]"
_FILLER_TEXT = (
    "the quick brown fox jumps over the lazy dog while a small engine hums along and"
    " pretends to think about your question before it answers with words that mean nothing"
)


def completion_words(prompt_text: str, max_tokens: int) -> tuple[list[str], str]:
    """Deterministic "generation": echo the prompt, padded or cut to max_tokens words.

    With STANDIN_FILLER (the demo) the words are filler text after a notice that says so;
    the notice does not count against max_tokens.
    """
    if env_flag("STANDIN_FILLER"):
        words = _FILLER_TEXT.split()
        filler = [words[i % len(words)] for i in range(max_tokens)]
        return [*FILLER_NOTICE.split(), *filler], "length"
    words = ("echo: " + prompt_text).split()
    finish_reason = "length" if len(words) > max_tokens else "stop"
    words = words[:max_tokens]
    words += [f"tok{i}" for i in range(len(words), max_tokens)]
    return words, finish_reason


def count_words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(count_words(item) for item in value)
    if isinstance(value, dict):
        return count_words(value.get("content") or value.get("text") or "")
    return 0


def message_text(content: Any) -> str:
    # OpenAI allows content as a list of typed parts; only text parts can be echoed.
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            part.get("text", "") for part in content if isinstance(part, dict) and "text" in part
        )
    return ""


def embedding_for(text: str) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(byte - 127.5) / 127.5 for byte in digest[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [round(x / norm, 6) for x in raw]


def error_body(message: str, err_type: str, code: int) -> dict[str, Any]:
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


# --------------------------------------------------------------------------- HTTP


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    # Load tests open many connections at once; the default backlog of 5 would reset some.
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], args: argparse.Namespace, model_path: str):
        self.args = args
        self.model_path = model_path
        self.served_names: list[str] = args.served_model_names
        self.max_model_len: int = args.max_model_len or DEFAULT_MAX_MODEL_LEN
        self.token_delay = env_float("STANDIN_TOKEN_DELAY", 0.01)
        self.created = int(time.time())
        self.unhealthy_until = time.monotonic() + env_float("STANDIN_HEALTH_503_FOR", 0.0)
        super().__init__(address, Handler)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Like uvicorn's keep-alive timeout: idle pooled connections must not pin a thread forever.
    timeout = 30
    server: EngineServer

    def version_string(self) -> str:
        return "uvicorn"

    def setup(self) -> None:
        super().setup()
        # uvicorn (and so vLLM) sends with TCP_NODELAY. Without it, a body written after
        # its headers waits for the peer's delayed ACK: 40 ms on a kept-alive connection.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # ---- logging

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = int(code) if str(code).isdigit() else 0
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        host, port = self.client_address[:2]
        log(f'INFO: {host}:{port} - "{self.requestline}" {status} {phrase}'.rstrip())

    def log_error(self, format: str, *args: Any) -> None:
        # Idle keep-alive connections time out routinely; that is not worth a log line.
        if "timed out" not in format % args:
            log(f"WARNING: {format % args}", err=True)

    # ---- plumbing

    def send_json(self, status: int, body: Any) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def send_empty(self, status: int) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # Trailer section ends with an empty line.
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def read_json(self) -> dict[str, Any] | None:
        raw = self.read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            self.send_json(400, error_body(f"Invalid JSON body: {exc}", "BadRequestError", 400))
            return None
        if not isinstance(body, dict):
            self.send_json(400, error_body("Body must be a JSON object", "BadRequestError", 400))
            return None
        model = body.get("model")
        if model is not None and model not in self.server.served_names:
            self.send_json(
                404, error_body(f"The model `{model}` does not exist.", "NotFoundError", 404)
            )
            return None
        return body

    def stream_events(self, events: Iterator[dict[str, Any]]) -> None:
        # Chunked encoding rather than Connection: close, so a streaming client's pooled
        # connection stays usable afterwards, as with uvicorn.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            first = True
            for event in events:
                if not first and self.server.token_delay > 0:
                    time.sleep(self.server.token_delay)
                first = False
                self.write_chunk(f"data: {json.dumps(event)}\n\n".encode())
            self.write_chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            # The client went away mid-stream (e.g. a cancelled request); nothing to answer.
            self.close_connection = True

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # ---- routes

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            healthy = time.monotonic() >= self.server.unhealthy_until
            self.send_empty(200 if healthy else 503)
        elif path == "/ping":
            self.send_empty(200)
        elif path == "/version":
            self.send_json(200, {"version": VLLM_VERSION})
        elif path == "/v1/models":
            self.send_json(200, self.models_body())
        elif path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            self.send_json(405, {"detail": "Method Not Allowed"})
        else:
            self.send_json(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        routes = {
            "/v1/chat/completions": self.chat_completions,
            "/v1/completions": self.completions,
            "/v1/embeddings": self.embeddings,
        }
        if path == "/ping":
            self.read_body()
            self.send_empty(200)
            return
        route = routes.get(path)
        if route is None:
            self.read_body()
            self.send_json(404, {"detail": "Not Found"})
            return
        body = self.read_json()
        if body is not None:
            route(body)

    def models_body(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": self.server.created,
                    "owned_by": "demo engine (filler text)"
                    if env_flag("STANDIN_FILLER")
                    else "vllm",
                    "root": self.server.model_path,
                    "parent": None,
                    "max_model_len": self.server.max_model_len,
                    "permission": [],
                }
                for name in self.server.served_names
            ],
        }

    def max_tokens(self, body: dict[str, Any], *keys: str) -> int:
        for key in keys:
            value = body.get(key)
            if isinstance(value, int) and value > 0:
                return value
        return DEFAULT_MAX_TOKENS

    def chat_completions(self, body: dict[str, Any]) -> None:
        messages = body.get("messages") or []
        user_messages = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        prompt = message_text(user_messages[-1].get("content")) if user_messages else ""
        limit = self.max_tokens(body, "max_completion_tokens", "max_tokens")
        words, finish_reason = completion_words(prompt, limit)
        usage = usage_counts(count_words(messages), len(words))
        common = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.server.served_names[0],
        }
        if not body.get("stream"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words), "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            self.send_json(
                200, {**common, "object": "chat.completion", "choices": [choice], "usage": usage}
            )
            return

        def events() -> Iterator[dict[str, Any]]:
            def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**common, "object": "chat.completion.chunk", "choices": [choice]}

            yield chunk({"role": "assistant", "content": ""})
            for i, word in enumerate(words):
                yield chunk({"content": word if i == 0 else " " + word})
            yield chunk({}, finish_reason)
            if include_usage(body):
                yield {**common, "object": "chat.completion.chunk", "choices": [], "usage": usage}

        self.stream_events(events())

    def completions(self, body: dict[str, Any]) -> None:
        prompt = body.get("prompt", "")
        if isinstance(prompt, list):
            # Batched prompts or token ids: echoing the first string prompt is enough here.
            prompt = next((p for p in prompt if isinstance(p, str)), "")
        words, finish_reason = completion_words(str(prompt), self.max_tokens(body, "max_tokens"))
        usage = usage_counts(count_words(prompt), len(words))
        common = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.server.served_names[0],
        }
        if not body.get("stream"):
            choice = {
                "index": 0,
                "text": " ".join(words),
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            self.send_json(200, {**common, "choices": [choice], "usage": usage})
            return

        def events() -> Iterator[dict[str, Any]]:
            def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                return {**common, "choices": [choice]}

            for i, word in enumerate(words):
                yield chunk(word if i == 0 else " " + word)
            yield chunk("", finish_reason)
            if include_usage(body):
                yield {**common, "choices": [], "usage": usage}

        self.stream_events(events())

    def embeddings(self, body: dict[str, Any]) -> None:
        raw = body.get("input", "")
        inputs = (
            raw if isinstance(raw, list) and not all(isinstance(x, int) for x in raw) else [raw]
        )
        texts = [x if isinstance(x, str) else json.dumps(x) for x in inputs]
        prompt_tokens = sum(max(1, len(t.split())) for t in texts)
        self.send_json(
            200,
            {
                "id": f"embd-{uuid.uuid4().hex}",
                "object": "list",
                "created": int(time.time()),
                "model": self.server.served_names[0],
                "data": [
                    {"index": i, "object": "embedding", "embedding": embedding_for(text)}
                    for i, text in enumerate(texts)
                ],
                "usage": usage_counts(prompt_tokens, 0),
            },
        )


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }


def include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


# --------------------------------------------------------------------------- main


def on_sigterm(signum: int, _frame: object) -> None:
    log("INFO: Shutting down")
    # os._exit, not sys.exit: the signal may arrive while the main thread sits inside
    # serve_forever or a streaming response is being written, and the stop must not wait
    # for either. Nothing here holds state worth a graceful teardown.
    os._exit(0)


def main(argv: list[str]) -> None:
    # `docker logs` should show each line as it happens, even when stdout is a pipe.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)

    # As PID 1 in a container, signals with no handler installed are ignored by the
    # kernel, so SIGTERM would do nothing without this and `docker stop` would wait for
    # SIGKILL.
    if env_flag("STANDIN_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)

    args = parse_args(argv)
    load_delay = env_float("STANDIN_LOAD_DELAY", 2.0)
    log(f"INFO: vLLM API server version {VLLM_VERSION} (stand-in)")
    log(f"INFO: non-default args: {{'model': {args.model!r}}}")

    model_path = resolve_model(args.model, args.revision, env_flag("HF_HUB_OFFLINE"))
    log(f"INFO: Starting to load model {model_path}...")
    if env_flag("STANDIN_FILLER"):
        log(f"INFO: {FILLER_NOTICE}: this is model-orchestrator's demo engine")

    if env_flag("STANDIN_HANG"):
        while True:
            signal.pause()

    time.sleep(max(load_delay, 0.0))

    if env_flag("STANDIN_CRASH"):
        log("ERROR: EngineCore failed to start.", err=True)
        die(
            "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. "
            "GPU 0 has a total capacity of 23.55 GiB of which 1.02 GiB is free. "
            "Of the allocated memory 21.87 GiB is allocated by PyTorch."
        )

    # Binding only now is the point: vLLM's port stays closed for the whole load, and
    # the orchestrator's readiness logic must cope with connection refused.
    server = EngineServer((args.host, args.port), args, model_path)
    log(f"INFO: Started server process [{os.getpid()}]")
    log("INFO: Application startup complete.")
    log(f"INFO: Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
