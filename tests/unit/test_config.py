"""Settings layers: defaults, config file, ORCHESTRATOR_* variables, flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import load_settings
from orchestrator.errors import ConfigError


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
