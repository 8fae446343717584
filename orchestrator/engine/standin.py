"""Stand-in for vLLM 0.11's OpenAI-compatible server, for integration tests.

The orchestrator only sees an engine from the outside: its command line, its model
resolution against the Hugging Face cache, its log lines, when its port opens, how it
answers HTTP and how it dies. This script reproduces those parts with the standard
library alone, so the test image needs nothing but python3 and no GPU.

Behaviour is steered by environment variables (see README.md next to this file).
"""

from __future__ import annotations

import argparse
import fcntl
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
from collections.abc import Callable, Iterator
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs

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


SLEEP_MODE_FLAGS = {"--enable-sleep-mode", "--no-enable-sleep-mode"}


def normalise_flag(token: str) -> str:
    # vLLM's parser takes `--enable_sleep_mode` for `--enable-sleep-mode` (compose files and
    # vLLM's own examples use both). Only the sleep flag is normalised: other underscore
    # spellings stay unknown to the stand-in, as they always were.
    name, sep, value = token.partition("=")
    dashed = name.replace("_", "-")
    return dashed + sep + value if dashed in SLEEP_MODE_FLAGS else token


def parse_args(argv: list[str]) -> argparse.Namespace:
    tokens = [normalise_flag(token) for token in argv]
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
    # BooleanOptionalAction, as vLLM declares its boolean flags: the last of
    # --enable-sleep-mode / --no-enable-sleep-mode wins.
    parser.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False)
    # Kept as text: the value only shapes an error message, and a value the stand-in
    # cannot read must not turn a command line it used to accept into an error.
    parser.add_argument("--gpu-memory-utilization")
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
    try:
        args.gpu_memory_utilization = float(args.gpu_memory_utilization or 0.9)
    except ValueError:
        args.gpu_memory_utilization = 0.9
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


# --------------------------------------------------------------------------- GPU and sleep


def cuda_oom_message(gpu_memory_utilization: float) -> str:
    total = 23.55
    return (
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate "
        f"{total * gpu_memory_utilization:.2f} GiB. GPU 0 has a total capacity of "
        f"{total:.2f} GiB of which 1.02 GiB is free. "
        "Of the allocated memory 21.87 GiB is allocated by PyTorch."
    )


class GpuLock:
    """The one simulated GPU: an exclusive flock on a file every engine can see.

    Engines on one host share the file through a volume; an awake engine holds the lock
    the way a real one holds most of the GPU's memory, so a second engine that wants the
    GPU while the first is awake fails as vLLM does, with CUDA out of memory.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            # Never blocking: a real allocation fails at once when memory is taken, it
            # does not wait for another process to free it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            # The lock belongs to this open file description; closing it lets go.
            os.close(fd)


class EngineState:
    """What vLLM's executor knows about sleep: which tags sleep, and whether the weights
    on the GPU are still the model's."""

    def __init__(self, sleep_mode: bool, gpu: GpuLock | None) -> None:
        self.sleep_mode = sleep_mode
        self.gpu = gpu
        # Empty when awake. Sleep puts both tags to sleep; wake_up(tags) wakes some, and
        # the engine is awake again only when none is left, as in vLLM's executor.
        self.sleeping_tags: set[str] = set()
        # Level 2 discards the weights: woken, their memory holds garbage until
        # collective_rpc reload_weights fills it again.
        self.weights_discarded = False
        self.falling_asleep = False
        # Bumped by /sleep; a stream that began under an older epoch is aborted.
        self.epoch = 0
        # vLLM's engine core runs utility calls (sleep, wake_up, collective_rpc) one at
        # a time; a second call waits for the first.
        self.transition = threading.Lock()

    @property
    def is_sleeping(self) -> bool:
        return bool(self.sleeping_tags)

    def unfit_to_run(self) -> str | None:
        """Why a forward pass now would crash the engine, or None when it may run."""
        if self.falling_asleep or self.is_sleeping:
            return f"the engine is asleep (sleeping tags: {sorted(self.sleeping_tags)})"
        if self.weights_discarded:
            return "the weights were discarded by sleep level 2 and not reloaded"
        return None


def dev_mode() -> bool:
    raw = os.environ.get("VLLM_SERVER_DEV_MODE", "0")
    # vLLM reads the variable as bool(int(value)): "true" is not a spelling it takes,
    # and the server dies on import with this very error.
    try:
        return bool(int(raw))
    except ValueError:
        die(f"ValueError: invalid literal for int() with base 10: {raw!r}")


# --------------------------------------------------------------------------- HTTP


class EngineServer(ThreadingHTTPServer):
    daemon_threads = True
    # Load tests open many connections at once; the default backlog of 5 would reset some.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        args: argparse.Namespace,
        model_path: str,
        gpu: GpuLock | None = None,
    ):
        self.args = args
        self.model_path = model_path
        self.served_names: list[str] = args.served_model_names
        self.max_model_len: int = args.max_model_len or DEFAULT_MAX_MODEL_LEN
        self.token_delay = env_float("STANDIN_TOKEN_DELAY", 0.01)
        self.created = int(time.time())
        self.unhealthy_until = time.monotonic() + env_float("STANDIN_HEALTH_503_FOR", 0.0)
        self.dev_mode = dev_mode()
        self.sleep_time = env_float("STANDIN_SLEEP_TIME", 0.2)
        self.wake_time = env_float("STANDIN_WAKE_TIME", 0.2)
        self.reload_time = env_float("STANDIN_RELOAD_TIME", 0.2)
        self.engine = EngineState(bool(args.enable_sleep_mode), gpu)
        super().__init__(address, Handler)

    def die_of_engine_failure(self) -> NoReturn:
        # os._exit: the process must go now, from a handler thread, with the others
        # mid-request, as vLLM's server does once its engine core is dead.
        os._exit(1)


# Registered by vLLM only when VLLM_SERVER_DEV_MODE is on; 404 otherwise.
DEV_ROUTES = {
    "/sleep": "POST",
    "/wake_up": "POST",
    "/is_sleeping": "GET",
    "/collective_rpc": "POST",
}


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

    def stream_events(
        self,
        events: Iterator[dict[str, Any]],
        epoch: int,
        abort_event: Callable[[], dict[str, Any]],
    ) -> None:
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
                if self.server.engine.epoch != epoch:
                    # /sleep aborted the request: vLLM ends the stream with
                    # finish_reason "abort" instead of the rest of the answer.
                    self.write_chunk(f"data: {json.dumps(abort_event())}\n\n".encode())
                    break
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

    def dev_route(self, method: str) -> bool:
        """Answer a dev-mode route; False when the path is not one (or dev mode is off)."""
        path, _, query = self.path.partition("?")
        if not self.server.dev_mode or path not in DEV_ROUTES:
            return False
        body = self.read_body() if method == "POST" else b""
        if DEV_ROUTES[path] != method:
            self.send_json(405, {"detail": "Method Not Allowed"})
        elif path == "/sleep":
            self.sleep(parse_qs(query).get("level", ["1"])[-1])
        elif path == "/wake_up":
            self.wake_up(parse_qs(query).get("tags") or None)
        elif path == "/is_sleeping":
            log("INFO: check whether the engine is sleeping")
            self.send_json(200, {"is_sleeping": self.server.engine.is_sleeping})
        else:
            self.collective_rpc(body)
        return True

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if self.dev_route("GET"):
            return
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
        if self.dev_route("POST"):
            return
        route = routes.get(path)
        if route is None:
            self.read_body()
            self.send_json(404, {"detail": "Not Found"})
            return
        body = self.read_json()
        if body is not None:
            route(body)

    # ---- sleep mode

    def internal_error(self, message: str) -> None:
        self.send_json(500, error_body(message, "InternalServerError", 500))

    def sleep(self, raw_level: str) -> None:
        engine = self.server.engine
        try:
            level = int(raw_level)
        except ValueError:
            self.internal_error(f"invalid literal for int() with base 10: {raw_level!r}")
            return
        if not engine.sleep_mode:
            log("ERROR: Sleep mode is not enabled in the model config", err=True)
            self.internal_error("Sleep mode is not enabled in the model config")
            return
        with engine.transition:
            if engine.is_sleeping:
                log("WARNING: Executor is already sleeping.", err=True)
                self.send_empty(200)
                return
            started = time.monotonic()
            engine.falling_asleep = True
            engine.epoch += 1
            time.sleep(max(self.server.sleep_time, 0.0))
            engine.sleeping_tags = {"weights", "kv_cache"}
            # Level 1 backs the weights up in CPU memory; any other level drops them
            # (vLLM offloads only for level 1).
            if level != 1:
                engine.weights_discarded = True
            engine.falling_asleep = False
            if engine.gpu is not None:
                engine.gpu.release()
            log(f"INFO: It took {time.monotonic() - started:.6f} seconds to fall asleep.")
        self.send_empty(200)

    def wake_up(self, tags: list[str] | None) -> None:
        engine = self.server.engine
        log(f"INFO: wake up the engine with tags: {tags}")
        with engine.transition:
            if not engine.is_sleeping:
                log("WARNING: Executor is not sleeping.", err=True)
                self.send_empty(200)
                return
            for tag in tags or []:
                if tag not in engine.sleeping_tags:
                    # vLLM ignores the whole call then, and still answers 200.
                    log(
                        f"WARNING: Tag {tag} is not in sleeping tags {engine.sleeping_tags}",
                        err=True,
                    )
                    self.send_empty(200)
                    return
            if engine.gpu is not None and not engine.gpu.acquire():
                message = cuda_oom_message(self.server.args.gpu_memory_utilization)
                log(f"ERROR: wake_up failed: {message}", err=True)
                self.internal_error(message)
                return
            started = time.monotonic()
            time.sleep(max(self.server.wake_time, 0.0))
            woken = set(tags) if tags else set(engine.sleeping_tags)
            engine.sleeping_tags -= woken
            log(
                f"INFO: It took {time.monotonic() - started:.6f} seconds to wake up tags "
                f"{sorted(woken)}."
            )
        self.send_empty(200)

    def collective_rpc(self, raw: bytes) -> None:
        engine = self.server.engine
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            self.send_json(400, {"detail": f"JSON decode error: {exc}"})
            return
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            self.send_json(400, {"detail": "Missing 'method' in request body"})
            return
        if method != "reload_weights":
            self.internal_error(f"the stand-in engine does not implement {method!r}")
            return
        with engine.transition:
            if "weights" in engine.sleeping_tags:
                # The stand-in's own answer: in vLLM this writes into unmapped memory.
                # Refusing keeps the mistake visible without a crash that hides it.
                self.internal_error("reload_weights while the weights are asleep")
                return
            time.sleep(max(self.server.reload_time, 0.0))
            engine.weights_discarded = False
            log("INFO: Reloading weights inplace...")
        # One result per worker, and reload_weights returns None.
        self.send_json(200, {"results": [None]})

    def ready_to_run(self) -> int:
        """The epoch a generation runs in; crashes the engine if it cannot run now.

        vLLM has no guard here: a request reaching a sleeping engine runs kernels on
        freed memory and the engine core dies (vllm-project/vllm#15483). After level 2
        without reload_weights vLLM answers with gibberish instead (#29341); the stand-in
        dies there too, because gibberish would pass unnoticed in a test.
        """
        engine = self.server.engine
        reason = engine.unfit_to_run()
        if reason is None:
            return engine.epoch
        log(f"ERROR: EngineCore encountered a fatal error ({reason}).", err=True)
        log("RuntimeError: CUDA error: an illegal memory access was encountered", err=True)
        log(
            "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above) for the root cause.",
            err=True,
        )
        self.send_json(
            500,
            error_body(
                "EngineCore encountered an issue. See stack trace (above) for the root cause.",
                "EngineDeadError",
                500,
            ),
        )
        log("ERROR: Engine core is dead, terminating server process", err=True)
        self.server.die_of_engine_failure()

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
        epoch = self.ready_to_run()
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

        abort = {**common, "object": "chat.completion.chunk"}
        abort["choices"] = [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "abort"}]
        self.stream_events(events(), epoch, lambda: abort)

    def completions(self, body: dict[str, Any]) -> None:
        epoch = self.ready_to_run()
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

        abort_choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": "abort"}
        abort = {**common, "choices": [abort_choice]}
        self.stream_events(events(), epoch, lambda: abort)

    def embeddings(self, body: dict[str, Any]) -> None:
        self.ready_to_run()
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
    # vLLM takes its time to shut its engine down and free the GPU; the simulated GPU's
    # lock goes only with the process.
    time.sleep(env_float("STANDIN_EXIT_TIME", 0.0))
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
    # vLLM reads the variable when its server module is imported, before any loading.
    if dev_mode():
        log(
            "WARNING: SECURITY WARNING: Development endpoints are enabled! "
            "This should NOT be used in production!",
            err=True,
        )

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
        die(cuda_oom_message(args.gpu_memory_utilization))

    gpu_path = os.environ.get("STANDIN_GPU_LOCK", "").strip()
    gpu = GpuLock(gpu_path) if gpu_path else None
    try:
        got_gpu = gpu is None or gpu.acquire()
    except OSError as err:
        # A test rig's mistake (the volume not mounted), not something vLLM could do:
        # say so plainly instead of a traceback that looks like an engine failure.
        die(f"ERROR: STANDIN_GPU_LOCK={gpu_path!r} cannot be opened: {err}", 2)
    if not got_gpu:
        # Another engine is awake on the "GPU": its memory is taken.
        log("ERROR: EngineCore failed to start.", err=True)
        die(cuda_oom_message(args.gpu_memory_utilization))

    # Binding only now is the point: vLLM's port stays closed for the whole load, and
    # the orchestrator's readiness logic must cope with connection refused.
    server = EngineServer((args.host, args.port), args, model_path, gpu)
    log(f"INFO: Started server process [{os.getpid()}]")
    log("INFO: Application startup complete.")
    log(f"INFO: Uvicorn running on http://{args.host}:{args.port} (Press CTRL+C to quit)")
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
