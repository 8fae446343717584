"""Models standing by: the models recent switches left, kept started behind the start gate.

A switch to a model standing by skips docker's start of its container (gate.py): its
engine is let through as soon as the old one has exited. A standby holds no GPU memory,
only a container whose main process is the gate's shell. The procedure owns one of these
and is the only caller; the work after a switch (staging the model it left, stopping the
standbys past the limit) runs behind it, and the next switch waits for that work first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Mapping

import structlog

from .compose import ModelSpec
from .errors import OrchestratorError
from .runtime import ModelRuntime
from .tasks import cancel_all

log = structlog.get_logger(__name__)


class Standbys:
    def __init__(
        self,
        *,
        runtime: ModelRuntime,
        models: Callable[[], Mapping[str, ModelSpec]],
        prepare: Callable[[ModelSpec], Awaitable[None]],
        limit: int = 1,
    ) -> None:
        self.runtime, self.limit = runtime, limit
        self._models, self._prepare = models, prepare
        # Model id -> the spec it was staged from, least recently left first.
        self._staged: dict[str, ModelSpec] = {}
        self._pending: set[str] = set()  # models the work behind is to stage
        self._work: asyncio.Task[None] | None = None

    @property
    def models(self) -> tuple[str, ...]:
        """The models standing by, least recently left first."""
        return tuple(self._staged)

    @property
    def ids(self) -> frozenset[str]:
        """The models standing by or being staged: their containers run, engines unrun."""
        return frozenset([*self._staged, *self._pending])

    async def close(self) -> None:
        # Standbys left held are stopped by the next daemon's reconcile.
        if self._work is not None:
            await cancel_all([self._work])

    def after_switch(self, left: ModelSpec | None) -> None:
        """Behind a switch, once its target's engine has started: stop the standbys past
        the limit, least recently left first, then stand by for the model it left (None:
        none to add). The work runs while the target loads: a later switch to a model
        that was stopped finds its fresh container made by then."""
        earlier = self._work
        left = left if self.limit > 0 else None
        if left is not None:
            self._pending.add(left.id)

        async def work() -> None:
            if earlier is not None:
                await asyncio.gather(earlier, return_exceptions=True)
            await self._trim(room=1 if left is not None else 0)
            if left is not None:
                await self._stage(left)

        self._work = asyncio.create_task(work(), name="standby")

    async def take(self, model_id: str) -> bool:
        """Before a switch to this model: True when it stands by as the file still has it;
        the switch's start then lets its engine through. No longer a standby either way.
        Work behind an earlier switch is waited for only when it is staging this model."""
        if model_id in self._pending:
            await self._settled()
        spec = self._staged.pop(model_id, None)
        if spec is None:
            return False
        if self._models().get(model_id) == spec:
            return True
        await self._unstage(spec)
        return False

    async def leave(self, models: Iterable[str]) -> None:
        """Stop these standbys, unrun."""
        for model_id in models:
            spec = self._staged.pop(model_id, None)
            if spec is not None:
                await self._unstage(spec)

    async def leave_all(self) -> None:
        """Stop every standby, unrun, once the work behind the last switch is done."""
        await self._settled()
        await self.leave(list(self._staged))

    async def _settled(self) -> None:
        if self._work is not None:
            await asyncio.gather(self._work, return_exceptions=True)

    async def _stage(self, spec: ModelSpec) -> None:
        try:
            await self._prepare(spec)
            if await self.runtime.stage(spec, behind=True):
                self._staged[spec.id] = spec
                log.info("standing by", model=spec.id)
        except OrchestratorError as err:
            log.warning("could not stand by", model=spec.id, error=err.message)
        finally:
            self._pending.discard(spec.id)

    async def _trim(self, room: int) -> None:
        """Stop the standbys whose model changed, and the least recently left until
        ``room`` more fit within the limit."""
        models = self._models()
        for model_id, spec in list(self._staged.items()):
            if models.get(model_id) != spec:
                await self._unstage(self._staged.pop(model_id))
        while self._staged and len(self._staged) + room > self.limit:
            await self._unstage(self._staged.pop(next(iter(self._staged))))

    async def _unstage(self, spec: ModelSpec) -> None:
        try:
            await self.runtime.unstage(spec)
        except OrchestratorError as err:
            log.warning("could not stop a standby", model=spec.id, error=err.message)
