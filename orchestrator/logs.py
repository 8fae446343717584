"""structlog set-up: JSON lines for machines, the console renderer for people at a terminal.

A switch binds ``switch_id`` and ``model`` with ``bind_contextvars``; every line
logged while it runs, in the daemon or in worker threads started with
``asyncio.to_thread``, carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

LOG_FORMATS = ("auto", "console", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


def wants_console(log_format: str = "auto", stream: TextIO | None = None) -> bool:
    """Whether lines go out for people: asked for, or ``auto`` and the stream is a terminal."""
    if log_format == "auto":
        return (stream or sys.stderr).isatty()
    return log_format == "console"


def configure_logging(
    level: str = "info", *, log_format: str = "auto", stream: TextIO | None = None
) -> bool:
    """Log to ``stream`` (stderr) at ``level`` and above; returns whether it is for people."""
    out = stream or sys.stderr
    console = wants_console(log_format, out)
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    return console
