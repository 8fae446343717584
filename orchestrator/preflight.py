"""Before the GPU is touched: may this model run at all?"""

from __future__ import annotations

from .cache import Verdicts
from .compose import ModelSpec
from .errors import ModelDisabled, ModelNotCached, ModelUnusable


def check_runnable(spec: ModelSpec, *, disabled: frozenset[str], verdicts: Verdicts) -> None:
    """Refuse a model that is disabled, whose command could not be rewritten, or whose
    weights are not all on disk. Touches the disk: call it off the event loop."""
    if spec.id in disabled:
        raise ModelDisabled(
            f"model {spec.id} is disabled; enable it with POST /models/{spec.id}/enable",
            model=spec.id,
        )
    if spec.unusable:
        raise ModelUnusable(
            f"model {spec.id} cannot be run as its compose file says: {spec.unusable};"
            " see `model-orchestrator check`",
            model=spec.id,
        )
    verdict = verdicts.of(spec)
    if verdict is None or verdict.status == "present":
        return
    if spec.checkpoint is not None:
        raise ModelNotCached(verdict.reason, model=spec.id, path=str(spec.checkpoint))
    raise ModelNotCached(
        verdict.reason, model=spec.id, repo=spec.repo, cache_path=str(verdicts.hub_dir)
    )
