"""The node's data port (protocol/framing.py): Forward/Backward over plain TCP, served by the same
handler as the gRPC Stream call (ExpertServicer.Stream), so validation, errors and batching are the
ones every gRPC client gets."""

from __future__ import annotations

import asyncio
import logging

from moeswarm.node.service import ExpertServicer
from moeswarm.protocol import expert_pb2
from moeswarm.protocol.errors import Overloaded, status_of
from moeswarm.protocol.framing import BadPreface, FrameProtocol, FrameTooLarge

logger = logging.getLogger(__name__)
MAX_CONNECTIONS = 1024  # data connections open at once; more are answered RESOURCE_EXHAUSTED and closed


class DataServer:
    def __init__(self, servicer: ExpertServicer, *, max_message_bytes: int, max_connections: int = MAX_CONNECTIONS):
        self._servicer, self._max_message_bytes, self._max_connections = servicer, max_message_bytes, max_connections
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); returns the port. OSError if it cannot bind."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, reuse_address=True, reuse_port=False)
        return self._server.sockets[0].getsockname()[1]

    def _protocol(self) -> "_Connection":
        return _Connection(self)

    def _accept(self, connection: FrameProtocol) -> None:
        task = asyncio.ensure_future(self._serve(connection))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, connection: FrameProtocol) -> None:
        try:
            if len(self._connections) > self._max_connections:
                raise Overloaded(f"this node already has {self._max_connections} data connections open; use its gRPC endpoint")
            async for response in self._servicer.Stream(_requests(connection), None):
                await connection.send(response if isinstance(response, bytes) else response.SerializeToString())
        except (FrameTooLarge, BadPreface, Overloaded) as e:  # answered, then the connection ends
            answer = expert_pb2.ExpertResponse(error_code=status_of(e).value[0], error_message=str(e))
            try:
                await connection.send(answer.SerializeToString())
            except ConnectionError:
                pass
        except ConnectionError:
            pass  # the client went away
        except Exception:  # connection boundary: a bug must not take the node down
            logger.error("data connection failed", exc_info=True)
        finally:
            connection.close()

    async def close(self, grace_s: float) -> None:
        """Stop listening; connections end once their request in flight is answered (Stream ends
        idle ones through ExpertServicer.close_idle_streams)."""
        if self._server is None:
            return
        self._server.close()
        if self._connections:
            await asyncio.wait(self._connections, timeout=grace_s)
        for task in self._connections:
            task.cancel()


class _Connection(FrameProtocol):
    """One accepted connection: served (DataServer._serve) from the moment it is made."""

    def __init__(self, server: DataServer):
        super().__init__(server._max_message_bytes, expect_preface=True)
        self._server = server

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._server._accept(self)


async def _requests(connection: FrameProtocol):
    """The connection's request frames, until the client closes it between two of them."""
    while True:
        try:
            frame = await connection.next_frame()
        except ConnectionError:
            return
        yield frame
