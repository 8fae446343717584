"""What ``serve`` says once it listens: where, what it read, which models it can serve.

At a terminal this is a short block of lines for people; elsewhere the same facts go
out as one ``serving`` log line.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .cache import Verdicts
from .doctor import url_host, weights_fix
from .security import KEY_FILE, is_loopback

if TYPE_CHECKING:
    from .daemon import Daemon


@dataclass(frozen=True)
class ModelLine:
    id: str
    weights: str  # the cache verdict (present, incomplete, missing), or unusable
    fix: str | None = None  # the command that fetches missing weights, or why it cannot run


@dataclass(frozen=True)
class Banner:
    project: str
    host: str
    port: int
    compose_files: tuple[Path, ...]
    keys: bool
    keys_how: str  # where the keys come from, or why there are none
    key_file: Path | None  # the file holding the key, when the daemon made one
    models: tuple[ModelLine, ...]

    @property
    def url(self) -> str:
        return f"http://{url_host(self.host)}:{self.port}"

    def lines(self) -> list[str]:
        """The banner for a terminal."""
        keys = "on" if self.keys else "off"
        rows = [
            f"model-orchestrator {__version__}, project {self.project or 'unnamed'}",
            f"  listening  {self.host}:{self.port}",
            f"  dashboard  {self.url}/",
            f"  compose    {', '.join(str(path) for path in self.compose_files)}",
            f"  API keys   {keys}: {self.keys_how}",
        ]
        if not self.models:
            return [*rows, "  models     none: no service of the compose file has a profile"]
        width = max(len(model.id) for model in self.models)
        for index, model in enumerate(self.models):
            label = "  models     " if index == 0 else " " * 13
            fix = f" ({model.fix})" if model.fix else ""
            rows.append(f"{label}{model.id.ljust(width)}  {model.weights}{fix}")
        return rows

    def fields(self) -> dict[str, Any]:
        """The same facts for the ``serving`` log line."""
        return {
            "host": self.host,
            "port": self.port,
            "url": self.url,
            "dashboard": f"{self.url}/",
            "project": self.project,
            "compose": [str(path) for path in self.compose_files],
            "models": {model.id: model.weights for model in self.models},
            "keys": "on" if self.keys else "off",
            "key_file": None if self.key_file is None else str(self.key_file),
        }


def _keys(daemon: Daemon) -> tuple[str, Path | None]:
    """Where the keys come from, never the keys: the settings, or the file made for them."""
    settings = daemon.settings
    if daemon.keys and settings.api_keys:
        count = len(settings.api_keys)
        return f"{count} key{'' if count == 1 else 's'} from the settings", None
    if daemon.keys:
        key_file = settings.state_dir / KEY_FILE
        return f"the key is in {key_file}", key_file
    if is_loopback(settings.host):
        return "only this machine can reach the daemon", None
    return "--insecure-no-auth: anyone who reaches the port can run containers", None


def _models(daemon: Daemon) -> tuple[ModelLine, ...]:
    hub = daemon.settings.models_dir / "hub"
    verdicts = Verdicts(hub)
    lines = []
    for model_id, spec in daemon.catalog.specs().items():
        verdict = verdicts.of(spec)
        if spec.unusable is not None:
            lines.append(ModelLine(model_id, "unusable", spec.unusable))
        elif verdict is None or verdict.status == "present":
            lines.append(ModelLine(model_id, "present" if verdict else "not checked"))
        else:
            lines.append(ModelLine(model_id, verdict.status, weights_fix(verdict, hub)))
    return tuple(lines)


async def banner(daemon: Daemon, port: int) -> Banner:
    """The banner of a daemon listening on ``port`` (the one bound, when 0 was asked for)."""
    keys_how, key_file = _keys(daemon)
    settings = daemon.settings
    return Banner(
        project=daemon.project.name,
        host=settings.host,
        port=port,
        compose_files=settings.compose_source.read_files,
        keys=bool(daemon.keys),
        keys_how=keys_how,
        key_file=key_file,
        # The cache check touches the disk: a worker thread, as the daemon's own does.
        models=await asyncio.to_thread(_models, daemon),
    )
