"""What the HTTP API answers, as pydantic models: one source for the answers and the document.

Handlers build these from the daemon's parts and send ``to_json()``; the OpenAPI
document's answer schemas are generated from the same classes. Fields carry their wire
names, but for a switch's "from" and "to", which Python keeps for itself (aliases).
Times are held as Unix time and sent as ISO 8601, but a pending switch's, which has
always been sent as a number.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
)

from . import __version__
from .cache import VerdictStatus
from .docker import ContainerInfo
from .errors import OrchestratorError
from .history import Kind, Operation, Outcome, SwitchRecord
from .pull import PullProgress as Download
from .pull import PullState
from .registry import Origin
from .states import Residency, State

if TYPE_CHECKING:
    from .traffic import TrafficSnapshot


class Answer(BaseModel):
    # Every field is always sent, defaults included: the document marks them all required.
    model_config = ConfigDict(
        from_attributes=True, json_schema_serialization_defaults_required=True
    )

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, UTC).isoformat()


# Held as Unix time, sent as ISO 8601.
Timestamp = Annotated[
    float,
    PlainSerializer(_iso, return_type=str),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def _as_text(value: Any) -> Any:
    return str(value) if isinstance(value, PurePath) else value


# A folder on the daemon's host, sent as its path (JSON Schema knows no path format).
Folder = Annotated[str, BeforeValidator(_as_text)]
# Rounded to the millisecond: finer is noise in a switch that takes seconds.
Seconds = Annotated[float, Field(ge=0), AfterValidator(lambda seconds: round(seconds, 3))]


# --- errors -------------------------------------------------------------------------------


class ErrorDetail(Answer):
    """What went wrong. Extra fields where they help: field, model, switch_id, log_tail,
    rolled_back, repo, cache_path, path, origin, retry_after."""

    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class Error(Answer):
    """Every error of the control API."""

    error: ErrorDetail

    @classmethod
    def of(cls, err: OrchestratorError) -> Error:
        return cls.model_validate(
            {"error": {"code": err.code, "message": err.message, **err.details}}
        )


class OpenAIErrorDetail(Answer):
    """What went wrong; param names the field at fault, when one is."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Answer):
    """Every error of /v1, in the shape OpenAI's clients parse."""

    error: OpenAIErrorDetail


# --- switches -----------------------------------------------------------------------------


class PendingSwitch(Answer):
    """A switch or stop accepted and not finished yet."""

    id: str
    kind: Kind
    model: str | None
    outcome: Outcome
    requested_at: float = Field(description="Unix time")

    @classmethod
    def of(cls, op: Operation) -> PendingSwitch:
        return cls.model_validate(op)


class Switch(Answer):
    """A switch or stop as recorded in the history."""

    id: str
    kind: Kind
    from_model: str | None = Field(serialization_alias="from")
    to_model: str | None = Field(serialization_alias="to")
    requested_at: Timestamp
    finished_at: Timestamp | None
    outcome: Outcome
    duration: Seconds | None
    error: ErrorDetail | None
    timings: dict[str, float] | None = Field(
        description="Seconds per phase: drain, stop, sleep, wake, up, ready, ..."
    )
    path: Literal["warm", "cold"] | None = Field(
        description="warm: the model was woken from sleep; cold: its container started"
    )

    @classmethod
    def of(cls, record: SwitchRecord) -> Switch:
        return cls.model_validate(record)


# --- models -------------------------------------------------------------------------------


class Container(Answer):
    """A model's engine container, as Docker last reported it."""

    id: str
    name: str
    state: str
    exit_code: int | None

    @classmethod
    def of(cls, info: ContainerInfo) -> Container:
        return cls(id=info.id[:12], name=info.name, state=info.status, exit_code=info.exit_code)


class CacheVerdict(Answer):
    """Whether the model's weights are on disk, and if not, why."""

    repo: str
    status: VerdictStatus
    path: Folder | None
    reason: str
    revision: str
    commit: str | None
    size_bytes: int = Field(ge=0)
    problems: list[str]


class PullProgress(Answer):
    """A download of the model's repo into the Hub cache."""

    repo: str
    revision: str
    files_total: int = Field(ge=0)
    files_done: int = Field(ge=0)
    bytes_total: int = Field(ge=0)
    bytes_done: int = Field(ge=0)
    state: PullState
    error: str | None
    fraction: float | None = Field(ge=0, description="bytes_done / bytes_total, once known")

    @classmethod
    def of(cls, progress: Download) -> PullProgress:
        return cls.model_validate(progress.to_json())


class Source(Answer):
    """What a model added through the API loads: a Hub repo or a folder."""

    repo: str | None
    path: str | None


class Model(Answer):
    """A model, its container and cache verdict, and what the registry knows of it."""

    id: str
    display_name: str
    repo: str | None
    served_name: str
    services: list[str]
    engine_service: str
    active: bool
    residency: Residency = Field(
        description="awake: on the GPU; asleep: in vLLM's sleep mode, ready to wake; stopped"
    )
    sleep: Literal[1, 2] | None = Field(description="vLLM sleep level when switched away from")
    container: Container | None
    upstream: str | None
    started_at: Timestamp | None
    uptime: float | None = Field(description="Seconds since the engine started")
    checkpoint: Folder | None
    startup_timeout: float = Field(description="Seconds a start may take before it fails")
    aliases: list[str] = Field(description="Other names /v1 requests may use for it")
    cache: CacheVerdict | None
    pull: PullProgress | None
    origin: Origin
    enabled: bool
    source: Source | None = Field(description="Only for a model added through the API")
    image: str | None = Field(description="None: the daemon's engine_image")
    engine: dict[str, Any]
    capabilities: dict[str, Any]
    defaults: dict[str, Any]
    metadata: dict[str, str]
    created_at: Timestamp
    updated_at: Timestamp


class GatewayTraffic(Answer):
    """The gateway's requests in flight and waiting, per model."""

    in_flight: dict[str, int]
    waiting: dict[str, int]
    swaps_requested: int = Field(ge=0)
    auto_switch: bool

    @classmethod
    def of(cls, snapshot: TrafficSnapshot) -> GatewayTraffic:
        return cls.model_validate(snapshot)


class WarmPool(Answer):
    """The models asleep, least recently used first, and the pool's limits."""

    asleep: list[str]
    ram_bytes: int = Field(ge=0, description="Host RAM their weights take, as estimated")
    max_asleep: int = Field(ge=0)
    ram_budget_bytes: int | None = Field(description="None: no cap")
    sleep_ttl: Seconds = Field(description="0: a model may sleep for ever")


class Standby(Answer):
    """The models standing by: their containers started behind the start gate, engines
    unrun and holding no GPU, so that a switch to one skips docker's start."""

    models: list[str] = Field(description="Least recently left first")
    limit: int = Field(ge=0, description="The most kept at once (standby); 0: none")


class AgentAddress(Answer):
    """Where the daemon answers HAProxy's agent check (``agent_port``)."""

    host: str
    port: int = Field(ge=1, le=65535)


class Status(Answer):
    """The switcher's state, every model, the queue and the last switch."""

    state: State
    active: str | None
    target: str | None
    since: Timestamp
    reason: str | None
    serving: bool
    upstream: str | None
    queue: list[PendingSwitch]
    models: list[Model]
    last_switch: Switch | None
    warm_pool: WarmPool
    standby: Standby
    pulls: dict[str, PullProgress]
    gateway: GatewayTraffic | None
    agent: AgentAddress | None = Field(description="The agent check's address; None: off")


# --- what each operation answers ------------------------------------------------------------


class SwitchDone(Answer):
    """Done: the switch's record and the new status."""

    switch: Switch
    status: Status


class SwitchAccepted(Answer):
    """Accepted, and under way or waiting its turn."""

    switch: PendingSwitch
    poll: str = Field(description="Where to follow it: /switches/<id>")
    status: Status


class SwitchAnswer(Answer):
    """One switch: pending while it runs, then its record."""

    switch: Switch | PendingSwitch


class SwitchList(Answer):
    """Recent switches, newest first."""

    switches: list[Switch]


class ModelAnswer(Answer):
    """The model."""

    model: Model


class ModelList(Answer):
    """Every model, from the compose file and the registry."""

    models: list[Model]


class Deleted(Answer):
    """Removed."""

    deleted: str = Field(description="The model's id")


class PullStarted(Answer):
    """Started (or already running): progress shows on the model."""

    pull: PullProgress
    poll: str = Field(description="Where to follow it: /models/<id>")


class HealthPass(Answer):
    """A model is ready: the one asked for, if any."""

    status: Literal["pass"] = "pass"
    model: str | None


class HealthSwitchable(Answer):
    """The model asked for is not loaded, but this daemon would switch to it now
    (``can_switch=true``): a balancer may send it the model's requests."""

    status: Literal["pass"] = "pass"
    model: str = Field(description="The model asked for")
    loaded: str | None = Field(description="The model loaded now, which a request would replace")
    output: str


class HealthFail(Answer):
    """Not serving; output says why."""

    status: Literal["fail"] = "fail"
    state: State
    model: str | None
    output: str


class Liveness(Answer):
    """The daemon runs; ``service`` tells it from anything else on the port (``doctor``)."""

    status: Literal["pass"] = "pass"
    service: Literal["model-orchestrator"] = "model-orchestrator"
    version: str = __version__


class ModelLogs(Answer):
    """The engine container's last lines."""

    model: str
    container: str | None
    lines: list[str]


class V1Model(Answer):
    """A model as OpenAI's clients list it, with what the daemon knows of it."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "model-orchestrator"
    display_name: str
    served_name: str
    loaded: bool
    context_length: int | None


class V1ModelList(Answer):
    """Every enabled model, in OpenAI's list shape."""

    object: Literal["list"] = "list"
    data: list[V1Model]
