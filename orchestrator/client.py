"""The ``models`` commands: the running daemon's registry, through its HTTP API.

The commands change nothing themselves: the daemon validates, renders compose and
stores, so a model added from the terminal is the same as one added by an app.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8080"
TABLE_COLUMNS = ("id", "display_name", "origin", "enabled", "state", "cache", "source")


class DaemonUnavailable(Exception):
    pass


class DaemonRefused(Exception):
    """The daemon answered with an error; its message is meant for the user."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def call(
    base_url: str,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    api_key: str | None = None,
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = aiohttp.ClientTimeout(total=120)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout, headers=headers) as session,
            # Changes always go as JSON: the daemon refuses any other body type.
            session.request(
                method,
                base_url.rstrip("/") + path,
                json=body if body is not None or method in {"GET", "HEAD"} else {},
            ) as response,
        ):
            try:
                answer = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                answer = None
            if response.status >= 400:
                error = answer.get("error") if isinstance(answer, dict) else None
                message = (
                    error.get("message") if isinstance(error, dict) else None
                ) or f"HTTP {response.status}"
                raise DaemonRefused(response.status, str(message))
            return answer if isinstance(answer, dict) else {}
    except aiohttp.ClientError as err:
        raise DaemonUnavailable(
            f"cannot reach the daemon at {base_url} ({err}); is `model-orchestrator serve`"
            " running there? Set --url or ORCHESTRATOR_URL."
        ) from err


def _row(model: Mapping[str, Any], active: str | None, state: str) -> dict[str, str]:
    source = model.get("source") or {}
    cache = model.get("cache") or {}
    return {
        "id": str(model["id"]),
        "display_name": str(model.get("display_name") or ""),
        "origin": str(model.get("origin") or ""),
        "enabled": "yes" if model.get("enabled", True) else "no",
        "state": state if model["id"] == active else "-",
        "cache": str(cache.get("status") or "-"),
        "source": str(source.get("repo") or source.get("path") or model.get("repo") or "-"),
    }


def format_models(models: Sequence[Mapping[str, Any]], status: Mapping[str, Any], fmt: str) -> str:
    """The models as a table for people, or JSON or CSV for scripts."""
    if fmt == "json":
        return json.dumps(list(models), indent=2)
    active = status.get("active") or status.get("target")
    state = str(status.get("state") or "")
    rows = [_row(model, active, state) for model in models]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    widths = {c: max([len(c), *(len(r[c]) for r in rows)]) for c in TABLE_COLUMNS}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in TABLE_COLUMNS).rstrip()]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in TABLE_COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)
