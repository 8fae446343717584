"""Daemon settings: defaults, then an optional YAML file, then ORCHESTRATOR_* variables, then flags.

pydantic-settings reads the layers and pydantic checks the merged values; a wrong value
is reported with the layer it came from. Per-model settings (display name, health path,
startup timeout, upstream, port) may sit in the file under ``models:``; compose's
``x-orchestrator`` keys are the other place, and the file wins (see
``compose.load_project``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Protocol, get_args, get_origin

import yaml
from pydantic import BeforeValidator, Field, ValidationError, ValidationInfo, field_validator
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails, PydanticCustomError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .compose import ComposeSource, compose_files
from .errors import ConfigError
from .logs import LOG_FORMATS, LOG_LEVELS
from .registry import default_allowed_images
from .security import normalise_origin

ENV_PREFIX = "ORCHESTRATOR_"


DEFAULT_COMPOSE_FILE = Path("compose/docker-compose.yml")

# The file may use the flags' spelling too (compose rather than compose_files).
_SPELLINGS = {"compose": "compose_files", "compose_file": "compose_files", "env_file": "env_files"}
# Nested mappings have no one-variable form: they come from the file (or arguments) alone.
_FILE_ONLY = frozenset({"models", "aliases"})
# How messages name what a setting takes.
_KINDS: dict[object, str] = {
    bool: "bool (true/false, yes/no, on/off, 1/0)",
    int: "int",
    float: "float",
    str: "str",
    Path: "a path",
}
# The file and variables of the load_settings call under way; none for Settings(...) itself,
# which holds its arguments and the defaults.
_LAYERS: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar("_LAYERS", default=())


def _listed(value: Any) -> Any:
    """A variable or flag gives a list as one comma-separated string (k1,k2)."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list | tuple):
        # "a, b," means a and b: blanks around commas and empty items are not values.
        stripped = [item.strip() if isinstance(item, str) else item for item in value]
        return [item for item in stripped if item != ""]
    return value


def _no_bool(value: Any) -> Any:
    # YAML reads yes/no/on/off as booleans, and pydantic would take True for 1.
    if isinstance(value, bool):
        raise PydanticCustomError("number_type", "a boolean is not a number")
    return value


Strings = Annotated[tuple[str, ...], BeforeValidator(_listed)]
Paths = Annotated[tuple[Path, ...], BeforeValidator(_listed)]
Count = Annotated[int, BeforeValidator(_no_bool)]
Seconds = Annotated[float, BeforeValidator(_no_bool)]


class Settings(BaseSettings):
    """The daemon's settings; ``load_settings`` fills them from the layers.

    Built directly, as ``Settings(port=1)``, it holds its arguments and the defaults and
    reads nothing from the environment.
    """

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        # `engine_gpus: 2` and `api_keys: [12345]` are strings to the daemon.
        coerce_numbers_to_str=True,
    )

    # The user's compose files, as `docker compose -f` takes them; none: COMPOSE_FILE, else
    # compose/docker-compose.yml. One default-named file brings its override file along.
    compose_files: Paths = ()
    # Files compose reads variables from, as `docker compose --env-file`; none: the
    # project folder's .env, as compose does.
    env_files: Paths = ()
    models_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: Count = 8080
    state_dir: Path = Path(".state")
    project_name: str | None = None
    # Host the daemon uses to reach a model's published port; a daemon running in
    # a container next to the models sets this to the docker host's address.
    upstream_host: str = "127.0.0.1"
    rollback: bool = True
    # Bring the last requested model back when the daemon starts and finds nothing running.
    restore_on_start: bool = True
    log_level: str = "info"
    # console: lines for people; json: one JSON object a line; auto: console on a terminal.
    log_format: str = "auto"
    # How often the active model's health endpoint is probed between switches.
    probe_interval: Seconds = 2.0
    # Consecutive failed probes before a ready model counts as unhealthy.
    probe_failures: Count = 3
    # What models added through the API run with unless they name their own image.
    engine_image: str = "vllm/vllm-openai:v0.11.0"
    # GPUs reserved for such a model: "all", a count, or "none" on a host without the
    # NVIDIA container runtime.
    engine_gpus: str = "all"
    # The /v1 gateway: switch to the model a request names when another one is loaded.
    auto_switch: bool = True
    # How long a switch waits for requests in flight on the old model before stopping it.
    drain_timeout: Seconds = 60.0
    # Seconds without requests before a model is unloaded; 0 keeps it loaded.
    ttl: Seconds = 0.0
    # Warm swaps: sleeping models kept at once, their host RAM (GiB; None: half of
    # what is available at start), and how long one may sleep before it is stopped (0: ever).
    max_asleep: Count = 2
    sleep_ram_budget: float | None = None
    sleep_ttl: Seconds = 0.0
    # How many of the models switches left stay started behind the start gate, engines
    # unrun, so that a switch back to one skips docker's start of its container; 0: none.
    standby: Count = 1
    # A model to load at start when none is running (before the last requested one).
    preload: str | None = None
    # Requests that may wait for one model; past that the gateway answers 429.
    max_queue: Count = 64
    # When set, /switch, /stop, every change and /v1 need one of these keys.
    api_keys: Strings = ()
    # Other names /v1 requests may use for a model: {alias: model id}.
    aliases: Mapping[str, str] = Field(default_factory=dict, description="names to model ids")
    models: Mapping[str, Mapping[str, Any]] = Field(
        default_factory=dict, description="model ids to settings"
    )
    # Browser pages (origins such as http://webui.lan:3000) that may call the daemon.
    allowed_origins: Strings = ()
    # Names besides the loopback's under which a loopback-bound daemon may be reached.
    allowed_hosts: Strings = ()
    # Every route but /health and /health/live needs a key (when keys are set).
    protect_reads: bool = False
    # Serve a non-loopback bind without keys; otherwise one is generated in the state dir.
    insecure_no_auth: bool = False
    # Folders under which models added by path must lie; <models-dir>/checkpoints if none.
    checkpoint_roots: Paths = ()
    # Images models added through the API may run (fnmatch patterns); the repository of
    # engine_image, any tag, if none.
    allowed_images: Strings = ()
    # Clients that may follow /events at once, and each model's log.
    max_streams: Count = 64
    # Where pulls download from; None: huggingface_hub's own (HF_ENDPOINT, else the Hub).
    hub_endpoint: str | None = None
    # Seconds a client has to send a request's headers (and an idle connection stays open).
    header_timeout: Seconds = 10.0
    # Open connections before the oldest idle one is closed; 0: from the descriptor limit.
    max_connections: Count = 0
    # HAProxy's agent check (see agent.py) on this TCP port; 0: off. Loopback unless
    # agent_host says otherwise.
    agent_port: Count = 0
    agent_host: str = "127.0.0.1"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Highest first: the flags (init arguments), then what load_settings opened.
        return (init_settings, *_LAYERS.get())

    @field_validator("drain_timeout", "ttl", "sleep_ttl")
    @classmethod
    def _not_negative(cls, value: float, info: ValidationInfo) -> float:
        if value < 0:
            raise ValueError(f"{info.field_name} must be 0 or more seconds")
        return value

    @field_validator("max_queue", "max_streams")
    @classmethod
    def _at_least_one(cls, value: int, info: ValidationInfo) -> int:
        if value < 1:
            raise ValueError(f"{info.field_name} must be at least 1")
        return value

    @field_validator("header_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("header_timeout must be more than 0 seconds")
        return value

    @field_validator("max_connections")
    @classmethod
    def _connections(cls, value: int) -> int:
        if value < 0:
            raise ValueError("max_connections must be 0 (from the descriptor limit) or more")
        return value

    @field_validator("agent_port")
    @classmethod
    def _agent_port(cls, value: int) -> int:
        if not 0 <= value <= 65535:
            raise ValueError(f"agent_port must be a TCP port (1 to 65535) or 0 (off), got {value}")
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for origin in value:
            try:
                normalise_origin(origin)
            except ValueError as err:
                raise ValueError(f"allowed_origins: {err}") from err
        return value

    @field_validator("models_dir")
    @classmethod
    def _no_variable(cls, value: Path) -> Path:
        # The models dir is written into our copy of the compose file as a bind source.
        if "$" in str(value):
            raise ValueError("models_dir must not contain '$': compose would read it as a variable")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return value.lower()

    @field_validator("log_format")
    @classmethod
    def _log_format(cls, value: str) -> str:
        if value not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {value!r}")
        return value

    @field_validator("engine_gpus")
    @classmethod
    def _gpus(cls, value: str) -> str:
        if value not in {"all", "none"} and not (value.isdigit() and int(value) > 0):
            raise ValueError(
                f'engine_gpus must be "all", "none" or a number of GPUs, got {value!r}'
            )
        return value

    @property
    def compose_source(self) -> ComposeSource:
        return ComposeSource(self.compose_files, self.env_files, self.project_name)

    def resolved(self, environ: Mapping[str, str]) -> Settings:
        """Absolute paths, so that compose run from another directory sees the same files."""
        models_dir = self.models_dir.expanduser().resolve()
        cwd = Path.cwd()
        given = [path.expanduser() for path in self.compose_files]
        files = compose_files(given, environ, cwd) or compose_files([DEFAULT_COMPOSE_FILE], {}, cwd)
        return self.model_copy(
            update={
                "compose_files": files,
                "env_files": tuple(path.expanduser().resolve() for path in self.env_files),
                "models_dir": models_dir,
                "state_dir": self.state_dir.expanduser().resolve(),
                "checkpoint_roots": tuple(
                    root.expanduser().resolve() for root in self.checkpoint_roots
                )
                or (models_dir / "checkpoints",),
                "allowed_images": self.allowed_images or default_allowed_images(self.engine_image),
            }
        )


class _Layer(Protocol):
    def given(self, name: str) -> tuple[str, Any] | None:
        """Where this layer set ``name`` (for messages) and the value as it was written."""
        ...


class _File(YamlConfigSettingsSource):
    """The YAML file, read by pydantic-settings; the flags' spellings are the settings'."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path) -> None:
        self.path = path.expanduser()
        # pydantic-settings passes over a missing file; one named on purpose must be there.
        if not self.path.is_file():
            reason = "not a file" if self.path.exists() else "no such file"
            raise ConfigError(f"cannot read config file {path}: {reason}")
        super().__init__(settings_cls, yaml_file=self.path)

    def _read_file(self, file_path: Path) -> dict[str, Any]:
        try:
            document: object = super()._read_file(file_path)
        except OSError as err:
            raise ConfigError(f"cannot read config file {file_path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {file_path} is not valid YAML: {err}") from err
        if document is None:
            return {}
        if not isinstance(document, dict):
            raise ConfigError(f"config file {file_path} must hold a mapping of settings")
        return {_SPELLINGS.get(str(key), str(key)): value for key, value in document.items()}

    def given(self, name: str) -> tuple[str, Any] | None:
        if name not in self.init_kwargs:
            return None
        return f"config file {self.path}", self.init_kwargs[name]


class _Environment(EnvSettingsSource):
    """ORCHESTRATOR_<NAME> variables of the environment load_settings was given."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self.environ = environ
        super().__init__(settings_cls, env_prefix=ENV_PREFIX)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # pydantic-settings matches names in lower case; only the upper-case spelling counts,
        # and an empty variable counts as unset.
        found = {
            name.lower(): value
            for name, value in self.environ.items()
            if name.startswith(ENV_PREFIX) and name.isupper() and value
        }
        if self.variable("compose_files") == ENV_PREFIX + "COMPOSE":
            found[(ENV_PREFIX + "compose_files").lower()] = found[(ENV_PREFIX + "compose").lower()]
        return found

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        if field_name in _FILE_ONLY:
            return None, field_name, False
        return super().get_field_value(field, field_name)

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        # Lists are comma-separated (ORCHESTRATOR_API_KEYS=k1,k2), not JSON; _listed splits.
        return value

    def variable(self, name: str) -> str:
        """The variable that sets ``name``: ORCHESTRATOR_COMPOSE, the flag's spelling, wins."""
        if name == "compose_files" and self.environ.get(ENV_PREFIX + "COMPOSE"):
            return ENV_PREFIX + "COMPOSE"
        return ENV_PREFIX + name.upper()

    def given(self, name: str) -> tuple[str, Any] | None:
        variable = self.variable(name)
        if name in _FILE_ONLY or not self.environ.get(variable):
            return None
        return variable, self.environ[variable]


class _Flags:
    """The flags given, as init arguments; only their names are needed here."""

    def __init__(self, flags: Mapping[str, Any]) -> None:
        self.flags = flags

    def given(self, name: str) -> tuple[str, Any] | None:
        if name not in self.flags:
            return None
        return f"--{name.replace('_', '-')}", self.flags[name]


def _expected(name: str) -> str:
    """What a setting takes, in words, from its annotation."""
    info = Settings.model_fields[name]
    hint = info.annotation
    if get_origin(hint) is Mapping:
        return f"map {info.description}"
    if get_origin(hint) is tuple:
        return "be a list (a YAML list, or comma-separated)"
    kinds = [kind for kind in get_args(hint) if kind is not type(None)] or [hint]
    return f"be {_KINDS[kinds[0]]}"


def _problem(error: ErrorDetails, layers: Sequence[_Layer]) -> str:
    """One wrong value, named with the layer it came from."""
    name = str(error["loc"][0]) if error["loc"] else ""
    where, value = next(
        (found for layer in layers if (found := layer.given(name)) is not None),
        ("default", None),
    )
    if error["type"] == "extra_forbidden":
        known = ", ".join(sorted([*Settings.model_fields, *_SPELLINGS]))
        return f"{where}: unknown setting {name!r} (known: {known})"
    if error["type"] == "value_error":
        # Raised by the checks above, whose messages name the setting.
        return f"{where}: {error.get('ctx', {}).get('error', error['msg'])}"
    return f"{where}: {name} must {_expected(name)}, got {value!r}"


def load_settings(
    flags: Mapping[str, Any],
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the layers; flags given as None count as not given."""
    environ = os.environ if environ is None else environ
    if config_file is None and environ.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(environ[ENV_PREFIX + "CONFIG"])
    given = {name: value for name, value in flags.items() if value is not None}
    # A file that cannot be read is reported before anything else is looked at.
    file = [_File(Settings, config_file)] if config_file is not None else []
    variables = _Environment(Settings, environ)
    opened = _LAYERS.set((variables, *file))
    try:
        settings = Settings(**given)
    except ValidationError as err:
        layers: list[_Layer] = [_Flags(given), variables, *file]
        problems = dict.fromkeys(_problem(error, layers) for error in err.errors())
        raise ConfigError("; ".join(problems)) from None
    finally:
        _LAYERS.reset(opened)
    return settings.resolved(environ)
