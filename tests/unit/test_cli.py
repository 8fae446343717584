"""The command line's conventions: global options on either side of the command, --version,
an example in every --help, errors as one line on stderr, a table that fits 80 columns, and
log lines for people or for machines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from orchestrator import __version__
from orchestrator.cli import build_parser, main
from orchestrator.client import ELLIPSIS, format_models, shorten
from orchestrator.logs import configure_logging
from tests.rig import REPO_ROOT

GLOBAL = ["--url", "http://gpu-box:8080", "--config", "mo.yml"]
GLOBAL += ["--log-level", "debug", "--log-format", "json"]
COMMANDS = {
    "models": ["models", "list"],
    "pull": ["pull", "org/tiny"],
    "serve": ["serve", "--port", "9000"],
    "check": ["check"],
    "doctor": ["doctor", "--port", "9000"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_global_options_before_or_after_the_command(command: str) -> None:
    """--url, --config, --log-level and --log-format work on either side of the command."""
    words = COMMANDS[command]
    for argv in ([*GLOBAL, *words], [*words, *GLOBAL]):
        args = build_parser().parse_args(argv)
        given = (args.url, args.config, args.log_level, args.log_format)
        assert given == ("http://gpu-box:8080", Path("mo.yml"), "debug", "json"), argv
        assert args.command == command


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_value_after_the_command_wins(command: str) -> None:
    """Given on both sides, the value after the command's name is the one used."""
    words = COMMANDS[command]
    args = build_parser().parse_args(["--log-level", "info", *words, "--log-level", "error"])
    assert args.log_level == "error"
    bare = build_parser().parse_args(words)
    assert (bare.url, bare.config, bare.log_level, bare.log_format) == (None, None, None, None)


def test_models_options_between_and_after_the_action() -> None:
    """`models --url X list` and `models list --url X` both work, and so does --api-key."""
    for argv in (
        ["models", "--url", "http://a:1", "--api-key", "k", "list"],
        ["models", "list", "--url", "http://a:1", "--api-key", "k"],
        ["--url", "http://a:1", "models", "list", "--api-key", "k"],
    ):
        args = build_parser().parse_args(argv)
        assert (args.url, args.api_key, args.action) == ("http://a:1", "k", "list"), argv
    assert not hasattr(build_parser().parse_args(["models", "list"]), "api_key")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package's version and exits 0."""
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"model-orchestrator {__version__}\n"


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["doctor"],
        ["check"],
        ["pull"],
        ["models"],
        ["models", "list"],
        ["models", "add"],
        ["models", "rm"],
        ["models", "enable"],
        ["models", "disable"],
    ],
)
def test_every_help_has_an_example(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Each --help ends with a command to copy, laid out as written."""
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert "Example" in out
    example = f"  model-orchestrator {' '.join(command)}".rstrip()
    assert any(line.startswith(example) for line in out.splitlines()), out


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        ({"HF_ENDPOINT": "http://127.0.0.1:9"}, "cannot reach the Hub at http://127.0.0.1:9"),
    ],
)
def test_pull_errors_go_to_stderr_once(
    tmp_path: Path, variables: dict[str, str], fragment: str
) -> None:
    """A repo that cannot be fetched: one error line on stderr, none on stdout, no log lines."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "ORCHESTRATOR_"))}
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "pull", "org/tiny",
         "--models-dir", str(tmp_path / "models")],
        cwd=REPO_ROOT, env={**env, **variables}, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stdout == f"pulling org/tiny into {tmp_path / 'models' / 'hub'}\n"
    (line,) = done.stderr.splitlines()
    assert line.startswith("model-orchestrator: error: ") and fragment in line


def test_models_errors_go_to_stderr_once() -> None:
    """The daemon not answering is one error line, with what to do."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "models", "list", "--url", "http://127.0.0.1:9"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (1, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith("model-orchestrator: error: cannot reach the daemon at")


def test_a_wrong_setting_is_one_error_line(tmp_path: Path) -> None:
    """A setting that is refused stops the command with one line naming it."""
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "--log-format", "json", "doctor", "--port",
         "eighty"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("argument --port: invalid int value: 'eighty'")
    config = tmp_path / "mo.yml"
    config.write_text("log_format: xml\n")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "doctor", "--config", str(config)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"model-orchestrator: error: config file {config}: log_format must be one of"
        " auto, console, json, got 'xml'\n"
    )


def test_serve_says_which_folder_it_cannot_make(tmp_path: Path) -> None:
    """A state dir under a file: the start-up check's error, then the OS's words, once."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    (tmp_path / "docker-compose.yml").write_text("services:\n  other:\n    image: x\n")
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "serve", "--log-format", "json",
         "--compose", str(tmp_path / "docker-compose.yml"), "--state-dir", str(blocker / "state"),
         "--models-dir", str(tmp_path / "models"), "--port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    *logged, last = done.stderr.splitlines()
    checks = {entry.get("check"): entry for entry in map(json.loads, logged)}
    assert checks["state dir"]["level"] == "error"
    assert checks["state dir"]["event"].endswith(f"{blocker} is not a folder")
    assert last == f"model-orchestrator: error: [Errno 20] Not a directory: '{blocker / 'state'}'"


# --- the models table ---------------------------------------------------------------------


def test_table_fits_80_columns_and_keeps_the_id() -> None:
    """Long names and sources are cut with an ellipsis; the id stays whole."""
    long_id = "Qwen3-VL-30B-A3B-Instruct-AWQ"
    models: list[dict[str, Any]] = [
        {
            "id": long_id,
            "display_name": "Qwen3 VL 30B A3B Instruct, quantized with AWQ by QuantTrio",
            "origin": "compose",
            "cache": {"status": "incomplete"},
            "repo": "QuantTrio/Qwen3-VL-30B-A3B-Instruct-AWQ",
        },
        {
            "id": "ckpt",
            "display_name": "Checkpoint",
            "origin": "registry",
            "enabled": False,
            "cache": {"status": "present"},
            "source": {"path": "/srv/train/a-very-long-folder-name/job_42/checkpoint-100"},
        },
    ]
    status = {"active": long_id, "state": "starting"}
    lines = format_models(models, status, "table", width=80).splitlines()
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["ID", "NAME", "ORIGIN", "STATE", "CACHE", "SOURCE"]
    assert lines[1].startswith(long_id + "  ") and "starting" in lines[1]
    # A source keeps both ends: the namespace or root, and the checkpoint's folder.
    assert ELLIPSIS in lines[1] and lines[2].rstrip().endswith("-100")
    assert "disabled" in lines[2]
    wide = format_models(models, status, "table").splitlines()
    assert "QuantTrio/Qwen3-VL-30B-A3B-Instruct-AWQ" in wide[1]


def test_shorten() -> None:
    """Cut at the end, or in the middle to keep both ends of a repo or a path."""
    assert shorten("abcdef", 6) == "abcdef"
    assert shorten("abcdef", 4) == "abc…"
    assert shorten("org/long-name", 7, middle=True) == "org…ame"
    assert shorten("abc", 1) == "…"


# --- log lines ----------------------------------------------------------------------------


@pytest.fixture
def logging_reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def test_log_format(logging_reset: None) -> None:
    """auto is JSON when the stream is no terminal; console is for people."""
    out = io.StringIO()
    assert configure_logging("info", log_format="auto", stream=out) is False
    structlog.get_logger("t").info("hello", model="alpha")
    assert json.loads(out.getvalue())["event"] == "hello"
    out = io.StringIO()
    assert configure_logging("info", log_format="console", stream=out) is True
    structlog.get_logger("t").info("hello", model="alpha")
    structlog.get_logger("t").debug("hidden")
    text = out.getvalue()
    assert "hello" in text and "model" in text and "hidden" not in text
    assert not text.startswith("{")
