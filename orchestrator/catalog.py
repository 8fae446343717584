"""The daemon's models: those the compose file declares plus those added at run time.

The catalog is the one owner of the registry. Each change is applied whole or not at
all: the new set of models is rendered, rewritten like the user's file, written to a
candidate copy that ``docker compose config`` must accept, and only then saved to the
database, moved over the normalized compose file and handed to the switcher.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import structlog

from .compose import (
    ComposeError,
    ComposeProject,
    ComposeSource,
    ModelSpec,
    canonical,
    dump_literal,
    merge_services,
    render,
    rewrite_project,
)
from .docker import ImageReader
from .errors import BadRequest, Conflict, ModelNotFound, OrchestratorError
from .naming import identify
from .pull import PullProgress, pull
from .registry import (
    COMPOSE_EDITABLE,
    EngineDefaults,
    ModelEntry,
    RegistryLimits,
    apply_changes,
    default_allowed_images,
    render_document,
    resolve_path,
)
from .schemas import ModelChanges, NewModel, refusal
from .store import Store
from .tasks import cancel_all

log = structlog.get_logger(__name__)

PULL_REPORT_INTERVAL = 0.25
NORMALIZED_COMPOSE = "compose.yml"
REGISTRY_COMPOSE = "registry-compose.yml"

# Checks a candidate normalized compose file with the given profiles enabled.
Validator = Callable[[Path, Iterable[str]], Awaitable[None]]
# What `docker compose config` prints for a set of files.
ConfigReader = Callable[[ComposeSource], Awaitable[str]]
ModelsChanged = Callable[[Mapping[str, ModelSpec], frozenset[str]], None]


@dataclass(frozen=True)
class CatalogPaths:
    source: ComposeSource
    models_dir: Path
    state_dir: Path

    @property
    def hub_dir(self) -> Path:
        return self.models_dir / "hub"

    @property
    def normalized(self) -> Path:
        return self.state_dir / NORMALIZED_COMPOSE

    @property
    def registry(self) -> Path:
        return self.state_dir / REGISTRY_COMPOSE


class Catalog:
    def __init__(
        self,
        *,
        paths: CatalogPaths,
        store: Store,
        read_config: ConfigReader,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
        engine_defaults: EngineDefaults | None = None,
        limits: RegistryLimits | None = None,
        hub_endpoint: str | None = None,
        read_images: ImageReader | None = None,
    ) -> None:
        self.paths = paths
        self._read_images = read_images
        self.store = store
        self._read_config = read_config
        self.overrides = dict(overrides or {})
        self.engine_defaults = engine_defaults or EngineDefaults()
        self.limits = limits or RegistryLimits(
            checkpoint_roots=(paths.models_dir / "checkpoints",),
            allowed_images=default_allowed_images(self.engine_defaults.image),
        )
        # None: huggingface_hub's own (HF_ENDPOINT, else the public Hub).
        self.hub_endpoint = hub_endpoint
        self._entries: dict[str, ModelEntry] = {}
        self.project: ComposeProject | None = None
        self._pulls: dict[str, PullProgress] = {}
        self._pull_tasks: dict[str, asyncio.Task[None]] = {}
        self._lock = asyncio.Lock()
        self._validate: Validator | None = None
        self._listeners: list[ModelsChanged] = []
        self._in_use: Callable[[str], bool] = lambda _model_id: False
        self._on_pull: Callable[[str, PullProgress], None] = lambda _model, _progress: None
        # The user's project as compose read it at start: a registry change does not pick
        # up edits to their files that the daemon was not restarted for.
        self._user_document: dict[str, Any] = {}

    # -- start-up ------------------------------------------------------------------

    async def load(self) -> ComposeProject:
        """Read the stored registry and write the normalized compose file the daemon runs.

        A stored model that no longer fits (its id is now a profile of the user's file)
        is left out with a warning rather than keeping the daemon from starting.
        """
        stored = [ModelEntry.from_json(raw) for raw in await self.store.model_entries()]
        self._user_document = canonical(await self._read_config(self.paths.source))
        user_project = await self._build({})
        entries = self._with_compose_defaults(user_project, {})
        for entry in stored:
            if entry.origin == "compose" and entry.id in user_project.models:
                entries[entry.id] = entry
            elif entry.origin == "registry":
                if entry.id in user_project.models:
                    log.warning(
                        "stored model hidden by a compose profile of the same id", model=entry.id
                    )
                    continue
                entries[entry.id] = entry
        project = await self._build(entries)
        self._entries = self._with_compose_defaults(project, entries)
        self._install(project)
        return project

    def connect(
        self,
        *,
        validate: Validator | None,
        on_change: ModelsChanged,
        in_use: Callable[[str], bool],
        on_pull: Callable[[str, PullProgress], None] | None = None,
    ) -> None:
        """Wire the catalog to Docker (for validation), to whoever runs the models, and to
        whoever shows pull progress."""
        self._validate = validate
        self._in_use = in_use
        self._listeners.append(on_change)
        if on_pull is not None:
            self._on_pull = on_pull
        on_change(self.specs(), self.disabled())

    # -- reading ---------------------------------------------------------------------

    def specs(self) -> dict[str, ModelSpec]:
        assert self.project is not None, "load() first"
        specs = {}
        for model_id, spec in self.project.models.items():
            entry = self._entries.get(model_id)
            name = entry.display_name if entry and entry.display_name else spec.display_name
            specs[model_id] = replace(spec, display_name=name)
        return specs

    def entry_or_none(self, model_id: str) -> ModelEntry | None:
        return self._entries.get(model_id)

    def pull_progress(self, model_id: str) -> PullProgress | None:
        return self._pulls.get(model_id)

    def pulls(self) -> dict[str, PullProgress]:
        """Every pull this daemon ran, by model, as last reported."""
        return dict(self._pulls)

    def context_lengths(self) -> dict[str, int | None]:
        """What each model's capabilities say of its context length (for /v1/models)."""
        return {i: e.capabilities.get("context_length") for i, e in self._entries.items()}

    def disabled(self) -> frozenset[str]:
        return frozenset(e.id for e in self._entries.values() if not e.enabled)

    def entry(self, model_id: str) -> ModelEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ModelNotFound(
                f"unknown model {model_id!r}; known models: {known}", model=model_id
            ) from None

    # -- changes ---------------------------------------------------------------------

    async def add(self, new: NewModel) -> ModelEntry:
        path = None if new.path is None else resolve_path(new.path, self.limits)
        identity = identify(new.repo or str(path), metadata=new.metadata)
        model_id = new.id if "id" in new.model_fields_set else identity.id
        entry = ModelEntry(id=model_id, origin="registry", repo=new.repo, path=path)
        entry = apply_changes(entry, new, self.limits)
        if entry.display_name is None:
            entry = replace(entry, display_name=identity.display_name)
        if path is not None:
            entry = replace(entry, metadata={**entry.metadata, "model_path": path})
        async with self._lock:
            if model_id in self._entries:
                raise refusal("id", f"{model_id!r} is taken by another model; give another")
            self._refuse_duplicate_name(entry)
            entries = {**self._entries, model_id: entry}
            await self._commit(entries, changed=entry)
        log.info("model added", model=model_id, repo=new.repo, path=path)
        return entry

    async def update(self, model_id: str, changes: ModelChanges) -> ModelEntry:
        async with self._lock:
            current = self.entry(model_id)
            if current.origin == "compose":
                self._refuse_file_settings(changes)
            changed = apply_changes(current, changes, self.limits)
            if changed.enabled is False and self._in_use(model_id):
                raise self._refusal_in_use(model_id, "disable")
            self._refuse_duplicate_name(changed)
            await self._commit({**self._entries, model_id: changed}, changed=changed)
        log.info("model updated", model=model_id, fields=sorted(changes.model_fields_set))
        return changed

    async def set_enabled(self, model_id: str, enabled: bool) -> ModelEntry:
        return await self.update(model_id, ModelChanges(enabled=enabled))

    async def remove(self, model_id: str) -> None:
        async with self._lock:
            current = self.entry(model_id)
            if current.origin == "compose":
                files = ", ".join(str(f) for f in self.paths.source.files)
                raise Conflict(
                    f"model {model_id} is declared in the compose project ({files}); remove its"
                    f" profile there, or disable it with POST /models/{model_id}/disable",
                    model=model_id,
                )
            if self._in_use(model_id):
                raise self._refusal_in_use(model_id, "remove")
            entries = {k: v for k, v in self._entries.items() if k != model_id}
            await self._commit(entries, removed=model_id)
        log.info("model removed", model=model_id)

    # -- pulls -------------------------------------------------------------------------

    def start_pull(self, model_id: str, revision: str | None = None) -> PullProgress:
        """Download the model's repo in the background; progress shows in ``pulls``."""
        spec = self.specs().get(model_id)
        if spec is None:
            self.entry(model_id)  # raises 404
            raise ModelNotFound(f"unknown model {model_id!r}", model=model_id)
        if spec.repo is None:
            raise Conflict(
                f"model {model_id} loads {spec.model_arg}, not a Hub repo: nothing to pull",
                model=model_id,
            )
        running = self._pull_tasks.get(model_id)
        if running is not None and not running.done():
            return self._pulls[model_id]
        progress = PullProgress(spec.repo, revision or "main", 0, 0, 0, 0, "downloading")
        self._pulls[model_id] = progress

        announced = [0.0]

        def record(update: PullProgress) -> None:
            self._pulls[model_id] = update
            # Downloads report every few kilobytes; listeners hear at most 4 a second.
            now = time.monotonic()
            if update.state != "downloading" or now - announced[0] >= PULL_REPORT_INTERVAL:
                announced[0] = now
                self._on_pull(model_id, update)

        async def download() -> None:
            try:
                await pull(
                    self.paths.hub_dir,
                    spec.repo or "",
                    revision=revision,
                    progress=record,
                    endpoint=self.hub_endpoint,
                )
            except OrchestratorError as err:
                # Nobody awaits a background pull: its failure shows in pulls and here.
                log.warning("pull failed", model=model_id, repo=spec.repo, error=err.message)

        self._pull_tasks[model_id] = asyncio.create_task(download(), name=f"pull-{model_id}")
        return progress

    async def close(self) -> None:
        await cancel_all(list(self._pull_tasks.values()))

    # -- internals -----------------------------------------------------------------------

    def _refusal_in_use(self, model_id: str, action: str) -> Conflict:
        return Conflict(
            f"cannot {action} model {model_id}: it is loaded, asleep, starting or queued; switch to"
            " another model or POST /stop first",
            model=model_id,
        )

    def _refuse_duplicate_name(self, entry: ModelEntry) -> None:
        if entry.display_name is None:
            return
        # Names as shown: a compose model without a name of its own shows its file's.
        shown = {model_id: spec.display_name for model_id, spec in self.specs().items()}
        for other in self._entries.values():
            name = other.display_name or shown.get(other.id, other.id)
            if other.id != entry.id and name == entry.display_name:
                raise refusal(
                    "display_name",
                    f"{entry.display_name!r} is already the name of model {other.id};"
                    " choose another",
                )

    @staticmethod
    def _refuse_file_settings(changes: ModelChanges) -> None:
        """A model declared in the compose file keeps its lifecycle settings there."""
        file_settings = sorted(changes.model_fields_set - COMPOSE_EDITABLE)
        if file_settings:
            raise refusal(
                file_settings[0],
                "cannot be changed on a model declared in the compose file; edit that file"
                f" instead (allowed here: {', '.join(sorted(COMPOSE_EDITABLE))})",
            )

    async def _build(self, entries: Mapping[str, ModelEntry]) -> ComposeProject:
        """The user's project plus the registry's models, each read by compose, rewritten."""
        document = self._user_document
        added = render_document(entries, self.paths.hub_dir.resolve(), self.engine_defaults)
        if added["services"]:
            candidate = self.paths.state_dir / (REGISTRY_COMPOSE + ".candidate")
            _write_private(candidate, dump_literal(added))
            try:
                name = str(self._user_document.get("name") or "") or None
                text = await self._read_config(ComposeSource((candidate,), project_name=name))
            finally:
                candidate.unlink(missing_ok=True)
            document = merge_services(document, canonical(text))
        images = None
        if self._read_images is not None:
            references = (s.get("image") for s in document["services"].values())
            images = await self._read_images(r for r in references if isinstance(r, str))
        return rewrite_project(
            self.paths.source, document, self.paths.models_dir, self.overrides, images
        )

    @staticmethod
    def _with_compose_defaults(
        project: ComposeProject, entries: Mapping[str, ModelEntry]
    ) -> dict[str, ModelEntry]:
        merged = {
            model_id: entries.get(model_id) or ModelEntry(id=model_id, origin="compose")
            for model_id in project.models
        }
        return merged

    def _install(self, project: ComposeProject) -> None:
        private_folder(self.paths.state_dir)
        make_host_folders(project.host_folders)
        _write_atomically(self.paths.normalized, render(project))
        added = render_document(self._entries, self.paths.hub_dir.resolve(), self.engine_defaults)
        _write_atomically(
            self.paths.registry,
            "# Rendered by model-orchestrator from its registry; edits are overwritten.\n"
            + dump_literal(added),
        )
        self.project = project
        specs, disabled = self.specs(), self.disabled()
        for listener in self._listeners:
            listener(specs, disabled)

    async def _commit(
        self,
        entries: dict[str, ModelEntry],
        *,
        changed: ModelEntry | None = None,
        removed: str | None = None,
    ) -> None:
        try:
            project = await self._build(entries)
        except ComposeError as err:
            raise BadRequest(f"the model does not fit the compose project: {err}") from err
        except OrchestratorError as err:
            raise BadRequest(f"docker compose refused the model's service: {err.message}") from err
        if self._validate is not None:
            candidate = self.paths.state_dir / (NORMALIZED_COMPOSE + ".candidate")
            _write_private(candidate, render(project))
            try:
                await self._validate(candidate, project.models)
            except OrchestratorError as err:
                raise BadRequest(
                    f"docker compose refused the model's service: {err.message}"
                ) from err
            finally:
                candidate.unlink(missing_ok=True)
        if changed is not None:
            await self.store.save_model_entry(
                changed.id,
                changed.origin,
                changed.to_json(),
                changed.created_at,
                changed.updated_at,
            )
        if removed is not None:
            await self.store.delete_model_entry(removed)
        self._entries = entries
        self._install(project)


def make_host_folders(folders: Iterable[Path]) -> None:
    """Folders the engines bind, made as the daemon's user before compose runs: docker would
    make them owned by root, which the user could then not clear."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            # Not fatal: docker makes it at the engine's start, as root.
            log.warning(
                "cannot make a folder the engines mount", folder=str(folder), error=str(err)
            )


def private_folder(folder: Path) -> None:
    """The state dir, readable by the daemon's user alone: the copy holds values from .env."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        stream.write(text)
    path.chmod(0o600)  # an older file may have been made with wider rights


def _write_atomically(path: Path, text: str) -> None:
    """A compose call that is reading the file sees the old one or the new one, never half."""
    partial = path.with_name(path.name + ".partial")
    _write_private(partial, text)
    os.replace(partial, path)
