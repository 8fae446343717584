"""An HAProxy 2.6 configuration for a fleet of daemons, one per GPU (``haproxy-config``).

HAProxy does the routing, the checks and the failover; this module only writes what it
should do, from what each daemon says of its models (``GET /models``) and its agent
check (``GET /status``):

- one frontend for ``/v1`` that buffers the body and reads the model from it
  (``json_query('$.model')``), else from the ``model`` query parameter;
- per model, a backend of every daemon that has it, each checked with
  ``/health?model=X``: only daemons holding X, ready, pass;
- per model, a fallback used while no daemon holds X: the same daemons checked with
  ``/health?model=X&can_switch=true`` (would switch to X now), the first choice kept (a
  stick table) so that X's requests meet on one daemon instead of swapping two. The
  servers are listed from a different daemon for each model, so that models asked for at
  the same time start on different daemons;
- ``/v1/models``, requests that name no known model, and requests for a model that no
  daemon holds or is free to switch to go to any live daemon (which queues and switches).

Names from the daemons are data: a model id, served name or alias goes into the
configuration only if it is made of ``[A-Za-z0-9._:/-]`` (ids of ``[A-Za-z0-9._-]``,
which also names backends); anything else is refused or left out, never escaped into
HAProxy's syntax. API keys are not written anywhere: HAProxy forwards each client's
``Authorization`` header unchanged.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from string import Template
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ConfigError

# What may reach the configuration: routing names, and ids (which also name backends).
NAME = re.compile(r"[A-Za-z0-9._:/-]{1,200}")
MODEL_ID = re.compile(r"[A-Za-z0-9._-]{1,100}")
HOST = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")
# Added to the largest startup_timeout for timeout server: a drain (drain_timeout, 60 s
# by default) and the old model's stop come before a cold start.
SWAP_MARGIN = 120
# Bodies are buffered up to this size to read their model; a larger body (a chat with big
# images) is routed as if it named none: any daemon takes it and switches there.
BODY_BUFFER = 1024 * 1024


class DaemonModel(BaseModel):
    """What the generator reads of one model in a daemon's ``GET /models``."""

    model_config = ConfigDict(extra="ignore")

    id: str
    served_name: str
    aliases: list[str] = Field(default_factory=list)
    startup_timeout: float = Field(default=900.0, gt=0)
    enabled: bool = True


class DaemonAgent(BaseModel):
    model_config = ConfigDict(extra="ignore")

    host: str
    port: int = Field(ge=1, le=65535)


@dataclass(frozen=True)
class FleetDaemon:
    """One daemon as the configuration sees it: where it is and what it can serve."""

    url: str
    models: tuple[DaemonModel, ...]
    agent: DaemonAgent | None = None

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        shown = f"[{host}]" if ":" in host else host
        if parts.scheme != "http" or not HOST.fullmatch(shown) or parts.port is None:
            raise ConfigError(
                f"--daemon {self.url}: give it as http://HOST:PORT (HAProxy talks plain HTTP"
                " to the daemons; put TLS in front of HAProxy)"
            )
        return f"{shown}:{parts.port}"


@dataclass(frozen=True)
class FleetOptions:
    listen: str = ":8000"
    check_interval_ms: int = 1000
    stats_socket: str | None = None
    agent_port: int | None = None  # for daemons whose /status names none


@dataclass
class _Model:
    id: str
    names: list[str] = field(default_factory=list)
    daemons: list[int] = field(default_factory=list)  # indexes into the fleet
    startup_timeout: float = 0.0


def parse_daemon(url: str, models: object, status: Mapping[str, object]) -> FleetDaemon:
    """A daemon from its /models and /status answers; ConfigError when they do not parse."""
    try:
        listed = [DaemonModel.model_validate(m) for m in models] if isinstance(models, list) else []
        raw_agent = status.get("agent")
        agent = None if raw_agent is None else DaemonAgent.model_validate(raw_agent)
    except ValidationError as err:
        raise ConfigError(f"{url} answered /models or /status unexpectedly: {err}") from err
    if not isinstance(models, list):
        raise ConfigError(f"{url}/models holds no list of models")
    return FleetDaemon(url=url, models=tuple(listed), agent=agent)


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--listen {value!r}: give [HOST]:PORT, such as :8000 or 127.0.0.1:8000")
    if host and not HOST.fullmatch(host) and host != "*":
        raise ConfigError(f"--listen {value!r}: {host!r} is not an address")
    return value


def _models(daemons: Sequence[FleetDaemon], warnings: list[str]) -> list[_Model]:
    """Every model of the fleet with the names requests may use for it; a name two models
    claim, or one HAProxy could misread, is left out with a warning."""
    by_id: dict[str, _Model] = {}
    for index, daemon in enumerate(daemons):
        for model in daemon.models:
            if not MODEL_ID.fullmatch(model.id):
                raise ConfigError(
                    f"{daemon.url} has a model id {model.id!r} that cannot name an HAProxy"
                    " backend; ids are letters, digits, '.', '_' and '-'"
                )
            entry = by_id.setdefault(model.id, _Model(model.id, [model.id]))
            entry.daemons.append(index)
            entry.startup_timeout = max(entry.startup_timeout, model.startup_timeout)
            for name in [model.served_name, *model.aliases]:
                if not NAME.fullmatch(name):
                    warnings.append(
                        f"{daemon.url}: {model.id}'s name {name!r} is left out of the routing"
                        " (only letters, digits and . _ : / - are routed); requests under it"
                        " go to any daemon"
                    )
                elif name not in entry.names:
                    entry.names.append(name)
    owner: dict[str, str] = {}
    for entry in sorted(by_id.values(), key=lambda m: m.id):
        for name in list(entry.names):
            other = owner.setdefault(name, entry.id)
            if other != entry.id:
                if name == entry.id:
                    raise ConfigError(f"{name!r} is both a model id and a name of {other}")
                entry.names.remove(name)
                warnings.append(f"{name!r} names both {other} and {entry.id}; routed to {other}")
    return sorted(by_id.values(), key=lambda m: m.id)


_FRAME = Template("""\
# Generated by `model-orchestrator haproxy-config` for HAProxy 2.6; generate it again when
# the daemons' models change. Daemons:
$daemon_list
global
    log stdout format raw local0 info
    maxconn 4096
    # Bodies are read to route by their model; a larger one is routed as naming none.
    tune.bufsize $bufsize
$stats
defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 5s
    timeout check 2s
    # Bodies as slow as the daemon allows on /v1 (120 s).
    timeout http-request 120s
    # Long enough for a cold swap: the largest startup_timeout ($largest s) plus a drain.
    timeout client ${timeout}s
    timeout server ${timeout}s
    # A daemon that refuses a connection (killed, restarting) is marked down at once and
    # the request tried again elsewhere in its backend.
    retries 2
    option redispatch 1
    default-server $default_server
    # Errors of HAProxy's own in the shape OpenAI clients read.
$errors
frontend v1
    bind $listen
    # Wait for the body (up to tune.bufsize) so that its model can be read.
    option http-buffer-request
    acl v1 path_beg /v1/
    http-request return status 404 content-type application/json string '$not_v1' unless v1
    http-request set-var(txn.model) req.body,json_query('$$.model')
    http-request set-var(txn.model) url_param(model) unless { var(txn.model) -m found }
    # Which daemon and backend answered; the Authorization header is forwarded as sent.
    http-response set-header X-Orchestrator-Daemon %s
    http-response set-header X-Orchestrator-Backend %b
    use_backend daemons if { path /v1/models }
$routes
    # No daemon holds the model and none is free to switch to it now (each is busy or
    # swapping, or the checks have not seen the end of a swap yet): any live daemon
    # queues the request and switches when it can, rather than a 503 here.
    default_backend daemons

# /v1/models, requests that name no model the fleet knows, and the last resort above.
backend daemons
    balance leastconn
    # A model sent here goes where it went before, not to whichever daemon is least busy.
    stick-table type string len 128 size 10k expire 1h
    stick on var(txn.model)
    option httpchk GET /health/live
    http-check expect status 200
$any_servers
$backends""")

_ERRORS = {
    502: ("server_error", "bad_gateway", "the daemon closed the connection; try again"),
    503: (
        "server_error",
        "no_daemon",
        "no daemon can take this model now (none holds it, and none is free to switch);"
        " try again shortly",
    ),
    504: ("server_error", "timeout", "the daemon did not answer within the balancer timeout"),
}


def _openai_error(kind: str, code: str, message: str) -> str:
    # Our own fixed words only: no quote may end HAProxy's '...' string early.
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    assert "'" not in body
    return body


def _error_lines() -> str:
    json_type = "content-type application/json"
    return "\n".join(
        f"    http-error status {status} {json_type} string '{_openai_error(*words)}'"
        for status, words in _ERRORS.items()
    )


def _server(name: str, daemon: FleetDaemon, options: FleetOptions, warnings: list[str]) -> str:
    # weight 100: the agent's percentages then show as they are in HAProxy's stats.
    line = f"    server {name} {daemon.address} weight 100 check"
    agent_host, agent_port = None, options.agent_port
    if daemon.agent is not None:
        agent_host, agent_port = daemon.agent.host, daemon.agent.port
    if agent_port is None:
        return line
    agent_host = agent_host or urlsplit(daemon.url).hostname or ""
    if agent_host in {"0.0.0.0", "::", ""}:
        agent_host = urlsplit(daemon.url).hostname or ""
    shown = f"[{agent_host}]" if ":" in agent_host else agent_host
    if not HOST.fullmatch(shown):
        warnings.append(f"{daemon.url}: agent host {agent_host!r} is not an address; no agent")
        return line
    return (
        f"{line} agent-check agent-addr {agent_host} agent-port {agent_port}"
        f" agent-inter {options.check_interval_ms}ms"
    )


def render(daemons: Sequence[FleetDaemon], options: FleetOptions) -> tuple[str, list[str]]:
    """The configuration, and warnings for the user (names left out, no agent check)."""
    if not daemons:
        raise ConfigError("give at least one --daemon URL")
    if options.check_interval_ms < 10:
        raise ConfigError("--check-interval must be at least 10 ms")
    warnings: list[str] = []
    models = _models(daemons, warnings)
    names = [f"daemon{i + 1}" for i in range(len(daemons))]
    servers = [_server(names[i], d, options, warnings) for i, d in enumerate(daemons)]
    live = [f"    server {names[i]} {d.address} weight 100 check" for i, d in enumerate(daemons)]
    for index, daemon in enumerate(daemons):
        if daemon.agent is None and options.agent_port is None:
            warnings.append(
                f"{daemon.url} has no agent check (agent_port) and no --agent-port was given:"
                " its weight will not follow its load"
            )
        elif not daemon.models:
            warnings.append(f"{names[index]} ({daemon.url}) lists no models")
    largest = max((m.startup_timeout for m in models), default=900.0)
    routes, backends = [], []
    for number, model in enumerate(models):
        acl = f"want_{model.id}"
        patterns = " ".join(model.names)
        routes += [
            f"    acl {acl} var(txn.model) -m str -- {patterns}",
            f"    use_backend model_{model.id} if {acl} {{ nbsrv(model_{model.id}) gt 0 }}",
            f"    use_backend fallback_{model.id} if {acl} {{ nbsrv(fallback_{model.id}) gt 0 }}",
        ]
        own = [servers[i] for i in model.daemons]
        # Without the agent: it drains a daemon for the whole of a switch, the one to X
        # too, which would hide the daemon loading X from X's own fallback; and the
        # daemons this backend may choose have nothing in flight, so the same weight.
        # A different first daemon for each model: models asked for at once start apart.
        plain = [live[i] for i in model.daemons]
        start = number % len(plain)
        rotated = plain[start:] + plain[:start]
        backends.append(
            "\n".join(
                [
                    f"# {model.id}: the daemons that hold it, ready.",
                    f"backend model_{model.id}",
                    "    balance leastconn",
                    f"    option httpchk GET /health?model={model.id}",
                    "    http-check expect status 200",
                    *own,
                    "",
                    f"# {model.id} held by none: a daemon that would switch to it now; the"
                    " first choice is kept while it still passes.",
                    f"backend fallback_{model.id}",
                    "    balance roundrobin",
                    "    stick-table type integer size 1 expire 1h",
                    "    stick on int(1)",
                    f"    option httpchk GET /health?model={model.id}&can_switch=true",
                    "    http-check expect status 200",
                    *rotated,
                    "",
                ]
            )
        )
    stats = ""
    if options.stats_socket is not None:
        if not re.fullmatch(r"[A-Za-z0-9._/-]+", options.stats_socket):
            raise ConfigError("--stats-socket must be a plain path (letters, digits, . _ / -)")
        stats = f"    stats socket {options.stats_socket} mode 600 level admin\n"
    daemon_list = "\n".join(f"#   {names[i]}: {d.url}" for i, d in enumerate(daemons))
    interval = f"{options.check_interval_ms}ms"
    text = _FRAME.substitute(
        daemon_list=daemon_list,
        bufsize=BODY_BUFFER,
        stats=stats,
        largest=f"{largest:g}",
        timeout=math.ceil(largest) + SWAP_MARGIN,
        default_server=(
            f"inter {interval} fastinter {interval} downinter {interval} rise 1 fall 1"
            " observe layer4 error-limit 1 on-error mark-down"
        ),
        not_v1=_openai_error(
            "not_found_error",
            "not_found",
            "only /v1 is served here; reach each daemon for its control API",
        ),
        errors=_error_lines(),
        listen=_listen(options.listen),
        routes="\n".join(routes),
        any_servers="\n".join(live),
        backends="\n".join(backends),
    )
    return text, warnings
