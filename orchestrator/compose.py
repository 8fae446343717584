"""The user's compose project, as Compose reads it, rewritten into the daemon's own copy.

The daemon never parses the user's YAML itself: ``docker compose config`` resolves the
files exactly as ``docker compose`` in that folder would (``.env``, interpolation,
``include``, ``extends``, override files, anchors) and prints the canonical project.
This module rewrites that canonical form so that every model loads offline from the hub
cache (seed 002): a cache path given as the model becomes the repo id (a pinned snapshot
becomes ``--revision``), the hub cache is mounted where the engine's environment says it
looks, ``HF_HUB_OFFLINE=1`` is set, restarts are left to the daemon, and the engine gets a
readable ``--served-model-name`` and a persistent vLLM cache; a model that sleeps between
swaps gets vLLM's sleep mode and the dev-mode endpoints that drive it. Every change is
recorded as a note, every doubt as a problem, so that ``check`` can show the user what
was done to their project.

Values here are what the container sees. Compose prints a literal ``$`` as ``$$``;
``canonical`` undoes that on the way in and ``render`` does it again, for every string,
on the way out: nothing in the copy is interpolated a second time.
"""

from __future__ import annotations

import copy
import itertools
import re
import shlex
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import yaml
from huggingface_hub.file_download import REGEX_COMMIT_HASH
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from .cache import is_repo_id, looks_like_path, repo_id_from_cache_path
from .gate import ImageDefaults, gate_service, is_gated
from .naming import MODEL_ID

DEFAULT_ENGINE_PORT = 8000
DEFAULT_HEALTH_PATH = "/health"
DEFAULT_STARTUP_TIMEOUT = 900.0
SETTINGS_KEY = "x-orchestrator"

# What docker compose looks for when no file is named, and the override files it then
# loads beside it: the first that exists, whatever the main file is called.
DEFAULT_FILE_NAMES = ("compose.yaml", "compose.yml", "docker-compose.yml", "docker-compose.yaml")
OVERRIDE_FILE_NAMES = (
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
)

_OFFLINE_VAR = "HF_HUB_OFFLINE"
# vLLM serves /sleep, /wake_up and /is_sleeping only in its dev mode.
_DEV_MODE_VAR = "VLLM_SERVER_DEV_MODE"
_SLEEP_FLAG = "--enable-sleep-mode"
_NO_SLEEP_FLAG = "--no-enable-sleep-mode"
# The host folder under the models dir that keeps vLLM's torch.compile and CUDA-graph
# caches across container restarts.
VLLM_CACHE_FOLDER = "vllm-cache"
# The engine's own restarts would hide a crash from the daemon and loop forever.
_RESTART = "no"

# Launchers written at the start of a command, and whether a positional model may follow:
# `vllm serve` takes one, the old api_server module only takes --model.
_LAUNCHERS: tuple[tuple[tuple[str, ...], bool], ...] = (
    (("vllm", "serve"), True),
    (("serve",), True),
    (("python3", "-m", "vllm.entrypoints.openai.api_server"), False),
    (("python", "-m", "vllm.entrypoints.openai.api_server"), False),
)
_SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
# Flags of vLLM's whose value the daemon reads; vLLM also accepts "_" for "-".
_READ_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--port",
        "--revision",
        "--tokenizer-revision",
        "--download-dir",
    }
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
    """The compose project, or the settings given for its models, cannot be used."""


# --- settings --------------------------------------------------------------------------


class ModelSettings(BaseModel):
    """Per-model settings: ``x-orchestrator`` on the engine service, or ``models:`` in the
    daemon's config file (which wins)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    display_name: str | None = Field(default=None, min_length=1, max_length=200)
    health_path: str | None = Field(default=None, pattern=r"^/")
    startup_timeout: float | None = Field(default=None, gt=0)
    upstream: str | None = Field(default=None, pattern=r"^https?://")
    port: int | None = Field(default=None, gt=0, lt=65536)
    # x-orchestrator: true on the engine service; in the config file, the service's name.
    engine: bool | str | None = None
    checkpoint: str | None = Field(default=None, pattern=r"^/")
    ttl: float | None = Field(default=None, ge=0)
    max_concurrency: int | None = Field(default=None, gt=0)
    aliases: tuple[str, ...] = ()
    # vLLM's sleep level for warm swaps (1: weights to host RAM, 2: dropped); false: cold.
    sleep: Literal[1, 2, False] | None = None
    # One short generation before the model counts as ready.
    warmup: bool | None = None
    # Start the engine's container while the old model stops, its engine held back by the
    # daemon's start gate (needs /bin/sh in the image); false: start it afterwards.
    staged_start: bool | None = None

    @field_validator("sleep", mode="before")
    @classmethod
    def _level(cls, level: object) -> object:
        # true would leave the level to a guess, and 0 or 3 are no level vLLM has.
        if level is None or level is False:
            return level
        # A value interpolated by compose arrives as a string.
        text = "" if isinstance(level, bool) else str(level).strip()
        if text in {"1", "2"}:
            return int(text)
        if text.lower() == "false":
            return False
        raise PydanticCustomError(
            "sleep_level",
            "must be vLLM's sleep level, 1 (weights kept in host RAM) or 2 (weights"
            " dropped), or false (cold swaps), not {level}",
            {"level": str(level).lower() if isinstance(level, bool) else repr(level)},
        )

    @field_validator("aliases")
    @classmethod
    def _names(cls, aliases: tuple[str, ...]) -> tuple[str, ...]:
        if any(not alias for alias in aliases):
            raise ValueError("aliases must be non-empty names")
        return aliases


def model_settings(raw: object, where: str) -> ModelSettings:
    if not isinstance(raw, Mapping):
        raise ComposeError(f"{where} must be a mapping of settings")
    try:
        return ModelSettings.model_validate(dict(raw))
    except ValidationError as err:
        first = err.errors()[0]
        place = ".".join(str(part) for part in first["loc"])
        known = ", ".join(ModelSettings.model_fields)
        hint = f" (known: {known})" if first["type"] == "extra_forbidden" else ""
        raise ComposeError(f"{where}.{place}: {first['msg']}{hint}") from None


# --- what the rest of the daemon reads --------------------------------------------------


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
    # The revisions of the repo the engine loads (weights, then tokenizer); None: main.
    revision: str | None = None
    tokenizer_revision: str | None = None
    # Why the model cannot be run at all; a switch to it is refused with this.
    unusable: str | None = None
    # vLLM's sleep level when a switch moves away from it (1 or 2); None: stopped instead.
    sleep: int | None = None
    warmup: bool = False  # one short generation before the model counts as ready
    # The engine service's copy runs behind the start gate (see gate.py).
    gated: bool = False


@dataclass(frozen=True)
class ComposeSource:
    """Which files compose reads, and how: what ``docker compose`` in that folder would do."""

    files: tuple[Path, ...]
    env_files: tuple[Path, ...] = ()
    project_name: str | None = None

    @property
    def project_dir(self) -> Path:
        return self.files[0].parent

    @property
    def read_files(self) -> tuple[Path, ...]:
        """Every file compose reads: the compose files, then the env files, else the .env."""
        dotenv = self.project_dir / ".env"
        return (*self.files, *(self.env_files or ((dotenv,) if dotenv.is_file() else ())))


@dataclass
class ComposeProject:
    source: ComposeSource
    name: str
    document: dict[str, Any]  # canonical and rewritten, values as the containers see them
    models: dict[str, ModelSpec]
    shared_services: tuple[str, ...]
    notes: dict[str, list[RewriteNote]] = field(default_factory=dict)
    problems: dict[str, list[str]] = field(default_factory=dict)
    # Host folders the copy binds that the daemon makes before compose runs: docker would
    # make them owned by root.
    host_folders: tuple[Path, ...] = ()


def compose_files(given: Sequence[Path], environ: Mapping[str, str], cwd: Path) -> tuple[Path, ...]:
    """The files ``docker compose`` would read: those given, else ``COMPOSE_FILE``; one file
    with a default name brings its override file along, as compose does in its folder."""
    files = [Path(f) for f in given]
    if not files and environ.get("COMPOSE_FILE"):
        separator = environ.get("COMPOSE_PATH_SEPARATOR") or ":"
        files = [Path(f) for f in environ["COMPOSE_FILE"].split(separator) if f]
    files = [(f if f.is_absolute() else cwd / f).resolve() for f in files]
    if len(files) == 1 and files[0].name in DEFAULT_FILE_NAMES:
        for override in OVERRIDE_FILE_NAMES:
            candidate = files[0].parent / override
            if candidate.is_file():
                files.append(candidate)
                break
    return tuple(files)


# --- the canonical form ------------------------------------------------------------------


class _ComposeLoader(yaml.SafeLoader):
    """Safe loading that reads plain scalars the way Compose's YAML 1.2 parser does.

    YAML 1.1 would turn ``22:22`` into 1342 and ``yes`` into true.
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
    """Writes shared parts out in full instead of as &id001 / *id001 references, and quotes
    every string that compose's YAML 1.2 parser would read as something else."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


# PyYAML quotes a string when one of its resolvers would read the plain scalar as another
# type; YAML 1.2's forms (12345e6, 0o17, .5) are added to the 1.1 ones it knows.
for _tag, _pattern, _first in (
    ("int", r"^[-+]?[0-9]+$|^0o[0-7]+$|^0x[0-9a-fA-F]+$", "-+0123456789"),
    (
        "float",
        r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
        r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$",
        "-+0123456789.",
    ),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("null", r"^(?:~|null|Null|NULL)$", "~nN"),
):
    _RenderDumper.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first)
    )


def _map_strings(value: Any, change: Any, keys: bool) -> Any:
    if isinstance(value, str):
        return change(value)
    if isinstance(value, Mapping):
        return {
            (_map_strings(k, change, keys) if keys else k): _map_strings(v, change, keys)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_map_strings(item, change, keys) for item in value]
    return value


def canonical(text: str) -> dict[str, Any]:
    """``docker compose config`` output as values: every ``$$`` back to the ``$`` it is.

    Compose escapes keys in its output too, though it never interpolates them on input.
    """
    document = yaml.load(text, Loader=_ComposeLoader)
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ComposeError("docker compose config printed no services")
    return dict(_map_strings(document, lambda s: s.replace("$$", "$"), keys=True))


def dump_literal(document: Mapping[str, Any]) -> str:
    """A compose document as YAML in which compose reads every value literally."""
    return yaml.dump(
        _map_strings(document, lambda s: s.replace("$", "$$"), keys=False),
        Dumper=_RenderDumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
    )


def render(project: ComposeProject) -> str:
    """The rewritten project as the file the daemon hands compose: every "$" doubled."""
    return dump_literal(project.document)


def merge_services(user: Mapping[str, Any], added: Mapping[str, Any]) -> dict[str, Any]:
    """The user's canonical project with the registry's services (also canonical) added."""
    services = dict(user["services"])
    user_profiles = {p for s in services.values() for p in (s.get("profiles") or [])}
    for name, service in (added.get("services") or {}).items():
        if name in services:
            raise ComposeError(f"the compose project already has a service {name!r}")
        clash = user_profiles & set(service.get("profiles") or [])
        if clash:
            raise ComposeError(f"the compose project already has a profile {sorted(clash)[0]!r}")
        services[name] = service
    merged = {**user, "services": services}
    for key in ("networks", "volumes"):
        extra = added.get(key) or {}
        if extra:
            merged[key] = {**extra, **(user.get(key) or {})}
    return merged


# --- commands ------------------------------------------------------------------------------


def _flag_of(token: str) -> tuple[str, str | None]:
    """``--served_model_name=x`` as (``--served-model-name``, ``x``)."""
    spelled, equals, value = token.partition("=")
    flag = spelled.replace("_", "-") if spelled.startswith("--") else spelled
    return flag, (value if equals else None)


@dataclass
class _Args:
    """One engine command's argument list, read and then rewritten in place."""

    tokens: list[str]
    positional_at: int | None
    flags: dict[str, list[tuple[int, int, str]]]  # flag -> (index, tokens taken, value)
    problems: list[str]

    @classmethod
    def read(cls, tokens: list[str], start: int, positional: bool) -> _Args:
        args = cls(list(tokens), None, {}, [])
        index = start
        if positional and index < len(tokens) and not tokens[index].startswith("-"):
            args.positional_at = index
            index += 1
        while index < len(tokens):
            flag, inline = _flag_of(tokens[index])
            if flag not in _READ_FLAGS:
                index += 1
                continue
            width, value = 1, inline
            if value is None and index + 1 < len(tokens) and not tokens[index + 1].startswith("-"):
                value, width = tokens[index + 1], 2
            if not value:
                args.problems.append(f"{flag} has no value")
            else:
                args.flags.setdefault(flag, []).append((index, width, value))
            index += width
        return args

    def value(self, flag: str) -> str | None:
        given = self.flags.get(flag)
        return given[-1][2] if given else None  # vLLM's parser keeps the last one

    def replace_value(self, at: int, width: int, value: str) -> None:
        if width == 2:
            self.tokens[at + 1] = value
        else:
            self.tokens[at] = f"{self.tokens[at].partition('=')[0]}={value}"


def _launcher(tokens: Sequence[str]) -> tuple[int, bool] | None:
    for prefix, positional in _LAUNCHERS:
        if tuple(tokens[: len(prefix)]) == prefix:
            return len(prefix), positional
    return None


def _looks_like_model(token: str) -> bool:
    """A first word that can be nothing but a model, outside a known vLLM command."""
    return repo_id_from_cache_path(token) is not None or (
        "/" in token and not looks_like_path(token) and is_repo_id(token)
    )


def _split_cache_path(value: str) -> tuple[str, str | None]:
    """A hub-cache path as (repo id, pinned commit or None); anything else as it is."""
    repo = repo_id_from_cache_path(value)
    if repo is None:
        return value, None
    parts = PurePosixPath(value).parts
    if len(parts) >= 2 and parts[-2] == "snapshots" and REGEX_COMMIT_HASH.fullmatch(parts[-1]):
        return repo, parts[-1]
    return repo, None


@dataclass
class EngineCommand:
    """What a model's engine is told: its model, served name, port and revisions."""

    model_arg: str
    served_name: str | None
    port: str | None
    revision: str | None
    tokenizer_revision: str | None
    notes: list[str]
    problems: list[str]
    download_dir: str | None = None
    # Whether vLLM runs with its sleep mode: the flags' say (the last wins), or None.
    sleep_mode: bool | None = None


@dataclass
class ArgEdits:
    """How an engine's argument list changes: tokens replaced and dropped in place, and
    tokens added after the model (a script gets them there, before any redirection)."""

    replaced: dict[int, str]
    dropped: set[int]
    added: list[str]
    after: int  # the index of the last token that names the model
    command: EngineCommand

    def apply(self, tokens: list[str]) -> list[str]:
        kept = [self.replaced.get(at, token) for at, token in enumerate(tokens)]
        return [token for at, token in enumerate(kept) if at not in self.dropped] + self.added


def plan_args(
    tokens: list[str], start: int, positional: bool, model_id: str, sleep: int | None = None
) -> ArgEdits | None:
    """What to change in an engine's arguments: the model as a repo id (a pin as --revision),
    a served name, and sleep mode for a model that sleeps at level ``sleep``; None when they
    name no model (a sidecar, a proxy)."""
    args = _Args.read(tokens, start, positional)
    if args.positional_at is None and not args.flags.get("--model"):
        if args.problems:
            raise ComposeError("; ".join(args.problems))
        return None
    notes: list[str] = []
    problems = list(args.problems)
    edits = ArgEdits({}, set(), [], 0, EngineCommand("", None, None, None, None, notes, problems))
    written, model, pinned = _plan_model(tokens, args, edits)
    if model != written:
        notes.append(f"model {written} → {model}")
    revision = args.value("--revision")
    if pinned is not None:
        if revision is None:
            revision = pinned
            edits.added += ["--revision", pinned]
            notes.append(f"added --revision {pinned}: the snapshot the path named")
        elif revision != pinned:
            problems.append(
                f"the model path pins snapshot {pinned} but --revision says {revision};"
                f" --revision wins"
            )
    served = args.value("--served-model-name")
    if served is None:
        served = model_id
        edits.added += ["--served-model-name", model_id]
        notes.append(f"added --served-model-name {model_id}")
    sleep_mode = _sleep_mode(tokens[start:])
    if sleep and sleep_mode is None:
        sleep_mode = True
        edits.added.append(_SLEEP_FLAG)
        notes.append(f"added {_SLEEP_FLAG}: the model sleeps between swaps (sleep: {sleep})")
    elif sleep and sleep_mode is False:
        problems.append(
            f"{_NO_SLEEP_FLAG} turns off the sleep mode that sleep: {sleep} needs, so the"
            " model is stopped instead of put to sleep: remove the flag, or set sleep: false"
        )
    edits.command = EngineCommand(
        model, served, args.value("--port"), revision, args.value("--tokenizer-revision"),
        notes, problems, args.value("--download-dir"), sleep_mode,
    )  # fmt: skip
    return edits


def _sleep_mode(tokens: Sequence[str]) -> bool | None:
    """What the flags say of vLLM's sleep mode, in either spelling; the last one wins."""
    said = None
    for token in tokens:
        flag = _flag_of(token)[0]
        if flag == _SLEEP_FLAG:
            said = True
        elif flag == _NO_SLEEP_FLAG:
            said = False
    return said


def _plan_model(tokens: list[str], args: _Args, edits: ArgEdits) -> tuple[str, str, str | None]:
    """The model as written, as a repo id, and the commit a cache path pinned; ``edits``
    gets the tokens to replace or drop."""
    notes, problems = edits.command.notes, edits.command.problems
    models = args.flags.get("--model", [])
    if args.positional_at is None:
        for at, width, value in models:
            fresh = _split_cache_path(value)[0]
            if fresh != value and width == 2:
                edits.replaced[at + 1] = fresh
            elif fresh != value:
                edits.replaced[at] = f"{tokens[at].partition('=')[0]}={fresh}"
        edits.after = models[-1][0] + models[-1][1] - 1
        written = models[-1][2]  # vLLM's parser keeps the last one
        return (written, *_split_cache_path(written))
    written = tokens[args.positional_at]
    model, pinned = _split_cache_path(written)
    if model != written:
        edits.replaced[args.positional_at] = model
    edits.after = args.positional_at
    # `vllm serve` refuses a positional model and --model together.
    for at, width, value in models:
        edits.dropped.update(range(at, at + width))
        notes.append(f"dropped --model {value}: the positional model {model} wins")
        if _split_cache_path(value)[0] != model:
            problems.append(
                f"the command names two models, positional {model} and --model {value};"
                f" kept {model}"
            )
    return written, model, pinned


def rewrite_args(
    tokens: list[str], start: int, positional: bool, model_id: str, sleep: int | None = None
) -> tuple[list[str], EngineCommand] | None:
    """An engine's argument list rewritten (see ``plan_args``); None when it names no model."""
    edits = plan_args(tokens, start, positional, model_id, sleep)
    return None if edits is None else (edits.apply(tokens), edits.command)


@dataclass(frozen=True)
class _Word:
    """One word of a shell command line: its value, where its text lies, and its kind."""

    value: str
    start: int
    end: int
    kind: str  # word, separator (; & && | || |& newline), redirect (an operator or its target)


_SEPARATORS = ("&&", "||", "|&", ";", "&", "|", "\n")
_REDIRECT = re.compile(r"\d*(?:>>|>&|<&|&>>|&>|>\||<>|>|<)")


def _shell_words(script: str) -> list[_Word]:
    """The words, separators and redirections of a POSIX shell script, with their places.

    Enough of the shell's grammar to find one command and edit it in place: quotes,
    backslashes, line continuations, comments, separators and redirections.
    """
    words: list[_Word] = []
    at = 0
    target_next = False
    while at < len(script):
        char = script[at]
        if script.startswith("\\\n", at):  # a line continuation is no word at all
            at += 2
            continue
        if char in " \t":
            at += 1
            continue
        if char == "#":
            newline = script.find("\n", at)
            at = len(script) if newline < 0 else newline
            continue
        separator = next((sep for sep in _SEPARATORS if script.startswith(sep, at)), None)
        redirect = _REDIRECT.match(script, at)
        if redirect is not None and (redirect.group() != "&>" or separator != "&&"):
            end = redirect.end()
            if redirect.group().endswith("&"):
                duplicate = re.compile(r"\d+-?|-").match(script, end)
                end = duplicate.end() if duplicate else end
                target_next = False
            else:
                target_next = True
            words.append(_Word(script[at:end], at, end, "redirect"))
            at = end
            continue
        if separator is not None:
            words.append(_Word(separator, at, at + len(separator), "separator"))
            at += len(separator)
            continue
        end = _word_end(script, at)
        raw = script[at:end]
        try:
            value = "".join(shlex.split(raw.replace("\\\n", ""))) if raw else ""
        except ValueError as err:
            raise ComposeError(f"cannot read the shell command at {raw!r}: {err}") from err
        words.append(_Word(value, at, end, "redirect" if target_next else "word"))
        target_next = False
        at = end
    return words


def _word_end(script: str, at: int) -> int:
    quote: str | None = None
    while at < len(script):
        char = script[at]
        if quote is None and (char in " \t\n;&|<>" and not script.startswith("\\\n", at)):
            return at
        if char == "\\" and quote != "'":
            at += 2
            continue
        if char in "'\"":
            quote = None if quote == char else (quote or char)
        at += 1
    return at


_UNSAFE_IN_SHELL = re.compile(r"\$|`")


def rewrite_script(
    script: str, model_id: str, sleep: int | None = None
) -> tuple[str, EngineCommand] | None:
    """A ``sh -c`` script with its engine command rewritten in place; every other character
    (other commands, redirections, comments, line continuations, quoting) untouched."""
    words = _shell_words(script)
    segment: list[_Word] = []
    for word in [*words, _Word(";", len(script), len(script), "separator")]:
        if word.kind != "separator":
            segment.append(word)
            continue
        arguments = [w for w in segment if w.kind == "word"]
        segment = []
        skip = 0
        while skip < len(arguments) and (
            arguments[skip].value == "exec" or re.fullmatch(r"\w+=.*", arguments[skip].value)
        ):
            skip += 1
        found = _launcher([w.value for w in arguments[skip:]])
        if found is None:
            continue
        if any(_UNSAFE_IN_SHELL.search(script[w.start : w.end]) for w in arguments):
            text = " ".join(script[w.start : w.end] for w in arguments)
            raise ComposeError(
                "the engine command in the shell script uses shell variables or command"
                f" substitution ({text!r}): the daemon cannot tell which model it runs; write"
                " the model out, or use compose's ${VAR} outside the script"
            )
        width, positional = found
        edits = plan_args([w.value for w in arguments], skip + width, positional, model_id, sleep)
        if edits is None:
            return None
        return _edit(script, arguments, edits), edits.command
    return None


def _edit(script: str, words: list[_Word], edits: ArgEdits) -> str:
    """Apply ``edits`` to the words' text, last first so that earlier places stay true."""
    changes: list[tuple[int, int, str]] = [
        (words[at].start, words[at].end, shlex.quote(value)) for at, value in edits.replaced.items()
    ]
    changes += [(words[at].start, words[at].end, "") for at in edits.dropped]
    if edits.added:
        place = words[edits.after].end
        changes.append((place, place, " " + shlex.join(edits.added)))
    for start, end, text in sorted(changes, reverse=True):
        script = script[:start] + text + script[end:]
    return script


@dataclass
class _Rewritten:
    entrypoint: list[str] | None
    command: list[str] | None
    engine: EngineCommand | None


def _shell_flag(token: str) -> bool:
    return bool(re.fullmatch(r"-[a-z]*c", token))


def rewrite_service_command(
    entrypoint: list[str] | None,
    command: list[str] | None,
    model_id: str,
    vllm_image: bool,
    sleep: int | None = None,
) -> _Rewritten:
    """The service's entrypoint and command with the engine's arguments rewritten.

    Understands the image's own entrypoint (``vllm serve``) followed by the command, an
    entrypoint that is the launcher, the launcher in the command, and a ``sh -c`` script
    in either. Raises ComposeError for a command it cannot rewrite safely.
    """
    entrypoint = list(entrypoint) if entrypoint is not None else None
    command = list(command) if command is not None else None
    if entrypoint:
        program = PurePosixPath(entrypoint[0]).name
        if program in _SHELLS and len(entrypoint) >= 2 and _shell_flag(entrypoint[1]):
            if len(entrypoint) >= 3:
                return _in_script(entrypoint, 2, command, model_id, sleep, in_entrypoint=True)
            if command:
                return _in_script(command, 0, entrypoint, model_id, sleep, in_entrypoint=False)
            return _Rewritten(entrypoint, command, None)
        found = _launcher(entrypoint)
        if found is not None:
            width, positional = found
            if len(entrypoint) > width:
                raise ComposeError(
                    "the entrypoint holds the engine's arguments; the daemon rewrites only the"
                    " command: move them from entrypoint to command"
                )
            result = rewrite_args(command or [], 0, positional, model_id, sleep)
            return _Rewritten(entrypoint, *(result if result else (command, None)))
        # Another program runs first (a wrapper script): the command may still be vLLM's.
    tokens = command or []
    if tokens:
        program = PurePosixPath(tokens[0]).name
        if program in _SHELLS and len(tokens) >= 3 and _shell_flag(tokens[1]):
            shell = _in_script(tokens, 2, entrypoint, model_id, sleep, in_entrypoint=False)
            return _Rewritten(entrypoint, shell.command, shell.engine)
    found = _launcher(tokens)
    if found is not None:
        width, positional = found
    else:
        width = 0
        positional = bool(tokens) and (vllm_image or _looks_like_model(tokens[0]))
    result = rewrite_args(tokens, width, positional, model_id, sleep)
    if result is None:
        return _Rewritten(entrypoint, command, None)
    return _Rewritten(entrypoint, result[0], result[1])


def _in_script(
    holder: list[str],
    at: int,
    other: list[str] | None,
    model_id: str,
    sleep: int | None,
    *,
    in_entrypoint: bool,
) -> _Rewritten:
    """Rewrite the script at ``holder[at]``; ``other`` is the entrypoint or command beside it."""
    unchanged = _Rewritten(
        holder if in_entrypoint else other, other if in_entrypoint else holder, None
    )
    if at >= len(holder):
        return unchanged
    result = rewrite_script(holder[at], model_id, sleep)
    if result is None:
        if _launcher(holder[at:]) is not None:
            # `sh -c` runs one script; the words after it become $0, $1, ... and never run.
            raise ComposeError(
                "the shell runs only the first word of the engine command; the others become"
                ' $0, $1, ...: write it as one string, command: ["vllm serve ..."]'
            )
        return unchanged
    script, engine = result
    changed = [*holder[:at], script, *holder[at + 1 :]]
    if in_entrypoint:
        return _Rewritten(changed, other, engine)
    return _Rewritten(other, changed, engine)


# --- volumes, environment, ports, durations -----------------------------------------------


def _home(environment: Mapping[str, Any]) -> str:
    return str(environment.get("HOME") or "/root").rstrip("/")


def _path_variables(environment: Mapping[str, Any]) -> Callable[[str], str | None]:
    """A reader of the engine's path variables: unset or empty is None, and "~" is its
    home, as huggingface_hub and vLLM both expand it."""
    home = _home(environment)

    def get(name: str) -> str | None:
        value = environment.get(name)
        if value in (None, ""):
            return None
        text = str(value)
        return home + text[1:] if text == "~" or text.startswith("~/") else text

    return get


def hub_target(environment: Mapping[str, Any]) -> str:
    """Where the engine's huggingface_hub looks for the cache, by its environment."""
    get = _path_variables(environment)

    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if get(name):
            return str(get(name)).rstrip("/")
    if get("HF_HOME"):
        return f"{str(get('HF_HOME')).rstrip('/')}/hub"
    if get("XDG_CACHE_HOME"):
        return f"{str(get('XDG_CACHE_HOME')).rstrip('/')}/huggingface/hub"
    return f"{_home(environment)}/.cache/huggingface/hub"


def _describe_mount(volume: Mapping[str, Any]) -> str:
    source = volume.get("source") or "(anonymous)"
    mode = ":ro" if volume.get("read_only") else ""
    return f"{source}:{volume.get('target')}{mode}"


def rewrite_volumes(
    volumes: list[Any] | None, hub_dir: Path, target: str
) -> tuple[list[Any], list[str]]:
    """The hub cache mounted exactly at ``target``, replacing a mount there or at its parent
    (a whole HF home is narrowed to its hub folder); read-only stays read-only."""
    parent = str(PurePosixPath(target).parent)
    kept: list[Any] = []
    notes: list[str] = []
    placed = False
    for volume in volumes or []:
        at = str(volume.get("target", "")).rstrip("/") if isinstance(volume, Mapping) else ""
        if at not in {target, parent}:
            kept.append(volume)
            continue
        if placed:
            notes.append(f"removed volume {_describe_mount(volume)}: {target} is mounted")
            continue
        placed = True
        mount = _bind_mount(hub_dir, target, bool(volume.get("read_only")))
        relabel = (volume.get("bind") or {}).get("selinux")
        if relabel:  # :z / :Z, which an SELinux host needs to let the engine read it
            mount["bind"]["selinux"] = relabel
        kept.append(mount)
        if _describe_mount(volume) != _describe_mount(mount):
            notes.append(f"volume {_describe_mount(volume)} → {_describe_mount(mount)}")
    if not placed:
        mount = _bind_mount(hub_dir, target, False)
        kept.append(mount)
        notes.append(f"added volume {_describe_mount(mount)}")
    return kept, notes


def _bind_mount(folder: Path, target: str, read_only: bool) -> dict[str, Any]:
    # As the short syntax did: a missing folder is made rather than failing the start.
    mount: dict[str, Any] = {
        "type": "bind",
        "source": str(folder),
        "target": target,
        "bind": {"create_host_path": True},
    }
    if read_only:
        mount["read_only"] = True
    return mount


def vllm_cache_target(environment: Mapping[str, Any]) -> str:
    """Where the engine's vLLM keeps its caches, by its environment (vLLM's envs.py)."""
    get = _path_variables(environment)

    root = get("VLLM_CACHE_ROOT")
    if root:
        return root.rstrip("/") or "/"
    return f"{(get('XDG_CACHE_HOME') or _home(environment) + '/.cache').rstrip('/')}/vllm"


def mount_vllm_cache(
    volumes: list[Any] | None, tmpfs: object, cache_dir: Path, target: str
) -> tuple[list[Any], list[str]]:
    """``cache_dir`` mounted at the engine's vLLM cache root, unless the user mounts something
    there or above it (their own cache, or a tmpfs they chose on purpose)."""
    kept = list(volumes or [])
    place = PurePosixPath(target)
    if not place.is_absolute():
        return kept, []  # docker takes absolute targets alone; vLLM's own default then
    taken = [str(v.get("target") or "") for v in kept if isinstance(v, Mapping)]
    mounts = [tmpfs] if isinstance(tmpfs, str) else tmpfs if isinstance(tmpfs, list) else []
    taken += [str(entry).split(":", 1)[0] for entry in mounts]
    if any(at and PurePosixPath(at) in (place, *place.parents) for at in taken):
        return kept, []
    mount = _bind_mount(cache_dir, str(place), False)
    # A relabel on the user's mounts says the host enforces SELinux: without one the engine
    # could not write its cache. Shared (z), as every engine mounts the same folder.
    if any(isinstance(v, Mapping) and (v.get("bind") or {}).get("selinux") for v in kept):
        mount["bind"]["selinux"] = "z"
    note = f"added volume {_describe_mount(mount)}: vLLM's compile caches outlive the container"
    return [*kept, mount], [note]


def dev_mode_environment(
    environment: Mapping[str, Any], sleep: int
) -> tuple[dict[str, Any], list[str]]:
    """``VLLM_SERVER_DEV_MODE=1``, which a model that sleeps needs for /sleep and /wake_up."""
    variables = dict(environment)
    previous = variables.get(_DEV_MODE_VAR)
    if previous is not None and str(previous) == "1":
        return variables, []
    variables[_DEV_MODE_VAR] = "1"
    why = f"sleep: {sleep} needs vLLM's /sleep and /wake_up"
    if _DEV_MODE_VAR in environment and previous is None:
        return variables, [f"{_DEV_MODE_VAR} (passed on unset) → {_DEV_MODE_VAR}=1 ({why})"]
    if previous is None:
        return variables, [f"added {_DEV_MODE_VAR}=1 ({why})"]
    return variables, [f"{_DEV_MODE_VAR}={previous} → {_DEV_MODE_VAR}=1 (overridden: {why})"]


def rewrite_environment(environment: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    variables = dict(environment or {})
    previous = variables.get(_OFFLINE_VAR)
    if previous is not None and str(previous) == "1":
        return variables, []
    variables[_OFFLINE_VAR] = "1"
    if _OFFLINE_VAR in (environment or {}) and previous is None:
        return variables, [f"{_OFFLINE_VAR} (passed on unset) → {_OFFLINE_VAR}=1"]
    if previous is None:
        return variables, [f"added {_OFFLINE_VAR}=1"]
    return variables, [f"{_OFFLINE_VAR}={previous} → {_OFFLINE_VAR}=1"]


def parse_duration(value: object, where: str) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and _DURATION.fullmatch(value.strip()):
        return sum(
            float(amount) * _SECONDS_PER_UNIT[unit]
            for amount, unit in _DURATION_PART.findall(value.strip())
        )
    raise ComposeError(f"{where}: {value!r} is not a duration such as 30s or 1m30s")


def _container_port(
    settings: ModelSettings, flag: str | None, ports: object
) -> tuple[int, str | None]:
    """The engine's port inside its container, and why a declared one could not be read."""
    if settings.port is not None:
        return settings.port, None
    if flag is not None:
        if flag.isdigit() and 0 < int(flag) < 65536:
            return int(flag), None
        return DEFAULT_ENGINE_PORT, f"--port {flag} is not a port number"
    if isinstance(ports, list) and ports and isinstance(ports[0], Mapping):
        target = ports[0].get("target")
        if isinstance(target, int) and 0 < target < 65536:
            return target, None
        return DEFAULT_ENGINE_PORT, f"cannot read the container port in ports: {ports[0]!r}"
    return DEFAULT_ENGINE_PORT, None


# --- the project ---------------------------------------------------------------------------


def _profiles_of(service: Mapping[str, Any], name: str) -> list[str]:
    profiles = list(dict.fromkeys(service.get("profiles") or []))
    for profile in profiles:
        if not isinstance(profile, str) or not MODEL_ID.fullmatch(profile):
            raise ComposeError(
                f"services.{name}.profiles: {profile!r} is not a valid model id"
                " (letters, digits, '_', '.', '-'; at least two characters;"
                " starting with a letter or digit)"
            )
    return profiles


@dataclass
class _Member:
    name: str
    service: dict[str, Any]
    settings: ModelSettings
    profile: str  # the first: a service in several profiles can carry one served name
    rewritten: _Rewritten | None = None
    error: str | None = None
    sleep: int | None = None  # the sleep level its vLLM is set up for

    def read_command(self, sleep: int | None = None) -> None:
        image = self.service.get("image")
        self.sleep = sleep
        try:
            self.rewritten = rewrite_service_command(
                self.service.get("entrypoint"),
                self.service.get("command"),
                self.profile,
                vllm_image=isinstance(image, str) and "vllm" in image.lower(),
                sleep=sleep,
            )
            self.error = None
        except ComposeError as err:
            self.rewritten, self.error = None, str(err)

    @property
    def engine_command(self) -> EngineCommand | None:
        return self.rewritten.engine if self.rewritten is not None else None

    @property
    def serves(self) -> bool:
        """Whether the service passes vLLM a model."""
        return self.engine_command is not None


def _choose_engine(
    model_id: str, members: list[_Member], named: str | None
) -> tuple[_Member, bool, list[str]]:
    """The engine service, whether the user named it, and any doubt about it."""
    if named is not None:
        for member in members:
            if member.name == named:
                return member, True, []
        names = ", ".join(m.name for m in members)
        raise ComposeError(
            f"settings for model {model_id!r}: engine {named!r} is not one of its services"
            f" ({names})"
        )
    marked = [m for m in members if m.settings.engine is True]
    if marked:
        problems = []
        if len(marked) > 1:
            problems.append(
                f"{', '.join(m.name for m in marked)} all say engine: true;"
                f" using {marked[0].name} as the engine"
            )
        return marked[0], True, problems
    serving = [m for m in members if m.serves and m.settings.engine is not False]
    return (serving or members)[0], False, []


def _unsupported(name: str, service: Mapping[str, Any]) -> list[str]:
    """Compose features the daemon cannot honour for an engine, named rather than dropped."""
    problems = []
    replicas = (service.get("deploy") or {}).get("replicas")
    scale = service.get("scale")
    for what, value in (("deploy.replicas", replicas), ("scale", scale)):
        if isinstance(value, int) and value > 1:
            problems.append(
                f"{name}: {what} is {value}; a model runs one engine container, so the"
                " daemon cannot tell which one to route to"
            )
    if "image" not in service and "build" not in service:
        problems.append(f"{name}: the engine service has no image and no build")
    return problems


def rewrite_project(
    source: ComposeSource,
    document: Mapping[str, Any],
    models_dir: Path,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    images: Mapping[str, ImageDefaults | None] | None = None,
) -> ComposeProject:
    """Rewrite a canonical project (``canonical``'s output, registry services merged in).

    ``images``: the ENTRYPOINT and CMD of the images on this machine, for the start gate
    (gate.py) of engines whose service names no entrypoint; None: no engine is gated.
    """
    services: dict[str, Any] = copy.deepcopy(dict(document["services"]))
    shared, members = _members(services)
    configured = _configured(overrides or {}, members)
    _set_up_sleep(members, configured)
    hub_dir = models_dir.resolve() / "hub"
    cache_dir = vllm_cache_dir(models_dir)
    models: dict[str, ModelSpec] = {}
    notes: dict[str, list[RewriteNote]] = {}
    problems: dict[str, list[str]] = {}
    rewritten: set[str] = set()
    for model_id, group in members.items():
        # A service in two profiles is rewritten once, with the first profile's model.
        fresh = [member for member in group if member.name not in rewritten]
        rewritten.update(member.name for member in group)
        models[model_id], notes[model_id], problems[model_id] = _model(
            model_id, group, fresh, configured.get(model_id), hub_dir, cache_dir, images
        )
    for model_id, collisions in _served_name_collisions(models).items():
        problems[model_id] += collisions
    for model_id, collisions in _port_collisions(models, services).items():
        problems[model_id] += collisions
        # Asleep, it would keep the port from the model that shares it.
        models[model_id] = replace(models[model_id], sleep=None)
    mounted = any(
        isinstance(volume, Mapping) and volume.get("source") == str(cache_dir)
        for service in services.values()
        for volume in service.get("volumes") or []
    )
    return ComposeProject(
        source=source,
        name=str(document.get("name") or ""),
        document={**document, "services": services},
        models=models,
        shared_services=tuple(shared),
        notes=notes,
        problems=problems,
        host_folders=(cache_dir,) if mounted else (),
    )


def vllm_cache_dir(models_dir: Path) -> Path:
    """The host folder mounted at every vLLM engine's cache root."""
    return models_dir.resolve() / VLLM_CACHE_FOLDER


def _members(services: Mapping[str, Any]) -> tuple[list[str], dict[str, list[_Member]]]:
    """The shared services, and each profile's services with their commands read."""
    shared: list[str] = []
    members: dict[str, list[_Member]] = {}
    for name, service in services.items():
        profiles = _profiles_of(service, name)
        if not profiles:
            shared.append(name)
            continue
        settings = model_settings(service.get(SETTINGS_KEY, {}), f"services.{name}.{SETTINGS_KEY}")
        if isinstance(settings.engine, str):
            raise ComposeError(f"services.{name}.{SETTINGS_KEY}.engine must be true or false")
        member = _Member(name, service, settings, profiles[0])
        member.read_command()
        for profile in profiles:
            members.setdefault(profile, []).append(member)
    return shared, members


def _configured(
    overrides: Mapping[str, Mapping[str, Any]], members: Mapping[str, list[_Member]]
) -> dict[str, ModelSettings]:
    """The config file's per-model settings, each for a profile the project has."""
    configured: dict[str, ModelSettings] = {}
    for model_id, raw in overrides.items():
        if model_id not in members:
            raise ComposeError(
                f"settings for model {model_id!r}: the compose project has no profile"
                f" {model_id!r} (profiles: {', '.join(members) or 'none'})"
            )
        configured[model_id] = model_settings(raw, f"settings for model {model_id!r}")
        if isinstance(configured[model_id].engine, bool):
            raise ComposeError(
                f"settings for model {model_id!r}: engine must name one of its services"
            )
    return configured


def _named(configured: ModelSettings | None) -> str | None:
    named = configured.engine if configured is not None else None
    return named if isinstance(named, str) else None


def _serving(group: list[_Member], engine: _Member, chosen: bool) -> list[_Member]:
    """What runs vLLM: the engine the user named, when it passes a model (then another
    service's --model is another program's, such as llama.cpp's); else every service
    that passes one, which lets the engine be a proxy in front of vLLM."""
    if chosen and engine.serves:
        return [engine]
    return [m for m in group if m.serves and m.settings.engine is not False]


def _set_up_sleep(
    members: Mapping[str, list[_Member]], configured: Mapping[str, ModelSettings]
) -> None:
    """Read again, with sleep mode, the commands of the vLLM services of models that sleep:
    whether one sleeps is known only once its engine and settings are."""
    for model_id, group in members.items():
        engine, chosen, _ = _choose_engine(model_id, group, _named(configured.get(model_id)))
        level = _merged(engine.settings, configured.get(model_id)).sleep
        if not level:
            continue
        for member in _serving(group, engine, chosen):
            if member.sleep is None:  # in two profiles: the first that sleeps sets it up
                member.read_command(level)


def _model(
    model_id: str,
    group: list[_Member],
    fresh: list[_Member],
    configured: ModelSettings | None,
    hub_dir: Path,
    cache_dir: Path,
    images: Mapping[str, ImageDefaults | None] | None,
) -> tuple[ModelSpec, list[RewriteNote], list[str]]:
    """One profile's services rewritten (those not done yet) and its model's spec."""
    engine, chosen, problems = _choose_engine(model_id, group, _named(configured))
    unusable = next((f"{m.name}: {m.error}" for m in group if m.error is not None), None)
    problems += [f"{m.name}: {m.error}" for m in group if m.error is not None]
    serving = _serving(group, engine, chosen)
    if not serving and unusable is None:
        problems.append(
            f"no service of profile {model_id} passes vLLM a model (--model or a positional model)"
        )
    notes = [
        RewriteNote(member.name, what)
        for member in fresh
        for what in _rewrite_member(member, member in serving, hub_dir, cache_dir)
    ]
    for member in serving:
        command = member.engine_command
        problems += [
            f"{member.name}: {problem}" for problem in (command.problems if command else [])
        ]
    for member in group:
        if member is not engine and member.settings.model_dump(
            exclude_defaults=True, exclude={"engine"}
        ):
            problems.append(
                f"{member.name}: {SETTINGS_KEY} is ignored because {engine.name} is the"
                " engine service; move it there"
            )
    problems += _unsupported(engine.name, engine.service)
    runs = serving[0].engine_command if serving else None
    settings = _merged(engine.settings, configured)
    if (
        images is not None
        and engine in fresh
        and engine in serving
        and engine.error is None
        and settings.staged_start is not False
        # The gate's files go into the container's own filesystem.
        and not engine.service.get("read_only")
    ):
        gated = gate_service(engine.service, images)
        notes += [RewriteNote(engine.name, gated)] if gated else []
    spec = _spec(model_id, group, engine, runs, settings, problems)
    return replace(spec, unusable=unusable, gated=is_gated(engine.service)), notes, problems


def _spec(
    model_id: str,
    group: list[_Member],
    engine: _Member,
    command: EngineCommand | None,
    settings: ModelSettings,
    problems: list[str],
) -> ModelSpec:
    """The model as the daemon runs it: what vLLM loads (``command``), where it answers."""
    model_arg = command.model_arg if command else ""
    is_repo = bool(model_arg) and not looks_like_path(model_arg) and is_repo_id(model_arg)
    flag_port = engine.engine_command.port if engine.engine_command else None
    port, port_problem = _container_port(settings, flag_port, engine.service.get("ports"))
    if port_problem:
        problems.append(f"{engine.name}: {port_problem}")
    grace = engine.service.get("stop_grace_period")
    return ModelSpec(
        id=model_id,
        display_name=settings.display_name or model_id,
        repo=model_arg if is_repo else None,
        model_arg=model_arg,
        served_name=(command.served_name if command else None) or model_id,
        services=tuple(m.name for m in group),
        engine_service=engine.name,
        container_port=port,
        health_path=settings.health_path or DEFAULT_HEALTH_PATH,
        startup_timeout=settings.startup_timeout or DEFAULT_STARTUP_TIMEOUT,
        upstream=settings.upstream,
        stop_timeout=None
        if grace is None
        else parse_duration(grace, f"services.{engine.name}.stop_grace_period"),
        checkpoint=Path(settings.checkpoint) if settings.checkpoint else None,
        ttl=settings.ttl,
        max_concurrency=settings.max_concurrency,
        aliases=settings.aliases,
        # An engine whose flags turn sleep mode off is stopped instead (a problem says so).
        sleep=(settings.sleep or None) if command and command.sleep_mode else None,
        warmup=bool(settings.warmup),
        revision=command.revision if command and is_repo else None,
        tokenizer_revision=command.tokenizer_revision if command and is_repo else None,
    )


def _merged(declared: ModelSettings, configured: ModelSettings | None) -> ModelSettings:
    if configured is None:
        return declared
    return declared.model_copy(update=configured.model_dump(exclude_unset=True))


def _rewrite_member(member: _Member, runs_vllm: bool, hub_dir: Path, cache_dir: Path) -> list[str]:
    """Rewrite one model service in place; the notes say what changed."""
    service = member.service
    notes: list[str] = []
    rewritten = member.rewritten
    if runs_vllm and member.error is None and rewritten and rewritten.engine:
        before = shlex.join([*(service.get("entrypoint") or []), *(service.get("command") or [])])
        if rewritten.entrypoint is not None or "entrypoint" in service:
            service["entrypoint"] = rewritten.entrypoint
        service["command"] = rewritten.command
        after = shlex.join([*(rewritten.entrypoint or []), *(rewritten.command or [])])
        if before != after:
            notes.append(f"command: {before} → {after}")
        notes += rewritten.engine.notes
    notes += _own_restarts(service)
    if runs_vllm:
        environment, environment_notes = rewrite_environment(service.get("environment"))
        if member.sleep:
            environment, dev_notes = dev_mode_environment(environment, member.sleep)
            environment_notes += dev_notes
        # vLLM reads weights from --download-dir when given, else from the hub cache.
        download_dir = rewritten.engine.download_dir if rewritten and rewritten.engine else None
        targets = dict.fromkeys(
            [hub_target(environment), *([download_dir] if download_dir else [])]
        )
        volumes = service.get("volumes")
        for target in targets:
            volumes, volume_notes = rewrite_volumes(volumes, hub_dir, target.rstrip("/"))
            notes += volume_notes
        volumes, cache_notes = mount_vllm_cache(
            volumes, service.get("tmpfs"), cache_dir, vllm_cache_target(environment)
        )
        notes += cache_notes
        service["volumes"] = volumes
        service["environment"] = environment
        notes += environment_notes
    return notes


def _own_restarts(service: dict[str, Any]) -> list[str]:
    """``restart: "no"``, and no swarm-style restart policy, which compose would apply too."""
    notes = []
    restart = service.get("restart")
    if restart not in (None, _RESTART):
        notes.append(f"restart: {restart} → {_RESTART} (overridden: the daemon restarts models)")
    service["restart"] = _RESTART
    deploy = service.get("deploy")
    if isinstance(deploy, dict) and "restart_policy" in deploy:
        policy = deploy.pop("restart_policy")
        notes.append(
            f"deploy.restart_policy {policy} removed (overridden: the daemon restarts models)"
        )
    return notes


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


# A binding on every address meets any other binding of the same port.
_ANY_ADDRESS = frozenset({"", "0.0.0.0", "::"})
_Binding = tuple[str, int, str]  # host address ("" for all), port, protocol


def _fixed_host_ports(name: str, service: Mapping[str, Any], spec: ModelSpec) -> list[_Binding]:
    """The host ports a running service holds whichever other model runs. An ephemeral port
    (``127.0.0.1::8000``) or a range is picked free by docker at each start."""
    held: list[_Binding] = []
    if service.get("network_mode") == "host" and name == spec.engine_service:
        held.append(("", spec.container_port, "tcp"))
    for port in service.get("ports") or []:
        published = str(port.get("published") or "") if isinstance(port, Mapping) else ""
        if published.isdigit() and int(published) > 0:
            address = str(port.get("host_ip") or "")
            held.append((address, int(published), str(port.get("protocol") or "tcp")))
    return held


def _meet(one: _Binding, other: _Binding) -> bool:
    same_address = one[0] == other[0] or {one[0], other[0]} & _ANY_ADDRESS
    return one[1:] == other[1:] and bool(same_address)


def _port_collisions(
    models: Mapping[str, ModelSpec], services: Mapping[str, Any]
) -> dict[str, list[str]]:
    """Models that publish the same fixed host port where one of them sleeps: a sleeping
    model's containers stay up, so the other cannot start while it sleeps. Cold models may
    share ports, as only one runs at a time."""
    held = {
        spec.id: [
            (name, binding)
            for name in spec.services
            for binding in _fixed_host_ports(name, services[name], spec)
        ]
        for spec in models.values()
    }
    found: dict[str, list[str]] = {}
    specs = list(models.values())
    for at, one in enumerate(specs):
        for other in specs[at + 1 :]:
            if not (one.sleep or other.sleep):
                continue
            for (name, binding), (other_name, other_binding) in itertools.product(
                held[one.id], held[other.id]
            ):
                if name != other_name and _meet(binding, other_binding):
                    found.setdefault(one.id, []).append(
                        _collision(one, name, binding, other, other_name)
                    )
                    found.setdefault(other.id, []).append(
                        _collision(other, other_name, other_binding, one, name)
                    )
    return {model_id: list(dict.fromkeys(problems)) for model_id, problems in found.items()}


def _collision(
    spec: ModelSpec, name: str, binding: _Binding, other: ModelSpec, other_name: str
) -> str:
    address, port, protocol = binding
    shown = (f"[{address}]:" if ":" in address else f"{address}:") if address else ""
    shown += str(port) + ("" if protocol == "tcp" else f"/{protocol}")
    if spec.sleep and other.sleep:
        asleep = "both sleep with their containers up"
    else:
        asleep = f"{spec.id if spec.sleep else other.id} sleeps with its containers up"
    problem = (
        f"{name}: host port {shown} is also published by {other_name} of model {other.id},"
        f" and {asleep}, so the two cannot run side by side:"
        " use distinct host ports or publish without a host port (127.0.0.1::8000);"
        " clients reach models through /v1"
    )
    if spec.sleep:
        problem += f"; until then {spec.id} is stopped instead of put to sleep"
    return problem


def describe_files(files: Iterable[Path]) -> str:
    return ", ".join(str(f) for f in files)
