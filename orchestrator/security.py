"""Who may talk to the daemon, and from where.

The daemon drives Docker, so a request that makes it start a container is as good as
root on the host. Every request passes one guard before its handler, in this order:

1. **Host.** On a loopback bind, the ``Host`` header must name the loopback (or a name
   in ``allowed_hosts``): a DNS-rebinding page reaches 127.0.0.1 under its own name.
2. **Origin.** A browser names the page that sent a request in ``Origin`` and says in
   ``Sec-Fetch-Site`` whether it came from another site. Only the daemon's own origin
   and those in ``allowed_origins`` pass; the listed ones get CORS answers.
3. **Key.** With keys set, changes and ``/v1`` (and with ``protect_reads`` every
   route but the probes) need one, compared in constant time and never logged.
4. **Content type.** A request that changes something must say its body is JSON. A
   browser sends ``text/plain``, forms and multipart across origins without asking
   first (no CORS preflight), and nothing else.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog
from aiohttp import web

from .errors import Forbidden, OrchestratorError, Unauthorized, UnsupportedMediaType

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

KEY_FILE = "api-key"
PROBE_PATHS = frozenset({"/health", "/health/live"})
# A load balancer probes thousands of times a second with the same one or two Host
# headers; the verdict on each is kept. Names are the client's to choose, so only this
# many are kept and the rest are judged afresh each time.
HOST_VERDICTS = 64
CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PROBE_METHODS = frozenset({"GET", "HEAD"})
# The dashboard's own files hold no data; a browser cannot send a key when it opens a page.
PAGE_PATHS = frozenset({"/"})
PAGE_PREFIX = "/ui/"
# OpenAI's upload endpoints (speech to text) take multipart bodies. Only a client that
# is not a browser may send one: a browser always names its page in Origin on a POST.
MULTIPART_PREFIX = "/v1/audio/"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
        " connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_CORS_METHODS = "GET, POST, PATCH, DELETE, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-Api-Key"
_CORS_MAX_AGE = "600"

_CORS_ORIGIN = web.RequestKey[str | None]("cors_origin")
KEY_INDEX = web.RequestKey[int | None]("key_index")


def is_loopback(host: str) -> bool:
    """Whether a bind address or a Host name stands for this machine's loopback."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _split_host(value: str) -> tuple[str, int | None]:
    """A Host header as (name, port); the port is None when not given."""
    parsed = urlsplit(f"//{value.strip()}")
    try:
        port = parsed.port
    except ValueError:
        port = -1  # a malformed port never equals a real one
    return (parsed.hostname or "").rstrip(".").lower(), port


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    parsed = urlsplit(origin.strip())
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        return None  # "null" (sandboxed frames, files) and anything odd
    try:
        port = parsed.port
    except ValueError:
        return None
    default = 443 if parsed.scheme == "https" else 80
    return parsed.scheme, parsed.hostname.rstrip(".").lower(), port or default


def normalise_origin(origin: str) -> str:
    """An origin as browsers send it: scheme://host[:port], no path, no trailing slash."""
    parts = _origin_parts(origin)
    if parts is None:
        raise ValueError(f"{origin!r} is not an origin such as http://webui.lan:3000")
    scheme, host, port = parts
    default = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    return f"{scheme}://{shown}" if port == default else f"{scheme}://{shown}:{port}"


def is_own_origin(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin is the page the daemon itself served (its dashboard)."""
    parts = _origin_parts(origin)
    if parts is None:
        return False
    scheme, host, port = parts
    own_host, own_port = _split_host(host_header)
    # Behind a TLS proxy the browser says https while the daemon sees plain http; the
    # name and port still have to be the ones the browser used to reach us.
    default = 443 if scheme == "https" else 80
    return host == own_host and port == (own_port or default)


@dataclass(frozen=True)
class AccessPolicy:
    keys: tuple[bytes, ...] = ()
    loopback_bind: bool = True
    allowed_hosts: frozenset[str] = frozenset()
    allowed_origins: frozenset[str] = frozenset()
    protect_reads: bool = False
    _host_verdicts: dict[str, bool] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @classmethod
    def build(
        cls,
        *,
        keys: Sequence[str],
        bind_host: str,
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
        protect_reads: bool = False,
    ) -> AccessPolicy:
        return cls(
            keys=tuple(key.encode() for key in keys),
            loopback_bind=is_loopback(bind_host),
            allowed_hosts=frozenset(h.strip().rstrip(".").lower() for h in allowed_hosts),
            allowed_origins=frozenset(normalise_origin(o) for o in allowed_origins),
            protect_reads=protect_reads,
        )

    def host_allowed(self, host_header: str | None) -> bool:
        if not self.loopback_bind or host_header is None:
            # Off the loopback the key is the guard; HTTP/1.0 clients may send no Host.
            return True
        verdict = self._host_verdicts.get(host_header)
        if verdict is None:
            name, _port = _split_host(host_header)
            verdict = is_loopback(name) or name in self.allowed_hosts
            if len(self._host_verdicts) < HOST_VERDICTS:
                self._host_verdicts[host_header] = verdict
        return verdict

    def needs_key(self, request: web.Request) -> bool:
        if not self.keys or request.path in PROBE_PATHS:
            return False
        if self.protect_reads:
            return not is_page(request.path)
        return is_gateway_path(request.path) or request.method not in {"GET", "HEAD", "OPTIONS"}


def is_gateway_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def is_page(path: str) -> bool:
    return path in PAGE_PATHS or path.startswith(PAGE_PREFIX)


def presented_key(request: web.Request) -> str | None:
    authorization = request.headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key") or None


def matching_key(given: str | None, keys: Sequence[bytes]) -> int:
    """The index of the key ``given`` is; raises unless it is one. Constant time."""
    if given is None:
        raise Unauthorized(
            "an API key is required: send it as 'Authorization: Bearer <key>' or 'x-api-key'"
        )
    given_bytes = given.encode()
    # Every key is compared, so the time taken says nothing about which one came close.
    found = -1
    for index, key in enumerate(keys):
        if hmac.compare_digest(given_bytes, key):
            found = index
    if found < 0:
        raise Forbidden("the API key is not valid")
    return found


def _check_origin(policy: AccessPolicy, request: web.Request) -> str | None:
    """Refuse a request a foreign page sent; the origin to answer CORS for, if any."""
    origin = request.headers.get("Origin")
    if origin is not None and _origin_parts(origin) is not None:
        normalised = normalise_origin(origin)
        if normalised in policy.allowed_origins:
            return normalised
    navigation = request.method in {"GET", "HEAD"} and (
        request.headers.get("Sec-Fetch-Mode") == "navigate"
    )
    if request.headers.get("Sec-Fetch-Site") == "cross-site" and not navigation:
        raise Forbidden(
            "requests from other sites' pages are refused; add the page's origin to"
            " allowed_origins to let a browser app call the daemon",
            origin=origin,
        )
    if origin is not None and not is_own_origin(origin, request.host):
        raise Forbidden(
            f"requests from the page {origin} are refused; add it to allowed_origins"
            " to let a browser app there call the daemon",
            origin=origin,
        )
    return None


def _check_content_type(request: web.Request) -> None:
    if request.method not in CHANGING_METHODS:
        return
    kind = request.content_type  # aiohttp's default for a missing header: octet-stream
    if kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json")):
        return
    if (
        kind == "multipart/form-data"
        and request.path.startswith(MULTIPART_PREFIX)
        and "Origin" not in request.headers
    ):
        return
    given = request.headers.get("Content-Type")
    raise UnsupportedMediaType(
        "send the body as JSON with 'Content-Type: application/json'"
        + (f" (got {given!r})" if given else " (no Content-Type was given)")
        + "; the daemon refuses other bodies so that web pages cannot post to it"
    )


def _preflight(origin: str) -> web.Response:
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": _CORS_METHODS,
            "Access-Control-Allow-Headers": _CORS_HEADERS,
            "Access-Control-Max-Age": _CORS_MAX_AGE,
            "Vary": "Origin",
        },
    )


def guard_middleware(policy: AccessPolicy) -> Any:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            early = _admit(policy, request)
        except OrchestratorError as err:
            # Who knocked and why it was refused, for the operator; never the key itself.
            log.info(
                "request refused",
                code=err.code,
                method=request.method,
                path=request.path,
                client=request.remote,
                origin=request.headers.get("Origin"),
                host=request.headers.get("Host"),
            )
            raise
        return early if early is not None else await handler(request)

    return guard


def is_plain_probe(
    policy: AccessPolicy, method: str, path: str, headers: Mapping[str, str]
) -> bool:
    """A load balancer's probe, which every check here lets through: a read of a probe
    path, under an allowed Host, that no page sent. ``headers`` by their usual names."""
    # No Origin, no Sec-Fetch-Site: no page sent it, so there is no CORS to answer;
    # probes need no key, and a read has no body to check.
    return (
        method in _PROBE_METHODS
        and path in PROBE_PATHS
        and "Origin" not in headers
        and "Sec-Fetch-Site" not in headers
        and policy.host_allowed(headers.get("Host"))
    )


def _admit(policy: AccessPolicy, request: web.Request) -> web.Response | None:
    """Raise unless the request may reach its handler; the answer to a CORS preflight."""
    headers = request.headers
    if not policy.host_allowed(headers.get("Host")):
        raise Forbidden(
            f"the Host {headers.get('Host')!r} is not this daemon's loopback"
            " name; add it to allowed_hosts if you reach the daemon under that name",
        )
    if is_plain_probe(policy, request.method, request.path, headers):
        return None  # what the steps below would conclude, sooner
    origin = _check_origin(policy, request)
    request[_CORS_ORIGIN] = origin
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if origin is None:
            raise Forbidden("CORS preflight from an origin that is not in allowed_origins")
        return _preflight(origin)
    request[KEY_INDEX] = None
    if policy.needs_key(request):
        request[KEY_INDEX] = matching_key(presented_key(request), policy.keys)
    _check_content_type(request)
    return None


async def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """CORS for listed origins and the page headers; runs for streams too, before they start."""
    origin = request.get(_CORS_ORIGIN)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
    if is_page(request.path):
        response.headers.update(PAGE_HEADERS)


def audit(request: web.Request, action: str, **fields: Any) -> None:
    """One log line per change: who (address, key index, never the key) did what."""
    log.info(
        "audit",
        action=action,
        client=request.remote,
        key_index=request.get(KEY_INDEX),
        **fields,
    )


# --- keys at start ---------------------------------------------------------------------


def generated_key(state_dir: Path) -> tuple[str, Path, bool]:
    """The key kept in ``<state-dir>/api-key``, made (0600) at first use.

    Returns the key, the file and whether it was made now.
    """
    path = state_dir / KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    if key:
        return key, path, False
    key = secrets.token_urlsafe(32)
    state_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(key + "\n")
    return key, path, True


def keys_for_bind(
    *, host: str, keys: Sequence[str], state_dir: Path, insecure_no_auth: bool
) -> tuple[str, ...]:
    """The keys to serve with: a bind off the loopback never serves without one."""
    if keys or is_loopback(host):
        return tuple(keys)
    if insecure_no_auth:
        log.warning(
            "serving without API keys on a non-loopback address: anyone who can reach"
            " this port can run containers on this host",
            host=host,
        )
        return ()
    key, path, made = generated_key(state_dir)
    log.warning(
        "no API keys set for a non-loopback bind; requiring the key in the key file",
        host=host,
        key_file=str(path),
        generated=made,
    )
    return (key,)
