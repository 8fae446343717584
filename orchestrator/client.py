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
# The table on a terminal: 80 columns hold it with an id of 30 characters. A disabled model
# shows in the state column, which is otherwise "-" for every model but the active one.
SCREEN_COLUMNS = ("id", "display_name", "origin", "state", "cache", "source")
_HEADERS = {"display_name": "NAME"}


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


# Columns that give up width when the table is wider than the terminal, the wider first,
# down to their header's width; the id never does: it is what the next command takes.
_SHRINKING = ("display_name", "source")
# Where a shortened value keeps its words: a repo or a path says most at both ends.
_MIDDLE = frozenset({"source"})
ELLIPSIS = "…"


def shorten(text: str, width: int, *, middle: bool = False) -> str:
    """``text`` in at most ``width`` characters, an ellipsis standing for what was cut."""
    if len(text) <= width:
        return text
    if width <= 1:
        return ELLIPSIS[:width]
    if middle:
        head = (width - 1) // 2
        tail = width - 1 - head
        return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")
    return text[: width - 1] + ELLIPSIS


def _header(column: str) -> str:
    return _HEADERS.get(column, column.upper())


def _fit(widths: dict[str, int], width: int) -> dict[str, int]:
    over = sum(widths.values()) + 2 * (len(widths) - 1) - width
    while over > 0:
        column = max(_SHRINKING, key=lambda c: widths[c] - len(_header(c)))
        if widths[column] <= len(_header(column)):
            break
        widths[column] -= 1
        over -= 1
    return widths


def _screen_state(row: Mapping[str, str]) -> str:
    return "disabled" if row["enabled"] == "no" and row["state"] == "-" else row["state"]


def _table(rows: Sequence[Mapping[str, str]], width: int | None) -> str:
    screen = [{**row, "state": _screen_state(row)} for row in rows]
    widths = {c: max([len(_header(c)), *(len(r[c]) for r in screen)]) for c in SCREEN_COLUMNS}
    if width is not None:
        widths = _fit(widths, width)

    def line(cells: Mapping[str, str]) -> str:
        shown = (
            shorten(cells[c], widths[c], middle=c in _MIDDLE).ljust(widths[c])
            for c in SCREEN_COLUMNS
        )
        return "  ".join(shown).rstrip()

    return "\n".join([line({c: _header(c) for c in SCREEN_COLUMNS}), *map(line, screen)])


def format_models(
    models: Sequence[Mapping[str, Any]],
    status: Mapping[str, Any],
    fmt: str,
    width: int | None = None,
) -> str:
    """The models as a table for people (in ``width`` columns, when the id leaves room for
    the rest), or JSON or CSV for scripts."""
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
    return _table(rows, width)
