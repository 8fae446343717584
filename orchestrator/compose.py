"""The user's compose file, rewritten into the daemon's own copy.

Each compose profile is one model. The user's file is read once and never written; the
daemon runs compose on the rendered copy, in which every model loads offline from the hub
cache (seed 002): a cache path given as the model becomes the repo id, the hub cache is
mounted where vLLM looks for it and HF_HUB_OFFLINE=1 is set. Everything else is kept, and
every change is recorded as a note so that the user can see what was done to their file.
"""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cache import HUB_MOUNT, is_repo_id, looks_like_path, repo_id_from_cache_path

DEFAULT_ENGINE_PORT = 8000
DEFAULT_HEALTH_PATH = "/health"
DEFAULT_STARTUP_TIMEOUT = 900.0

SETTINGS_KEY = "x-orchestrator"
SETTING_NAMES = (
    "display_name",
    "health_path",
    "startup_timeout",
    "upstream",
    "port",
    "engine",
    "checkpoint",
    "ttl",
    "max_concurrency",
    "aliases",
)

# The Compose specification's rule for profile names. Compose itself lets others through;
# holding model ids to it keeps them usable as served names and in URLs.
_PROFILE_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")

# A mount of the whole HF home (what seed 002 replaces) or of the hub itself: either is the
# service's cache mount, to be replaced by the one hub mount.
_CACHE_TARGETS = frozenset({"/root/.cache/huggingface", HUB_MOUNT})

_OFFLINE_VAR = "HF_HUB_OFFLINE"
_OFFLINE_ENTRY = f"{_OFFLINE_VAR}=1"

# Launchers written at the start of a command, and whether a positional model may follow:
# `vllm serve` takes one, the old api_server module only takes --model.
_LAUNCHERS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("vllm", "serve"), True),
    (("serve",), True),
    (("python3", "-m", "vllm.entrypoints.openai.api_server"), False),
    (("python", "-m", "vllm.entrypoints.openai.api_server"), False),
)

_DURATION = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|ms|s|m|h))+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_SECONDS_PER_UNIT = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


class ComposeError(ValueError):
    """The compose file, or the settings given for its models, cannot be used."""


@dataclass(frozen=True)
class RewriteNote:
    service: str
    what: str


@dataclass(frozen=True)
class ModelSpec:
    id: str
    display_name: str
    repo: str | None
    model_arg: str
    served_name: str
    services: tuple[str, ...]
    engine_service: str
    container_port: int
    health_path: str = DEFAULT_HEALTH_PATH
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT
    upstream: str | None = None
    stop_timeout: float | None = None
    # A local model folder on the host, mounted into the engine: checked before a switch.
    checkpoint: Path | None = None
    ttl: float | None = None  # seconds idle before the gateway unloads it; None: the default
    max_concurrency: int | None = None  # requests forwarded at once; more wait their turn
    aliases: tuple[str, ...] = ()  # other names /v1 requests may use for it


@dataclass
class ComposeProject:
    source: Path
    name: str | None
    document: dict[str, Any]
    models: dict[str, ModelSpec]
    shared_services: tuple[str, ...]
    notes: dict[str, list[RewriteNote]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)


class _ComposeLoader(yaml.SafeLoader):
    """Safe loading that reads plain scalars the way Compose's YAML 1.2 parser does.

    YAML 1.1 would turn ``22:22`` into 1342 and ``yes`` into true, and the rendered copy
    would then hand compose a different port or value than the user wrote.
    """


_ComposeLoader.yaml_implicit_resolvers = {
    first: [
        (tag, pattern)
        for tag, pattern in resolvers
        if tag.rsplit(":", 1)[-1] not in {"bool", "int", "float", "value"}
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)
_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_ComposeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?"
        r"|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


class _RenderDumper(yaml.SafeDumper):
    """Writes merged services out in full instead of as &id001 / *id001 references."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# --- command -----------------------------------------------------------------------


@dataclass
class _Command:
    argv: list[str] | None  # None: no model argument, so the command is left alone
    model_arg: str | None
    served_name: str | None
    port: str | None
    notes: list[str]
    problems: list[str]


def _command_tokens(command: object, where: str) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        try:
            return shlex.split(command)
        except ValueError as err:
            raise ComposeError(f"{where}: cannot split command {command!r}: {err}") from err
    if isinstance(command, list) and all(
        isinstance(token, str | int | float) and not isinstance(token, bool) for token in command
    ):
        return [str(token) for token in command]
    raise ComposeError(f"{where}: command must be a string or a list of strings")


def _launcher(tokens: list[str]) -> tuple[int, bool]:
    for prefix, takes_positional in _LAUNCHERS:
        if tuple(tokens[: len(prefix)]) == prefix:
            return len(prefix), takes_positional
    return 0, True


def _normalise_model(value: str) -> str:
    return repo_id_from_cache_path(value) or value


def _could_be_positional_model(token: str, vllm_image: bool) -> bool:
    # Outside a vLLM image the first word is usually a program (nginx, redis-server), so
    # only a value that can be nothing but a model counts there.
    if token.startswith("-"):
        return False
    if vllm_image:
        return True
    return repo_id_from_cache_path(token) is not None or (
        "/" in token and not looks_like_path(token) and is_repo_id(token)
    )


@dataclass
class _Options:
    model_flags: list[tuple[int, int, str]]  # (index, tokens taken, value) of each --model
    served_name: str | None
    port: str | None
    problems: list[str]


def _scan_options(tokens: list[str], start: int) -> _Options:
    options = _Options(model_flags=[], served_name=None, port=None, problems=[])
    index = start
    while index < len(tokens):
        spelled, equals, inline_value = tokens[index].partition("=")
        # vLLM's parser accepts --served_model_name for --served-model-name.
        flag = spelled.replace("_", "-") if spelled.startswith("--") else ""
        if flag not in {"--model", "--served-model-name", "--port"}:
            index += 1
            continue
        width = 1
        value: str | None = inline_value if equals else None
        if value is None and index + 1 < len(tokens) and not tokens[index + 1].startswith("-"):
            value = tokens[index + 1]
            width = 2
        if not value:
            options.problems.append(f"{flag} has no value")
        elif flag == "--model":
            options.model_flags.append((index, width, value))
        elif flag == "--served-model-name":
            options.served_name = options.served_name or value
        else:
            options.port = value
        index += width
    return options


def _analyse_command(command: object, model_id: str, where: str, vllm_image: bool) -> _Command:
    tokens = _command_tokens(command, where)
    options_from, takes_positional = _launcher(tokens)
    positional_at: int | None = None
    # After an explicit `serve` the first word can only be the model.
    if (
        takes_positional
        and options_from < len(tokens)
        and _could_be_positional_model(tokens[options_from], vllm_image or options_from > 0)
    ):
        positional_at = options_from
        options_from += 1
    options = _scan_options(tokens, options_from)
    problems = options.problems
    if positional_at is None and not options.model_flags:
        return _Command(None, None, options.served_name, options.port, [], problems)

    argv = list(tokens)
    notes: list[str] = []
    dropped: set[int] = set()
    if positional_at is not None:
        written = tokens[positional_at]
        model_arg = _normalise_model(written)
        if model_arg != written:
            argv[positional_at] = model_arg
            notes.append(f"positional model {written} → {model_arg}")
        # `vllm serve` refuses a positional model and --model together.
        for flag_at, width, value in options.model_flags:
            dropped.update(range(flag_at, flag_at + width))
            notes.append(f"dropped --model {value}: the positional model {model_arg} wins")
            if _normalise_model(value) != model_arg:
                problems.append(
                    f"the command names two models, positional {model_arg} and --model {value};"
                    f" kept {model_arg}"
                )
    else:
        for flag_at, width, value in options.model_flags:
            rewritten = _normalise_model(value)
            if rewritten != value:
                if width == 2:
                    argv[flag_at + 1] = rewritten
                else:
                    argv[flag_at] = f"{tokens[flag_at].partition('=')[0]}={rewritten}"
                notes.append(f"--model {value} → {rewritten}")
        # vLLM's parser keeps the last --model given.
        model_arg = _normalise_model(options.model_flags[-1][2])

    argv = [token for at, token in enumerate(argv) if at not in dropped]
    served_name = options.served_name
    if served_name is None:
        served_name = model_id
        argv += ["--served-model-name", model_id]
        notes.append(f"added --served-model-name {model_id}")
    return _Command(argv, model_arg, served_name, options.port, notes, problems)


def rewrite_command(
    command: str | list[str] | None, model_id: str
) -> tuple[list[str] | None, list[str]]:
    """The command as the daemon runs it, and what changed; None when it passes no model."""
    analysis = _analyse_command(command, model_id, "command", vllm_image=True)
    return analysis.argv, analysis.notes


# --- volumes and environment -------------------------------------------------------


def _describe_volume(entry: object) -> str:
    if isinstance(entry, Mapping):
        # One line of YAML, so the note shows the entry as the file spells it.
        text: str = yaml.safe_dump(
            dict(entry), default_flow_style=True, sort_keys=False, width=10_000
        )
        return text.strip()
    return str(entry)


def _volume_target(entry: object) -> str | None:
    if isinstance(entry, str):
        fields = entry.split(":")
        target: object = fields[1] if len(fields) > 1 else fields[0]
    elif isinstance(entry, Mapping):
        target = entry.get("target")
    else:
        return None
    return target.rstrip("/") if isinstance(target, str) else None


def _volume_mode(entry: object) -> str:
    # A read-only cache mount stays read-only: offline loading never writes to it.
    if isinstance(entry, str):
        fields = entry.split(":")
        return f":{fields[2]}" if len(fields) > 2 else ""
    if isinstance(entry, Mapping) and entry.get("read_only") is True:
        return ":ro"
    return ""


def _rewrite_volumes(volumes: object, hub_dir: Path, where: str) -> tuple[list[Any], list[str]]:
    if volumes is None:
        volumes = []
    if not isinstance(volumes, list):
        raise ComposeError(f"{where}: volumes must be a list")
    hub_mount = f"{hub_dir}:{HUB_MOUNT}"
    kept: list[Any] = []
    notes: list[str] = []
    mounted = False
    for entry in volumes:
        if _volume_target(entry) not in _CACHE_TARGETS:
            kept.append(entry)
        elif mounted:
            notes.append(f"removed volume {_describe_volume(entry)}: {HUB_MOUNT} is mounted")
        else:
            mounted = True
            replacement = hub_mount + _volume_mode(entry)
            kept.append(replacement)
            if entry != replacement:
                notes.append(f"volume {_describe_volume(entry)} → {replacement}")
    if not mounted:
        kept.append(hub_mount)
        notes.append(f"added volume {hub_mount}")
    return kept, notes


def _rewrite_environment(environment: object, where: str) -> tuple[Any, list[str]]:
    if environment is None:
        return {_OFFLINE_VAR: "1"}, [f"added {_OFFLINE_ENTRY}"]
    if isinstance(environment, Mapping):
        variables = dict(environment)
        if _OFFLINE_VAR not in variables:
            variables[_OFFLINE_VAR] = "1"
            return variables, [f"added {_OFFLINE_ENTRY}"]
        previous = variables[_OFFLINE_VAR]
        if previous is not None and str(previous) == "1":
            return variables, []
        variables[_OFFLINE_VAR] = "1"
        written = _OFFLINE_VAR if previous is None else f"{_OFFLINE_VAR}={previous}"
        return variables, [f"{written} → {_OFFLINE_ENTRY}"]
    if isinstance(environment, list):
        entries: list[Any] = []
        notes: list[str] = []
        for entry in environment:
            if isinstance(entry, str) and entry.partition("=")[0] == _OFFLINE_VAR:
                if entry != _OFFLINE_ENTRY:
                    notes.append(f"{entry} → {_OFFLINE_ENTRY}")
                entries.append(_OFFLINE_ENTRY)
            else:
                entries.append(entry)
        if _OFFLINE_ENTRY not in entries:
            entries.append(_OFFLINE_ENTRY)
            notes.append(f"added {_OFFLINE_ENTRY}")
        return entries, notes
    raise ComposeError(f"{where}: environment must be a list or a mapping")


# --- settings, ports, durations ----------------------------------------------------


def _check_settings(raw: object, where: str, engine_names_service: bool) -> dict[str, Any]:
    if not isinstance(raw, Mapping):
        raise ComposeError(f"{where} must be a mapping of settings")
    settings: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in SETTING_NAMES:
            raise ComposeError(
                f"{where}: unknown setting {key!r} (known: {', '.join(SETTING_NAMES)})"
            )
        is_number = isinstance(value, int | float) and not isinstance(value, bool)
        if key == "display_name" and not (isinstance(value, str) and value):
            raise ComposeError(f"{where}: display_name must be a non-empty string")
        if key == "health_path" and not (isinstance(value, str) and value.startswith("/")):
            raise ComposeError(f"{where}: health_path must be a path starting with /")
        if key == "startup_timeout":
            if not (is_number and value > 0):
                raise ComposeError(f"{where}: startup_timeout must be a positive number")
            value = float(value)
        if key == "upstream" and not (
            isinstance(value, str) and value.startswith(("http://", "https://"))
        ):
            raise ComposeError(f"{where}: upstream must be an http:// or https:// URL")
        if key == "ttl":
            if not (is_number and value >= 0):
                raise ComposeError(f"{where}: ttl must be a number of seconds (0: never)")
            value = float(value)
        if key == "max_concurrency" and not (isinstance(value, int) and is_number and value > 0):
            raise ComposeError(f"{where}: max_concurrency must be a whole number above 0")
        if key == "aliases":
            if not (isinstance(value, list) and all(isinstance(a, str) and a for a in value)):
                raise ComposeError(f"{where}: aliases must be a list of names")
            value = tuple(value)
        if key == "checkpoint" and not (isinstance(value, str) and value.startswith("/")):
            raise ComposeError(f"{where}: checkpoint must be an absolute host path")
        if key == "port" and not (isinstance(value, int) and is_number and 0 < value < 65536):
            raise ComposeError(f"{where}: port must be a port number")
        if key == "engine":
            if engine_names_service and not isinstance(value, str):
                raise ComposeError(f"{where}: engine must name one of the model's services")
            if not engine_names_service and not isinstance(value, bool):
                raise ComposeError(f"{where}: engine must be true or false")
        settings[key] = value
    return settings


def _port_number(value: object) -> int:
    number = int(str(value))
    if not 0 < number < 65536:
        raise ValueError(f"{number} is not a port number")
    return number


def _container_port_of(entry: object) -> int:
    """The container side of one `ports` entry, in short or long syntax."""
    if isinstance(entry, int) and not isinstance(entry, bool):
        return _port_number(entry)
    if isinstance(entry, Mapping):
        return _port_number(entry.get("target"))
    if isinstance(entry, str):
        # [host_ip:][published:]target[-range][/protocol]; an IPv6 host ends in "]".
        target = entry.split("/", 1)[0].rsplit(":", 1)[-1]
        return _port_number(target.split("-", 1)[0])
    raise ValueError(f"{entry!r} is not a port mapping")


def _parse_duration(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        return sum(
            float(amount) * _SECONDS_PER_UNIT[unit]
            for amount, unit in _DURATION_PART.findall(value.strip())
        )
    raise ComposeError(f"{where}: {value!r} is not a duration such as 30s or 1m30s")


# --- the project -------------------------------------------------------------------


def read_document(source: Path) -> dict[str, Any]:
    try:
        # Loading from the open file makes YAML errors name it along with line and column.
        with source.open(encoding="utf-8") as stream:
            document = yaml.load(stream, Loader=_ComposeLoader)
    except OSError as err:
        raise ComposeError(f"cannot read compose file {source}: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise ComposeError(f"compose file {source} is not UTF-8 text: {err}") from err
    except yaml.YAMLError as err:
        raise ComposeError(f"compose file {source} is not valid YAML: {err}") from err
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ComposeError(f"compose file {source} has no services mapping")
    return document


def _profiles_of(service: Mapping[str, Any], where: str) -> list[str]:
    profiles = service.get("profiles")
    if profiles is None:
        return []
    if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
        raise ComposeError(f"{where}.profiles must be a list of profile names")
    for profile in profiles:
        if not _PROFILE_NAME.fullmatch(profile):
            raise ComposeError(
                f"{where}.profiles: {profile!r} is not a valid profile name"
                " (letters, digits, '_', '.', '-'; at least two characters;"
                " starting with a letter or digit)"
            )
    return list(dict.fromkeys(profiles))


def _choose_engine(
    model_id: str,
    members: list[str],
    declared: Mapping[str, Mapping[str, Any]],
    commands: Mapping[str, _Command],
    named: str | None,
) -> tuple[str, list[str]]:
    if named is not None:
        if named not in members:
            raise ComposeError(
                f"settings for model {model_id!r}: engine {named!r} is not one of its services"
                f" ({', '.join(members)})"
            )
        return named, []
    marked = [name for name in members if declared[name].get("engine") is True]
    if marked:
        problems = []
        if len(marked) > 1:
            problems.append(
                f"{', '.join(marked)} all say engine: true; using {marked[0]} as the engine"
            )
        return marked[0], problems
    serving = [
        name
        for name in members
        if commands[name].argv is not None and declared[name].get("engine") is not False
    ]
    return (serving or members)[0], []


@dataclass
class _Layout:
    """Which services belong to which models, as the file declares it."""

    shared: list[str]
    profiles: dict[str, list[str]]  # model service -> its profiles
    members: dict[str, list[str]]  # model id -> its services, file order
    declared: dict[str, dict[str, Any]]  # model service -> its x-orchestrator settings


def _layout(source: Path, services: Mapping[Any, Any]) -> _Layout:
    layout = _Layout(shared=[], profiles={}, members={}, declared={})
    for name, service in services.items():
        where = f"{source}: services.{name}"
        if not isinstance(name, str) or not isinstance(service, dict):
            raise ComposeError(f"{where} must be a mapping")
        profiles = _profiles_of(service, where)
        if not profiles:
            layout.shared.append(name)
            continue
        layout.profiles[name] = profiles
        for profile in profiles:
            layout.members.setdefault(profile, []).append(name)
        layout.declared[name] = _check_settings(
            service.get(SETTINGS_KEY, {}), f"{where}.{SETTINGS_KEY}", engine_names_service=False
        )
    return layout


def _configured(
    source: Path, members: Mapping[str, list[str]], overrides: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, Any]]:
    configured: dict[str, dict[str, Any]] = {}
    for model_id, raw in overrides.items():
        if model_id not in members:
            raise ComposeError(
                f"settings for model {model_id!r}: {source} has no profile {model_id!r}"
                f" (profiles: {', '.join(members) or 'none'})"
            )
        configured[model_id] = _check_settings(
            raw, f"settings for model {model_id!r}", engine_names_service=True
        )
    return configured


def _rewrite_service(
    service: Mapping[str, Any], command: _Command, runs_vllm: bool, hub_dir: Path, where: str
) -> tuple[dict[str, Any], list[str]]:
    # Merged services share nested lists with their anchor; copy before changing them.
    rewritten = copy.deepcopy(dict(service))
    notes: list[str] = []
    if command.argv is not None:
        rewritten["command"] = command.argv
        notes += command.notes
    if runs_vllm:
        rewritten["volumes"], volume_notes = _rewrite_volumes(
            rewritten.get("volumes"), hub_dir, f"{where}.volumes"
        )
        rewritten["environment"], environment_notes = _rewrite_environment(
            rewritten.get("environment"), f"{where}.environment"
        )
        notes += volume_notes + environment_notes
    return rewritten, notes


def _model_spec(
    source: Path,
    model_id: str,
    layout: _Layout,
    engine: str,
    engine_service: Mapping[str, Any],
    commands: Mapping[str, _Command],
    configured: Mapping[str, Any],
) -> tuple[ModelSpec, list[str]]:
    names = layout.members[model_id]
    problems = [f"{name}: {problem}" for name in names for problem in commands[name].problems]
    problems += [
        f"{name}: {SETTINGS_KEY} is ignored because {engine} is the engine service; move it there"
        for name in names
        if name != engine and set(layout.declared[name]) - {"engine"}
    ]
    if "image" not in engine_service and "build" not in engine_service:
        problems.append(f"{engine}: the engine service has no image and no build")

    # The model is what vLLM runs; the engine may be a proxy in front of it.
    serving = [name for name in [engine, *names] if commands[name].argv is not None]
    if not serving:
        problems.append(
            f"no service of profile {model_id} passes vLLM a model (--model or a positional model)"
        )
    model_command = commands[serving[0] if serving else engine]
    model_arg = model_command.model_arg or ""
    is_repo = bool(model_arg) and not looks_like_path(model_arg) and is_repo_id(model_arg)

    settings = {**layout.declared[engine], **configured}
    container_port, port_problem = _container_port(
        settings.get("port"), commands[engine].port, engine_service.get("ports")
    )
    if port_problem:
        problems.append(f"{engine}: {port_problem}")
    grace = engine_service.get("stop_grace_period")
    spec = ModelSpec(
        id=model_id,
        display_name=settings.get("display_name", model_id),
        repo=model_arg if is_repo else None,
        model_arg=model_arg,
        served_name=model_command.served_name or model_id,
        services=tuple(names),
        engine_service=engine,
        container_port=container_port,
        health_path=settings.get("health_path", DEFAULT_HEALTH_PATH),
        startup_timeout=settings.get("startup_timeout", DEFAULT_STARTUP_TIMEOUT),
        upstream=settings.get("upstream"),
        checkpoint=Path(settings["checkpoint"]) if "checkpoint" in settings else None,
        ttl=settings.get("ttl"),
        max_concurrency=settings.get("max_concurrency"),
        aliases=settings.get("aliases", ()),
        stop_timeout=None
        if grace is None
        else _parse_duration(grace, f"{source}: services.{engine}.stop_grace_period"),
    )
    return spec, problems


def _served_name_collisions(models: Mapping[str, ModelSpec]) -> dict[str, list[str]]:
    served_by: dict[str, list[str]] = {}
    for spec in models.values():
        served_by.setdefault(spec.served_name, []).append(spec.id)
    collisions: dict[str, list[str]] = {}
    for spec in models.values():
        others = [other for other in served_by[spec.served_name] if other != spec.id]
        if others:
            collisions[spec.id] = [
                f"served name {spec.served_name!r} is also used by {', '.join(others)}"
            ]
    return collisions


def _merge_added(
    source: Path, services: dict[Any, Any], added: Mapping[str, Any] | None
) -> dict[Any, Any]:
    """The user's services followed by those of models added at run time."""
    if not added:
        return services
    user_profiles = {
        profile
        for service in services.values()
        if isinstance(service, dict)
        for profile in (service.get("profiles") or [])
    }
    merged = dict(services)
    for name, service in added.items():
        if name in services:
            raise ComposeError(f"{source} already has a service {name!r}")
        clash = user_profiles & set(service.get("profiles") or [])
        if clash:
            raise ComposeError(f"{source} already has a profile {sorted(clash)[0]!r}")
        merged[name] = service
    return merged


def load_project(
    compose_file: Path,
    models_dir: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    added_services: Mapping[str, Any] | None = None,
    document: Mapping[str, Any] | None = None,
) -> ComposeProject:
    """Read the user's compose file and rewrite every model's services to load offline.

    ``added_services`` are the models added at run time, rendered by the registry as a
    user would write them: they are rewritten and run like the user's own. ``document`` is
    the user's file as read before, so that a registry change does not pick up edits the
    daemon was not restarted for.
    """
    source = compose_file.resolve()
    original = dict(document) if document is not None else read_document(source)
    project_name = original.get("name")
    if project_name is not None and not isinstance(project_name, str):
        raise ComposeError(f"{source}: name must be a string")
    services = _merge_added(source, original["services"], added_services)
    layout = _layout(source, services)
    configured = _configured(source, layout.members, overrides or {})

    commands: dict[str, _Command] = {}
    for name, profiles in layout.profiles.items():
        image = services[name].get("image")
        commands[name] = _analyse_command(
            services[name].get("command"),
            # A service in several profiles can only carry one served name: its first.
            profiles[0],
            f"{source}: services.{name}.command",
            vllm_image=isinstance(image, str) and "vllm" in image.lower(),
        )

    problems: dict[str, list[str]] = {}
    engines: dict[str, str] = {}
    for model_id, names in layout.members.items():
        engines[model_id], problems[model_id] = _choose_engine(
            model_id, names, layout.declared, commands, configured.get(model_id, {}).get("engine")
        )

    # Volumes and environment go where vLLM runs: the engine and any other service given
    # a model; a sidecar's container has no use for the cache.
    runs_vllm = set(engines.values()) | {n for n, c in commands.items() if c.argv is not None}
    hub_dir = models_dir.resolve() / "hub"
    rewritten: dict[Any, Any] = dict(services)
    service_notes: dict[str, list[str]] = {}
    for name in layout.profiles:
        rewritten[name], service_notes[name] = _rewrite_service(
            services[name], commands[name], name in runs_vllm, hub_dir, f"{source}: services.{name}"
        )

    models: dict[str, ModelSpec] = {}
    for model_id in layout.members:
        engine = engines[model_id]
        models[model_id], spec_problems = _model_spec(
            source,
            model_id,
            layout,
            engine,
            rewritten[engine],
            commands,
            configured.get(model_id, {}),
        )
        problems[model_id] += spec_problems
    for model_id, collisions in _served_name_collisions(models).items():
        problems[model_id] += collisions

    return ComposeProject(
        source=source,
        name=project_name,
        document={**original, "services": rewritten},
        models=models,
        shared_services=tuple(layout.shared),
        notes={
            model_id: [RewriteNote(name, what) for name in names for what in service_notes[name]]
            for model_id, names in layout.members.items()
        },
        problems=problems,
    )


def _container_port(setting: int | None, flag: str | None, ports: object) -> tuple[int, str | None]:
    """The engine's port inside its container, and why a declared one could not be read."""
    if setting is not None:
        return setting, None
    if flag is not None:
        try:
            return _port_number(flag), None
        except ValueError:
            return DEFAULT_ENGINE_PORT, f"--port {flag} is not a port number"
    if isinstance(ports, list) and ports:
        try:
            return _container_port_of(ports[0]), None
        except ValueError:
            return DEFAULT_ENGINE_PORT, f"cannot read the container port in ports: {ports[0]!r}"
    return DEFAULT_ENGINE_PORT, None


def render(project: ComposeProject) -> str:
    """The rewritten document as the YAML file the daemon hands to compose."""
    return yaml.dump(
        project.document,
        Dumper=_RenderDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )
