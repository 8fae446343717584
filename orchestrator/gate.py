"""The start gate: a model's container started ahead of the switch, its engine held back.

Docker's start of a container (namespaces, network, published ports, the NVIDIA runtime's
hook) costs a few hundred milliseconds that need no GPU. The daemon therefore starts a
model's container before the GPU is free, with the engine behind a gate: the copy of the
compose file runs the engine's command through a short ``sh`` script that, when the
daemon has put a *hold* file into the container, says so on its log and waits for
SIGWINCH before it hands over to the engine with ``exec``. SIGWINCH is ignored by
default, so a signal that reaches an engine already past the gate does no harm.

The daemon lets the engine through only once the old engine has exited, and only after
the script has said it waits (its trap is set by then). The script looks at the flag its
trap sets just before each ``wait``; a signal that lands in the instant between that look
and the ``wait`` is caught but does not end the wait, so the daemon sends a second one
shortly after the first, and the script's five-second sleep is the backstop.

A container started any other way (compose up, a restart, by hand) has no hold file and
runs the engine at once. The script removes the gate's folder before it hands over, and
``exec`` leaves the engine as the container's main process, as it would be ungated.
"""

from __future__ import annotations

import io
import shlex
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

GATE_DIR = "/.model-orchestrator-gate"
HOLD_FILE = "hold"
# What the script writes on the container's log once its trap is set.
HELD_LINE = "model-orchestrator: the engine waits at the start gate"
# Sent to the container's main process to open the gate, twice (see above).
OPEN_SIGNAL = "SIGWINCH"
SECOND_SIGNAL_AFTER = 0.05
SHELL = "/bin/sh"
# $0 of the script: what `ps` shows while the engine is held.
SCRIPT_NAME = "model-orchestrator-gate"


def script(folder: str = GATE_DIR) -> str:
    """The gate's ``sh`` script; ``folder`` is where it looks for the hold file."""
    return (
        "trap 'kill $! 2>/dev/null; exit 143' TERM; trap 'kill $! 2>/dev/null; exit 130' INT; "
        f"if [ -e {folder}/{HOLD_FILE} ]; then trap 'go=1' WINCH; echo '{HELD_LINE}'; "
        'until [ -n "$go" ]; do sleep 5 & [ -n "$go" ] || wait $!; kill $! 2>/dev/null;'
        " wait $! 2>/dev/null; done; fi; "
        f'rm -rf {folder}; exec "$@"'
    )


SCRIPT = script()


@dataclass(frozen=True)
class ImageDefaults:
    """An image's own ENTRYPOINT and CMD (None where it sets none)."""

    entrypoint: tuple[str, ...] | None
    command: tuple[str, ...] | None


def is_gated(service: Mapping[str, Any]) -> bool:
    entrypoint = service.get("entrypoint")
    return isinstance(entrypoint, list) and entrypoint[:3] == [SHELL, "-c", SCRIPT]


def gate_service(service: dict[str, Any], images: Mapping[str, ImageDefaults | None]) -> str | None:
    """Put the engine of this service behind the gate; a note saying so, or None when it
    cannot be: its image is not on this machine yet and the service names no entrypoint
    (docker would drop the image's own command along with its entrypoint, and the gate
    must hand over to exactly what would have run)."""
    if is_gated(service):
        return None
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    if entrypoint is None:
        image = service.get("image")
        defaults = images.get(image) if isinstance(image, str) else None
        if defaults is None:
            return None
        entrypoint = list(defaults.entrypoint or ())
        if command is None and defaults.command is not None:
            command = list(defaults.command)
    service["entrypoint"] = [SHELL, "-c", SCRIPT, SCRIPT_NAME, *entrypoint]
    if command is not None:
        service["command"] = list(command)
    runs = shlex.join([*entrypoint, *(command or [])])
    return (
        f"entrypoint: {SHELL} -c <start gate> {SCRIPT_NAME}, which runs {runs}, held until"
        " the GPU is free when the daemon starts the container ahead"
    )


def archive(name: str = HOLD_FILE) -> bytes:
    """A tar of the gate's folder holding the empty file ``name``, for docker's put-archive
    at the container's root."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        folder = tarfile.TarInfo(GATE_DIR.lstrip("/"))
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        marker = tarfile.TarInfo(f"{GATE_DIR.lstrip('/')}/{name}")
        marker.mode = 0o644
        tar.addfile(marker, io.BytesIO(b""))
    return buffer.getvalue()
