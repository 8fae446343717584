"""HAProxy's agent check: each connection gets one line about this daemon, then is closed.

HAProxy (``agent-check agent-port N`` on a server line) connects every ``agent-inter``,
reads what the agent writes until a newline or the close, and applies it: ``ready`` or
``drain`` set the server's administrative state, ``up`` or ``down`` its operational
state (``up`` only counts while the health check passes too), and ``75%`` its weight
relative to the configured one. The answer is worked out by ``Balancer.agent_answer``
from memory; nothing a client sends is read.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from .balancer import Balancer

log = structlog.get_logger(__name__)

# A balancer that connects and never reads must not hold a connection open for long.
WRITE_TIMEOUT = 2.0


class AgentServer:
    def __init__(self, balancer: Balancer, host: str, port: int) -> None:
        self._balancer = balancer
        self.host, self.port = host, port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._answer, self.host, self.port, reuse_address=True
        )
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])  # the port bound, if 0 was asked
        log.info("agent check listening", host=self.host, port=self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self._balancer.agent_answer().line)
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError):
            pass  # the checker went away; it asks again at its next interval
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await writer.wait_closed()
