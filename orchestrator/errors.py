"""The daemon's exceptions; each carries the HTTP status it maps to.

The API middleware is the one place that turns them into responses, so the core
raises these and never builds HTTP replies itself.
"""

from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def headers(self) -> dict[str, str]:
        """Response headers the error calls for; most need none."""
        return {}

    def to_body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        error.update(self.details)
        return {"error": error}


class BadRequest(OrchestratorError):
    status = 400
    code = "bad_request"


class ModelNotFound(OrchestratorError):
    status = 404
    code = "model_not_found"


class ModelNotCached(OrchestratorError):
    status = 409
    code = "model_not_cached"


class ModelDisabled(OrchestratorError):
    status = 409
    code = "model_disabled"


class ModelUnusable(OrchestratorError):
    """The daemon cannot run the model as its compose file says; the message says why."""

    status = 409
    code = "model_unusable"


class Cancelled(OrchestratorError):
    """The switch was called off (by POST /stop) before the model was ready."""

    status = 409
    code = "cancelled"


class Conflict(OrchestratorError):
    """The request is valid but the model's current state forbids it; the message says why."""

    status = 409
    code = "conflict"


class Unauthorized(OrchestratorError):
    status = 401
    code = "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(OrchestratorError):
    status = 403
    code = "forbidden"


class UnsupportedMediaType(OrchestratorError):
    """A request that changes something came without a JSON body type."""

    status = 415
    code = "unsupported_media_type"


class RequestTimeout(OrchestratorError):
    """The client did not send its whole body within the bound."""

    status = 408
    code = "request_timeout"


class TooBusy(OrchestratorError):
    """The model's queue is full; the client should come back after ``retry_after`` s."""

    status = 429
    code = "too_many_requests"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.details.get("retry_after", 1))}


class TooManyStreams(OrchestratorError):
    """Every place for a long-lived stream of this kind is taken."""

    status = 503
    code = "too_many_streams"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.details.get("retry_after", 5))}


class UpstreamError(OrchestratorError):
    """The model's engine could not be reached or broke off its answer."""

    status = 502
    code = "upstream_error"


class ContainerNotFound(OrchestratorError):
    status = 404
    code = "container_not_found"


class SwitchNotFound(OrchestratorError):
    status = 404
    code = "switch_not_found"


class AssetNotFound(OrchestratorError):
    status = 404
    code = "not_found"


class ModelExited(OrchestratorError):
    """The model's container exited before it became healthy."""

    status = 502
    code = "model_exited"


class SleepModeFailed(OrchestratorError):
    """vLLM's sleep or wake-up did not happen, or was not confirmed in time."""

    status = 502
    code = "sleep_mode_failed"


class StartTimeout(OrchestratorError):
    """The model did not become healthy within its startup timeout."""

    status = 504
    code = "start_timeout"


class DockerError(OrchestratorError):
    """Docker or the compose CLI refused or failed; the message carries its words."""

    status = 502
    code = "docker_error"


class ConfigError(OrchestratorError):
    status = 500
    code = "config_error"
