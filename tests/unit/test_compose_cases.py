"""Real-world compose projects (tests/compose_cases), read by Compose, rewritten, read back.

Each case folder holds a user's files and ``case.yaml``, what the daemon must make of them.
The daemon's copy is read by the real Compose CLI a second time, and the engine's command,
mounts and environment are taken from that output: what the container would really get.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from orchestrator.compose import (
    DEFAULT_FILE_NAMES,
    ComposeProject,
    ComposeSource,
    canonical,
    compose_files,
    render,
    rewrite_project,
)
from orchestrator.docker import runtime_environment
from tests.fakes import compose_binary, read_config

CASES = Path(__file__).resolve().parent.parent / "compose_cases"
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
SCRIPT = "{script}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Mount(_Strict):
    """One mount of the engine container: where it comes from, whether it is read-only."""

    source: str  # a host path, a volume's name, or "" for a tmpfs
    read_only: bool = False


class EngineRun(_Strict):
    """The engine service as the daemon's copy gives it to the container.

    Flags are compared as vLLM's parser reads them: the words before the first flag in
    order, the flags in any order. "{script}" in the entrypoint or command stands for a
    shell script, checked by what it runs (``vllm_argv``) and what it keeps.
    """

    # null: the key is absent from the copy (the image's own entrypoint or command runs).
    entrypoint: list[str] | None
    command: list[str] | None
    # The words vllm is started with when the container's shell runs the script (a stub
    # vllm on PATH records them), and text the script must still hold.
    vllm_argv: list[str] | None = None
    script_contains: list[str] = Field(default_factory=list)
    # Every mount, by target; null skips the check (a model that cannot run anyway).
    mounts: dict[str, Mount] | None
    environment: dict[str, str] = Field(default_factory=dict)  # a subset of the copy's
    absent_environment: list[str] = Field(default_factory=list)
    fields: dict[str, Any] = Field(default_factory=dict)  # other keys, mappings as subsets
    absent: list[str] = Field(default_factory=list)  # dotted keys the copy must not have

    @model_validator(mode="after")
    def _script_is_checked(self) -> EngineRun:
        scripted = SCRIPT in [*(self.entrypoint or []), *(self.command or [])]
        if scripted != (self.vllm_argv is not None):
            raise ValueError(f"a {SCRIPT} entry and vllm_argv go together")
        return self


class OtherService(_Strict):
    """A service of the copy other than an engine: keys it must hold, keys it must not."""

    fields: dict[str, Any] = Field(default_factory=dict)  # mappings compared as subsets
    absent: list[str] = Field(default_factory=list)


class ModelCase(_Strict):
    """What one profile must become."""

    engine_service: str
    services: list[str]
    repo: str | None
    revision: str | None = None
    served_name: str
    display_name: str | None = None  # null: not checked
    container_port: int = 8000
    sleep: int | None = None  # the level a switch away puts it to sleep at; null: cold
    warmup: bool = False
    unusable: str | None = None  # a substring of ModelSpec.unusable; null: usable
    problems: list[str] = Field(default_factory=list)  # each problem matches one of these
    notes: list[str] = Field(default_factory=list)  # each must be in some note
    engine: EngineRun


class Case(_Strict):
    """A case folder's case.yaml."""

    description: str
    files: list[str] | None = None  # null: the default-named file, as docker compose picks
    env_files: list[str] = Field(default_factory=list)  # as --env-file
    project_name: str | None = None  # as --project-name
    name: str | None = None  # the project's name compose settles on; null: not checked
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)  # config `models:`
    xfail: str | None = None  # the daemon's bug this case shows
    shared_services: list[str] = Field(default_factory=list)
    models: dict[str, ModelCase]
    services: dict[str, OtherService] = Field(default_factory=dict)  # others in the copy


def _cases() -> list[Any]:
    params = []
    for folder in sorted(CASES.iterdir()):
        if not (folder / "case.yaml").is_file():
            continue
        reason = Case.model_validate(yaml.safe_load((folder / "case.yaml").read_text())).xfail
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        params.append(pytest.param(folder, id=folder.name, marks=marks))
    return params


def _fill(value: Any, places: Mapping[str, str]) -> Any:
    """``{models}`` and ``{case}`` replaced in every string of an expectation."""
    if isinstance(value, str):
        for placeholder, path in places.items():
            value = value.replace(placeholder, path)
        return value
    if isinstance(value, Mapping):
        return {_fill(k, places): _fill(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(item, places) for item in value]
    return value


def _contains(actual: Any, expected: Any, where: str) -> None:
    """Mappings compared key by key (extra keys allowed), lists item by item, else ==."""
    if isinstance(expected, Mapping):
        assert isinstance(actual, Mapping), f"{where}: {actual!r} is not a mapping"
        for key, value in expected.items():
            assert key in actual, f"{where}: no {key!r} in {dict(actual)!r}"
            _contains(actual[key], value, f"{where}.{key}")
        return
    if isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: {actual!r} is not a list"
        assert len(actual) == len(expected), f"{where}: {actual!r} != {expected!r}"
        for index, (got, wanted) in enumerate(zip(actual, expected, strict=True)):
            _contains(got, wanted, f"{where}[{index}]")
        return
    assert actual == expected, f"{where}: {actual!r} != {expected!r}"


def _assert_absent(service: Mapping[str, Any], dotted: str, where: str) -> None:
    value: Any = service
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return
        value = value[key]
    raise AssertionError(f"{where}.{dotted} should not be there: {value!r}")


def _as_parsed(tokens: list[str] | None) -> tuple[list[str], list[list[str]]] | None:
    """An argument list as vLLM's parser sees it: the leading words (launcher, positional
    model) in order, then each flag with its values, ordered by flag name only."""
    if tokens is None:
        return None
    at = 0
    while at < len(tokens) and not tokens[at].startswith("-"):
        at += 1
    groups: list[list[str]] = []
    for token in tokens[at:]:
        if token.startswith("-"):
            groups.append([token])
        else:
            groups[-1].append(token)
    return tokens[:at], sorted(groups, key=lambda group: group[0].partition("=")[0])


def _same_run(actual: list[str] | None, expected: list[str] | None, where: str) -> None:
    """An entrypoint or command compared as it runs; a script stands in for SCRIPT."""
    if expected is not None and SCRIPT in expected:
        assert actual is not None and len(actual) == len(expected), (where, actual)
        for got, wanted in zip(actual, expected, strict=True):
            assert wanted == SCRIPT or got == wanted, (where, actual)
        return
    assert _as_parsed(actual) == _as_parsed(expected), f"{where}: {actual} != {expected}"


def _default_file(folder: Path) -> Path:
    for name in DEFAULT_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise AssertionError(f"{folder} has no compose file with a default name")


async def _config_of_copy(copy: Path, project_dir: Path) -> dict[str, Any]:
    """``docker compose config`` of the daemon's copy, run as the daemon runs it."""
    argv = [compose_binary(), "--project-directory", str(project_dir), "--file", str(copy)]
    done = await asyncio.to_thread(
        subprocess.run,
        [*argv, "--profile", "*", "config"],
        capture_output=True,
        text=True,
        check=False,
        env=runtime_environment(os.environ),
    )
    assert done.returncode == 0, f"compose refused the daemon's copy:\n{done.stderr}"
    # A literal copy names no variable, so compose has none to miss.
    assert "variable is not set" not in done.stderr, done.stderr
    return canonical(done.stdout)


def _mounts(service: Mapping[str, Any]) -> dict[str, Mount]:
    mounts: dict[str, Mount] = {}
    for volume in service.get("volumes") or []:
        assert isinstance(volume, Mapping), f"a volume compose did not expand: {volume!r}"
        target = str(volume["target"])
        assert target not in mounts, f"two mounts at {target}"
        mounts[target] = Mount(
            source=str(volume.get("source") or ""), read_only=bool(volume.get("read_only"))
        )
    return mounts


def _effective_restart(service: Mapping[str, Any]) -> str:
    """The restart policy docker compose gives the container: deploy.restart_policy, when
    set, wins over restart (compose's getRestartPolicy)."""
    policy = (service.get("deploy") or {}).get("restart_policy")
    if isinstance(policy, Mapping):
        condition = str(policy.get("condition") or "")
        return {"none": "no", "any": "always", "": "no"}.get(condition, condition)
    return str(service.get("restart") or "no").split(":")[0]


def _vllm_argv(argv: list[str], scratch: Path) -> list[str]:
    """The arguments vllm gets when a shell runs ``argv``: vllm is a recording stub and the
    only program on PATH, so nothing else the script names (tee, nvidia-smi) runs here."""
    assert argv and PurePosixPath(argv[0]).name in SHELLS, f"not a shell command: {argv}"
    shell = shutil.which(PurePosixPath(argv[0]).name)
    assert shell is not None, f"no {argv[0]} on this machine"
    stubs = scratch / "stubs"
    stubs.mkdir(exist_ok=True)
    record = scratch / "vllm-argv"
    record.unlink(missing_ok=True)
    stub = stubs / "vllm"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {shlex.quote(str(record))}\n')
    stub.chmod(0o755)
    subprocess.run(
        [shell, *argv[1:]],
        env={"PATH": str(stubs)},
        cwd=scratch,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert record.is_file(), f"the script never started vllm: {argv}"
    return record.read_bytes().decode().split("\0")[:-1]


def _check_model(
    model_id: str,
    expected: ModelCase,
    project: ComposeProject,
    copy: Mapping[str, Any],
    scratch: Path,
) -> None:
    spec = project.models[model_id]
    assert spec.engine_service == expected.engine_service
    assert sorted(spec.services) == sorted(expected.services)
    assert spec.repo == expected.repo
    assert spec.revision == expected.revision
    assert spec.served_name == expected.served_name
    assert spec.container_port == expected.container_port
    assert spec.sleep == expected.sleep
    assert spec.warmup == expected.warmup
    if expected.display_name is not None:
        assert spec.display_name == expected.display_name
    if expected.unusable is None:
        assert spec.unusable is None
    else:
        assert spec.unusable is not None and expected.unusable in spec.unusable, spec.unusable
    problems = project.problems.get(model_id, [])
    for wanted in expected.problems:
        assert any(wanted in problem for problem in problems), (wanted, problems)
    for problem in problems:
        assert any(wanted in problem for wanted in expected.problems), f"unexpected: {problem}"

    where = f"services.{expected.engine_service}"
    engine = copy["services"][expected.engine_service]
    run = expected.engine
    _same_run(engine.get("entrypoint"), run.entrypoint, f"{where}.entrypoint")
    _same_run(engine.get("command"), run.command, f"{where}.command")
    argv = [*(engine.get("entrypoint") or []), *(engine.get("command") or [])]
    if run.vllm_argv is not None:
        assert _as_parsed(_vllm_argv(argv, scratch)) == _as_parsed(run.vllm_argv), argv
    for part in run.script_contains:
        assert any(part in word for word in argv), (part, argv)
    if run.mounts is not None:
        assert _mounts(engine) == run.mounts
    environment = {
        k: None if v is None else str(v) for k, v in (engine.get("environment") or {}).items()
    }
    for name, value in run.environment.items():
        assert environment.get(name) == value, (name, environment)
    for name in run.absent_environment:
        assert name not in environment, (name, environment)
    _contains(engine, run.fields, where)
    for dotted in run.absent:
        _assert_absent(engine, dotted, where)
    # The daemon restarts models itself; docker must never do it behind its back.
    assert _effective_restart(engine) == "no", f"{where} would be restarted by docker"
    notes = [note.what for note in project.notes.get(model_id, [])]
    for wanted in expected.notes:
        assert any(wanted in note for note in notes), (wanted, notes)


@pytest.mark.parametrize("case_dir", _cases())
async def test_compose_case(case_dir: Path, tmp_path: Path) -> None:
    """A case's project, rewritten and read back by Compose, is what case.yaml says."""
    folder = tmp_path / case_dir.name
    shutil.copytree(case_dir, folder)
    folder = folder.resolve()
    models_dir = tmp_path / "models"
    (models_dir / "hub").mkdir(parents=True)
    places = {"{models}": str(models_dir.resolve()), "{case}": str(folder)}
    case = Case.model_validate(_fill(yaml.safe_load((folder / "case.yaml").read_text()), places))

    given = [folder / name for name in case.files] if case.files else [_default_file(folder)]
    files = compose_files(given, {}, folder)
    env_files = tuple(folder / name for name in case.env_files)
    source = ComposeSource(files, env_files, case.project_name)
    document = canonical(await read_config(source))
    project = rewrite_project(source, document, models_dir, case.overrides)

    copy_file = tmp_path / "state" / "compose.yml"
    copy_file.parent.mkdir()
    copy_file.write_text(render(project))
    copy = await _config_of_copy(copy_file, folder)

    if case.name is not None:
        assert project.name == case.name
        assert copy["name"] == case.name
    assert sorted(project.models) == sorted(case.models)
    assert sorted(project.shared_services) == sorted(case.shared_services)
    for model_id, expected in case.models.items():
        _check_model(model_id, expected, project, copy, tmp_path)
    for name, other in case.services.items():
        assert name in copy["services"], f"no service {name} in the copy"
        service = copy["services"][name]
        _contains(service, other.fields, f"services.{name}")
        for dotted in other.absent:
            _assert_absent(service, dotted, f"services.{name}")
