"""Settings layers: defaults, config file, ORCHESTRATOR_* variables, flags."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from orchestrator.config import Settings, load_settings
from orchestrator.errors import ConfigError
from orchestrator.registry import default_allowed_images


def test_defaults_are_the_documented_ones(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing given, the issue's defaults apply, as absolute paths."""
    monkeypatch.chdir(tmp_path)
    settings = load_settings({}, environ={})
    assert settings.compose_files == (tmp_path / "compose" / "docker-compose.yml",)
    assert settings.models_dir == tmp_path / "models"
    assert settings.state_dir == tmp_path / ".state"
    assert (settings.host, settings.port) == ("127.0.0.1", 8080)
    assert settings.rollback is True


def test_flags_beat_environment_beat_file(tmp_path: Path) -> None:
    """Each layer overrides the one below it, setting by setting."""
    config = tmp_path / "orchestrator.yml"
    config.write_text("port: 9000\nhost: 0.0.0.0\nmodels_dir: /srv/models\nrollback: false\n")
    environ = {"ORCHESTRATOR_PORT": "9100", "ORCHESTRATOR_MODELS_DIR": "/env/models"}
    settings = load_settings({"port": 9200, "host": None}, config_file=config, environ=environ)
    assert settings.port == 9200  # flag
    assert settings.models_dir == Path("/env/models")  # environment over file
    assert settings.host == "0.0.0.0"  # file, since the flag was not given
    assert settings.rollback is False


def test_config_file_from_environment_and_per_model_settings(tmp_path: Path) -> None:
    """ORCHESTRATOR_CONFIG names the file; its models: block is kept for the compose loader."""
    config = tmp_path / "c.yml"
    config.write_text("compose: x.yml\nmodels:\n  text-4b: {startup_timeout: 120}\n")
    settings = load_settings({}, environ={"ORCHESTRATOR_CONFIG": str(config)})
    assert [path.name for path in settings.compose_files] == ["x.yml"]
    assert settings.models == {"text-4b": {"startup_timeout": 120}}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port: eighty\n", "port must be int"),
        ("colour: blue\n", "unknown setting 'colour'"),
        ("- a list\n", "must hold a mapping"),
        ("models: [1]\n", "models must map"),
        ("rollback: maybe\n", "rollback must be bool"),
    ],
)
def test_bad_config_files_say_what_is_wrong(tmp_path: Path, text: str, fragment: str) -> None:
    """A wrong value or key in the file is an error naming it."""
    config = tmp_path / "c.yml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_settings({}, config_file=config, environ={})


def test_bad_environment_value_names_the_variable() -> None:
    """A malformed ORCHESTRATOR_PORT is refused with the variable's name."""
    with pytest.raises(ConfigError, match="ORCHESTRATOR_PORT"):
        load_settings({}, environ={"ORCHESTRATOR_PORT": "x"})


def test_compose_files_are_those_docker_compose_would_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--compose (repeatable), else COMPOSE_FILE; one default-named file brings its override."""
    monkeypatch.chdir(tmp_path)
    for name in ("docker-compose.yml", "docker-compose.override.yml", "a.yml", "b.yml"):
        (tmp_path / name).write_text("services: {}\n")
    given = load_settings({"compose_files": ["a.yml", "b.yml"]}, environ={})
    assert given.compose_files == (tmp_path / "a.yml", tmp_path / "b.yml")
    from_env = load_settings({}, environ={"COMPOSE_FILE": "b.yml:a.yml"})
    assert from_env.compose_files == (tmp_path / "b.yml", tmp_path / "a.yml")
    default_named = load_settings({"compose_files": ["docker-compose.yml"]}, environ={})
    assert default_named.compose_files == (
        tmp_path / "docker-compose.yml",
        tmp_path / "docker-compose.override.yml",
    )
    several = load_settings({}, environ={"ORCHESTRATOR_COMPOSE": "a.yml,b.yml"})
    assert several.compose_files == (tmp_path / "a.yml", tmp_path / "b.yml")
    assert several.compose_source.project_dir == tmp_path


def _load(
    tmp_path: Path,
    file: str | None = None,
    env: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Settings:
    """load_settings with a config file holding ``file`` (when given), in ``tmp_path``."""
    config = None
    if file is not None:
        config = tmp_path / "orchestrator.yml"
        config.write_text(file)
    return load_settings(flags or {}, config_file=config, environ=env or {})


@pytest.mark.parametrize(
    ("file", "env", "flag", "expected"),
    [
        (None, None, None, 8080),
        ("7000", None, None, 7000),
        (None, "7100", None, 7100),
        (None, None, 7200, 7200),
        ("7000", "7100", None, 7100),
        ("7000", None, 7200, 7200),
        (None, "7100", 7200, 7200),
        ("7000", "7100", 7200, 7200),
        ("7000", "", None, 7000),  # an empty variable is not set
    ],
)
def test_each_layer_beats_the_ones_below(
    tmp_path: Path, file: str | None, env: str | None, flag: int | None, expected: int
) -> None:
    """Defaults < file < ORCHESTRATOR_<NAME> < flag; a flag given as None is not given."""
    settings = _load(
        tmp_path,
        file=None if file is None else f"port: {file}\n",
        env=None if env is None else {"ORCHESTRATOR_PORT": env},
        flags={"port": flag},
    )
    assert settings.port == expected


@pytest.mark.parametrize(
    ("file", "env", "flags", "name", "expected"),
    [
        ("api_keys: [a, b]\n", {"ORCHESTRATOR_API_KEYS": "c"}, {}, "api_keys", ("c",)),
        ("api_keys: [a, b]\n", {}, {"api_keys": ["d"]}, "api_keys", ("d",)),
        ("rollback: false\n", {"ORCHESTRATOR_ROLLBACK": "on"}, {}, "rollback", True),
        (
            "rollback: false\n",
            {"ORCHESTRATOR_ROLLBACK": "on"},
            {"rollback": False},
            "rollback",
            False,
        ),
        ("insecure_no_auth: yes\n", {}, {"insecure_no_auth": None}, "insecure_no_auth", True),
        ("ttl: 30\n", {"ORCHESTRATOR_TTL": "45.5"}, {}, "ttl", 45.5),
        ("project_name: a\n", {"ORCHESTRATOR_PROJECT_NAME": "b"}, {}, "project_name", "b"),
        ("state_dir: /a\n", {}, {"state_dir": "/b"}, "state_dir", Path("/b")),
        (
            "env_file: /a.env\n",
            {"ORCHESTRATOR_ENV_FILES": "/b.env"},
            {},
            "env_files",
            (Path("/b.env"),),
        ),
    ],
)
def test_a_higher_layer_replaces_the_whole_value(
    tmp_path: Path,
    file: str,
    env: dict[str, str],
    flags: dict[str, Any],
    name: str,
    expected: object,
) -> None:
    """Lists are replaced, not merged; each kind of value follows the same order."""
    assert getattr(_load(tmp_path, file=file, env=env, flags=flags), name) == expected


@pytest.mark.parametrize(
    ("name", "env", "expected"),
    [
        ("rollback", "1", True),
        ("rollback", "0", False),
        ("rollback", "true", True),
        ("rollback", "False", False),
        ("rollback", "yes", True),
        ("rollback", "no", False),
        ("rollback", "on", True),
        ("rollback", "OFF", False),
        ("port", "9000", 9000),
        ("probe_failures", "5", 5),
        ("drain_timeout", "2.5", 2.5),
        ("ttl", "90", 90.0),
        ("host", "0.0.0.0", "0.0.0.0"),
        ("engine_gpus", "2", "2"),
        ("project_name", "llm", "llm"),
        ("hub_endpoint", "https://hub.lan", "https://hub.lan"),
        ("models_dir", "/srv/models", Path("/srv/models")),
        ("api_keys", "k1,k2", ("k1", "k2")),
        ("api_keys", " k1 , k2 ,", ("k1", "k2")),
        ("allowed_hosts", "gpu-box.lan", ("gpu-box.lan",)),
        (
            "allowed_origins",
            "http://a.lan:3000,https://b.lan",
            ("http://a.lan:3000", "https://b.lan"),
        ),
        ("allowed_images", "vllm/*,mine:*", ("vllm/*", "mine:*")),
        ("checkpoint_roots", "/srv/a,/srv/b", (Path("/srv/a"), Path("/srv/b"))),
        ("env_files", "/srv/.env", (Path("/srv/.env"),)),
    ],
)
def test_variables_give_every_kind_of_value(
    tmp_path: Path, name: str, env: str, expected: object
) -> None:
    """ORCHESTRATOR_<NAME> is read as the setting's type; lists are comma-separated."""
    settings = _load(tmp_path, env={f"ORCHESTRATOR_{name.upper()}": env})
    assert getattr(settings, name) == expected


@pytest.mark.parametrize(
    ("text", "name", "expected"),
    [
        ("rollback: no\n", "rollback", False),
        ("rollback: 'on'\n", "rollback", True),
        ("rollback: 0\n", "rollback", False),
        ("protect_reads: true\n", "protect_reads", True),
        ("port: '9000'\n", "port", 9000),
        ("probe_interval: 1\n", "probe_interval", 1.0),
        ("engine_gpus: 2\n", "engine_gpus", "2"),
        ("engine_gpus: none\n", "engine_gpus", "none"),
        ("project_name: null\n", "project_name", None),
        ("preload: text-4b\n", "preload", "text-4b"),
        ("api_keys: [k1, k2]\n", "api_keys", ("k1", "k2")),
        ("api_keys: k1,k2\n", "api_keys", ("k1", "k2")),
        ("api_keys: [12345]\n", "api_keys", ("12345",)),
        ("allowed_hosts: []\n", "allowed_hosts", ()),
        ("checkpoint_roots: [/srv/train]\n", "checkpoint_roots", (Path("/srv/train"),)),
        ("allowed_images: ['vllm/*']\n", "allowed_images", ("vllm/*",)),
        ("aliases: {gpt-4o-mini: text-4b}\n", "aliases", {"gpt-4o-mini": "text-4b"}),
        (
            "models:\n  text-4b: {startup_timeout: 600, aliases: [q]}\n",
            "models",
            {"text-4b": {"startup_timeout": 600, "aliases": ["q"]}},
        ),
        ("env_file: /srv/.env\n", "env_files", (Path("/srv/.env"),)),
        (
            "env_files: [/srv/a.env, /srv/b.env]\n",
            "env_files",
            (Path("/srv/a.env"), Path("/srv/b.env")),
        ),
        ("", "port", 8080),
    ],
)
def test_the_file_gives_every_kind_of_value(
    tmp_path: Path, text: str, name: str, expected: object
) -> None:
    """YAML values, lists or comma-separated strings, and the flags' spellings."""
    assert getattr(_load(tmp_path, file=text), name) == expected


@pytest.mark.parametrize(
    ("flags", "name", "expected"),
    [
        ({"insecure_no_auth": True}, "insecure_no_auth", True),
        ({"port": "9000"}, "port", 9000),
        ({"log_level": "debug"}, "log_level", "debug"),
        ({"log_level": "WARNING"}, "log_level", "warning"),
        ({"log_format": "console"}, "log_format", "console"),
        ({"api_keys": ["k1", "k2"]}, "api_keys", ("k1", "k2")),
        ({"api_keys": "k1,k2"}, "api_keys", ("k1", "k2")),
        ({"allowed_origins": ["http://a.lan:3000"]}, "allowed_origins", ("http://a.lan:3000",)),
        ({"env_files": ["/srv/a.env"]}, "env_files", (Path("/srv/a.env"),)),
        ({"state_dir": "/srv/state"}, "state_dir", Path("/srv/state")),
    ],
)
def test_flags_give_every_kind_of_value(
    tmp_path: Path, flags: dict[str, Any], name: str, expected: object
) -> None:
    """Flags are init arguments, read like the other layers."""
    assert getattr(_load(tmp_path, flags=flags), name) == expected


@pytest.mark.parametrize(
    "text",
    ["compose: a.yml\n", "compose: [a.yml]\n", "compose_file: a.yml\n", "compose_files: [a.yml]\n"],
)
def test_the_file_names_compose_files_in_the_flags_spelling_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    """compose, compose_file and compose_files are one setting; compose may be one path."""
    monkeypatch.chdir(tmp_path)
    assert _load(tmp_path, file=text).compose_files == (tmp_path / "a.yml",)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"ORCHESTRATOR_COMPOSE_FILES": "a.yml"}, ("a.yml",)),
        ({"ORCHESTRATOR_COMPOSE": "b.yml"}, ("b.yml",)),
        ({"ORCHESTRATOR_COMPOSE": "b.yml", "ORCHESTRATOR_COMPOSE_FILES": "a.yml"}, ("b.yml",)),
        ({"ORCHESTRATOR_COMPOSE": "", "ORCHESTRATOR_COMPOSE_FILES": "a.yml"}, ("a.yml",)),
    ],
)
def test_orchestrator_compose_is_the_flags_spelling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: tuple[str, ...]
) -> None:
    """ORCHESTRATOR_COMPOSE, when set, wins over ORCHESTRATOR_COMPOSE_FILES."""
    monkeypatch.chdir(tmp_path)
    settings = _load(tmp_path, env=env)
    assert settings.compose_files == tuple(tmp_path / name for name in expected)


def test_variables_that_are_no_settings_are_left_alone(tmp_path: Path) -> None:
    """The client's ORCHESTRATOR_URL and _API_KEY, mappings and lower-case names are not read."""
    env = {
        "ORCHESTRATOR_URL": "http://gpu-box:8080",
        "ORCHESTRATOR_API_KEY": "k",
        "ORCHESTRATOR_MODELS": "text-4b",
        "ORCHESTRATOR_ALIASES": "a=b",
        "orchestrator_port": "1",
        "PORT": "2",
    }
    settings = _load(tmp_path, env=env)
    assert (settings.port, settings.api_keys, settings.models, settings.aliases) == (
        8080,
        (),
        {},
        {},
    )


def test_environ_replaces_the_process_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """environ={} reads nothing from os.environ; environ=None reads os.environ."""
    config = tmp_path / "c.yml"
    config.write_text("host: 0.0.0.0\n")
    monkeypatch.setenv("ORCHESTRATOR_PORT", "9300")
    monkeypatch.setenv("ORCHESTRATOR_CONFIG", str(config))
    isolated = load_settings({}, environ={})
    assert (isolated.port, isolated.host) == (8080, "127.0.0.1")
    process = load_settings({})
    assert (process.port, process.host) == (9300, "0.0.0.0")


def test_settings_built_directly_read_no_layers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings(...) holds its arguments and the defaults, and is immutable."""
    monkeypatch.setenv("ORCHESTRATOR_PORT", "9300")
    settings = Settings(host="0.0.0.0")
    assert (settings.host, settings.port) == ("0.0.0.0", 8080)
    with pytest.raises(ValidationError, match="frozen"):
        settings.port = 1


def test_resolved_defaults_depend_on_other_settings(tmp_path: Path) -> None:
    """checkpoint_roots under models_dir, allowed_images from engine_image, absolute paths."""
    settings = _load(
        tmp_path,
        file=f"models_dir: {tmp_path}/m\nengine_image: 'reg.lan/vllm:1'\nenv_file: ~/x.env\n",
    )
    assert settings.checkpoint_roots == (tmp_path / "m" / "checkpoints",)
    assert settings.allowed_images == default_allowed_images("reg.lan/vllm:1")
    assert settings.env_files == (Path.home() / "x.env",)
    given = _load(tmp_path, env={"ORCHESTRATOR_ALLOWED_IMAGES": "mine:*"})
    assert given.allowed_images == ("mine:*",)
    assert given.compose_source.files == given.compose_files


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("port", "eighty", "port must be int, got 'eighty'"),
        ("port", "8.5", "port must be int"),
        ("max_queue", "many", "max_queue must be int"),
        ("ttl", "soon", "ttl must be float"),
        ("rollback", "maybe", "rollback must be bool"),
        ("auto_switch", "2", "auto_switch must be bool"),
        ("drain_timeout", "-1", "drain_timeout must be 0 or more seconds"),
        ("ttl", "-0.5", "ttl must be 0 or more seconds"),
        ("max_queue", "0", "max_queue must be at least 1"),
        ("max_streams", "0", "max_streams must be at least 1"),
        ("header_timeout", "0", "header_timeout must be more than 0 seconds"),
        ("max_connections", "-1", "max_connections must be 0"),
        ("engine_gpus", "some", 'engine_gpus must be "all", "none" or a number'),
        ("engine_gpus", "0", "engine_gpus must be"),
        ("allowed_origins", "webui.lan", "allowed_origins: 'webui.lan' is not an origin"),
        ("allowed_origins", "ftp://a.lan", "allowed_origins: 'ftp://a.lan' is not an origin"),
        ("models_dir", "/srv/$USER", "models_dir must not contain '\\$'"),
        ("log_level", "loud", "log_level must be one of debug, info, warning, error"),
        ("log_format", "xml", "log_format must be one of auto, console, json, got 'xml'"),
    ],
)
def test_wrong_values_name_the_setting_and_the_layer(
    tmp_path: Path, name: str, value: str, fragment: str
) -> None:
    """Through each layer, the message names the file, the variable or the flag."""
    variable = f"ORCHESTRATOR_{name.upper()}"
    with pytest.raises(ConfigError, match=f"^{variable}: {fragment}"):
        _load(tmp_path, env={variable: value})
    config = re.escape(f"config file {tmp_path / 'orchestrator.yml'}")
    with pytest.raises(ConfigError, match=f"^{config}: {fragment}"):
        _load(tmp_path, file=f"{name}: '{value}'\n")
    flag = f"--{name.replace('_', '-')}"
    with pytest.raises(ConfigError, match=f"^{flag}: {fragment}"):
        _load(tmp_path, flags={name: value})


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("port: true\n", "port must be int, got True"),
        ("probe_interval: yes\n", "probe_interval must be float"),
        ("host: [a, b]\n", "host must be str"),
        ("api_keys: {a: b}\n", "api_keys must be a list"),
        ("compose: [a.yml, 3]\n", "compose_files must be a list"),
        ("models_dir: 3\n", "models_dir must be a path"),
        ("aliases: [a]\n", "aliases must map names to model ids"),
        ("aliases: {a: [b]}\n", "aliases must map names to model ids"),
        ("models: {a: 1}\n", "models must map model ids to settings"),
        ("colour: blue\n", "unknown setting 'colour' \\(known: agent_host, agent_port, aliases,"),
        (
            "compose: a.yml\nmax_queue: 0\nport: x\n",
            "port must be int, got 'x'; .*max_queue must be at least 1$",
        ),
        ("port: [\n", "is not valid YAML"),
        ("just text\n", "must hold a mapping of settings"),
    ],
)
def test_wrong_files_say_what_is_wrong(tmp_path: Path, text: str, fragment: str) -> None:
    """YAML's own types are checked too; every wrong value is named, not only the first."""
    with pytest.raises(ConfigError, match=fragment):
        _load(tmp_path, file=text)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    """A file named on purpose must be there, from --config or ORCHESTRATOR_CONFIG."""
    missing = tmp_path / "nowhere.yml"
    with pytest.raises(ConfigError, match=r"cannot read config file .*nowhere\.yml"):
        load_settings({}, config_file=missing, environ={})
    with pytest.raises(ConfigError, match=r"cannot read config file .*nowhere\.yml"):
        load_settings({}, environ={"ORCHESTRATOR_CONFIG": str(missing)})
    with pytest.raises(ConfigError, match="not a file"):
        load_settings({}, config_file=tmp_path, environ={})


def test_unknown_flags_are_refused(tmp_path: Path) -> None:
    """A flag that is no setting is a mistake in the caller, named as such."""
    with pytest.raises(ConfigError, match="--colour: unknown setting 'colour'"):
        _load(tmp_path, flags={"colour": "blue"})
