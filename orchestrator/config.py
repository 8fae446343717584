"""Daemon settings: defaults, then an optional YAML file, then ORCHESTRATOR_* variables, then flags.

Per-model settings (display name, health path, startup timeout, upstream, port)
may sit in the file under ``models:``; compose's ``x-orchestrator`` keys are the
other place, and the file wins (see ``compose.load_project``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .compose import ComposeSource, compose_files
from .errors import ConfigError
from .registry import default_allowed_images
from .security import normalise_origin

ENV_PREFIX = "ORCHESTRATOR_"


DEFAULT_COMPOSE_FILE = Path("compose/docker-compose.yml")


@dataclass(frozen=True)
class Settings:
    # The user's compose files, as `docker compose -f` takes them; none: COMPOSE_FILE, else
    # compose/docker-compose.yml. One default-named file brings its override file along.
    compose_files: tuple[Path, ...] = ()
    # Files compose reads variables from, as `docker compose --env-file`; none: the
    # project folder's .env, as compose does.
    env_files: tuple[Path, ...] = ()
    models_dir: Path = Path("models")
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path(".state")
    project_name: str | None = None
    # Host the daemon uses to reach a model's published port; a daemon running in
    # a container next to the models sets this to the docker host's address.
    upstream_host: str = "127.0.0.1"
    rollback: bool = True
    # Bring the last requested model back when the daemon starts and finds nothing running.
    restore_on_start: bool = True
    log_level: str = "info"
    # How often the active model's health endpoint is probed between switches.
    probe_interval: float = 2.0
    # Consecutive failed probes before a ready model counts as unhealthy.
    probe_failures: int = 3
    # What models added through the API run with unless they name their own image.
    engine_image: str = "vllm/vllm-openai:v0.11.0"
    # GPUs reserved for such a model: "all", a count, or "none" on a host without the
    # NVIDIA container runtime.
    engine_gpus: str = "all"
    # The /v1 gateway: switch to the model a request names when another one is loaded.
    auto_switch: bool = True
    # How long a switch waits for requests in flight on the old model before stopping it.
    drain_timeout: float = 60.0
    # Seconds without requests before a model is unloaded; 0 keeps it loaded.
    ttl: float = 0.0
    # A model to load at start when none is running (before the last requested one).
    preload: str | None = None
    # Requests that may wait for one model; past that the gateway answers 429.
    max_queue: int = 64
    # When set, /switch, /stop, every change and /v1 need one of these keys.
    api_keys: tuple[str, ...] = ()
    # Other names /v1 requests may use for a model: {alias: model id}.
    aliases: Mapping[str, str] = field(default_factory=dict)
    models: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Browser pages (origins such as http://webui.lan:3000) that may call the daemon.
    allowed_origins: tuple[str, ...] = ()
    # Names besides the loopback's under which a loopback-bound daemon may be reached.
    allowed_hosts: tuple[str, ...] = ()
    # Every route but /health and /health/live needs a key (when keys are set).
    protect_reads: bool = False
    # Serve a non-loopback bind without keys; otherwise one is generated in the state dir.
    insecure_no_auth: bool = False
    # Folders under which models added by path must lie; <models-dir>/checkpoints if none.
    checkpoint_roots: tuple[Path, ...] = ()
    # Images models added through the API may run (fnmatch patterns); the repository of
    # engine_image, any tag, if none.
    allowed_images: tuple[str, ...] = ()
    # Clients that may follow /events at once, and each model's log.
    max_streams: int = 64
    # Where pulls download from; None: huggingface_hub's own (HF_ENDPOINT, else the Hub).
    hub_endpoint: str | None = None
    # Seconds a client has to send a request's headers (and an idle connection stays open).
    header_timeout: float = 10.0
    # Open connections before the oldest idle one is closed; 0: from the descriptor limit.
    max_connections: int = 0

    @property
    def compose_source(self) -> ComposeSource:
        return ComposeSource(self.compose_files, self.env_files, self.project_name)

    def resolved(self, environ: Mapping[str, str]) -> Settings:
        """Absolute paths, so that compose run from another directory sees the same files."""
        models_dir = self.models_dir.expanduser().resolve()
        cwd = Path.cwd()
        given = [path.expanduser() for path in self.compose_files]
        files = compose_files(given, environ, cwd) or compose_files([DEFAULT_COMPOSE_FILE], {}, cwd)
        return replace(
            self,
            compose_files=files,
            env_files=tuple(path.expanduser().resolve() for path in self.env_files),
            models_dir=models_dir,
            state_dir=self.state_dir.expanduser().resolve(),
            checkpoint_roots=tuple(
                Path(root).expanduser().resolve() for root in self.checkpoint_roots
            )
            or (models_dir / "checkpoints",),
            allowed_images=self.allowed_images or default_allowed_images(self.engine_image),
        )


_FIELD_TYPES: dict[str, type] = {
    "compose_files": tuple,
    "env_files": tuple,
    "models_dir": Path,
    "state_dir": Path,
    "host": str,
    "port": int,
    "project_name": str,
    "upstream_host": str,
    "rollback": bool,
    "restore_on_start": bool,
    "log_level": str,
    "probe_interval": float,
    "probe_failures": int,
    "engine_image": str,
    "engine_gpus": str,
    "auto_switch": bool,
    "drain_timeout": float,
    "ttl": float,
    "preload": str,
    "max_queue": int,
    "api_keys": tuple,
    "allowed_origins": tuple,
    "allowed_hosts": tuple,
    "protect_reads": bool,
    "insecure_no_auth": bool,
    "checkpoint_roots": tuple,
    "allowed_images": tuple,
    "max_streams": int,
    "header_timeout": float,
    "hub_endpoint": str,
    "max_connections": int,
}

# The file may use the flags' spelling too (compose rather than compose_file).
_ALIASES = {"compose": "compose_files", "compose_file": "compose_files", "env_file": "env_files"}


def _coerce(name: str, value: Any, origin: str) -> Any:
    kind = _FIELD_TYPES[name]
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in {"1", "true", "yes", "on"}:
                return True
            if text in {"0", "false", "no", "off"}:
                return False
            raise ValueError(value)
        if kind is int and isinstance(value, bool):
            raise ValueError(value)
        if kind is tuple:
            # A YAML list, or a comma-separated variable or flag.
            items = value.split(",") if isinstance(value, str) else list(value)
            if not all(isinstance(item, str) for item in items):
                raise ValueError(value)
            return tuple(item.strip() for item in items if item.strip())
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{origin}: {name} must be {kind.__name__}, got {value!r}") from err


def _from_file(path: Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in document.items():
        name = _ALIASES.get(key, key)
        if name == "models":
            if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
                raise ConfigError(f"config file {path}: models must map model ids to settings")
            values["models"] = value
            continue
        if name == "aliases":
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()
            ):
                raise ConfigError(f"config file {path}: aliases must map names to model ids")
            values["aliases"] = value
            continue
        if name not in _FIELD_TYPES:
            known = ", ".join(sorted(_FIELD_TYPES))
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {known})")
        values[name] = _coerce(name, value, f"config file {path}")
    return values


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in _FIELD_TYPES:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw, ENV_PREFIX + name.upper())
    compose = environ.get(ENV_PREFIX + "COMPOSE")
    if compose:
        values["compose_files"] = _coerce("compose_files", compose, ENV_PREFIX + "COMPOSE")
    return values


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
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(_from_file(config_file))
    values.update(_from_env(environ))
    for name, value in flags.items():
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    for name in ("drain_timeout", "ttl"):
        if values.get(name, 0) < 0:
            raise ConfigError(f"{name} must be 0 or more seconds")
    if values.get("max_queue", 1) < 1:
        raise ConfigError("max_queue must be at least 1")
    if values.get("max_streams", 1) < 1:
        raise ConfigError("max_streams must be at least 1")
    if values.get("header_timeout", 1) <= 0:
        raise ConfigError("header_timeout must be more than 0 seconds")
    if values.get("max_connections", 0) < 0:
        raise ConfigError("max_connections must be 0 (from the descriptor limit) or more")
    for origin in values.get("allowed_origins", ()):
        try:
            normalise_origin(origin)
        except ValueError as err:
            raise ConfigError(f"allowed_origins: {err}") from err
    if "$" in str(values.get("models_dir", "")):
        raise ConfigError("models_dir must not contain '$': compose would read it as a variable")
    gpus = str(values.get("engine_gpus", "all"))
    if gpus not in {"all", "none"} and not (gpus.isdigit() and int(gpus) > 0):
        raise ConfigError(f'engine_gpus must be "all", "none" or a number of GPUs, got {gpus!r}')
    known = {f.name for f in fields(Settings)}
    for name in ("compose_files", "env_files", "checkpoint_roots"):
        if name in values:
            values[name] = tuple(Path(item) for item in values[name])
    return Settings(**{k: v for k, v in values.items() if k in known}).resolved(environ)
