"""The client's connections to nodes: one ExpertClient (a gRPC channel, and a data connection where
the node announces a data port) per node endpoint, made on
first use on the dispatcher's event loop, dropped when its replica is banned (the next call connects
afresh) or when its endpoint left the swarm (churn does not grow the pool)."""

from __future__ import annotations

import asyncio

from moeswarm.model.directory import ExpertDirectory
from moeswarm.model.expert_client import ExpertClient
from moeswarm.model.replicas import ReplicaPicker


class ClientPool:
    def __init__(self, loop: asyncio.AbstractEventLoop, directory: ExpertDirectory | None, picker: ReplicaPicker):
        self._loop, self._directory, self._picker = loop, directory, picker
        self.clients: dict[str, ExpertClient] = {}  # by endpoint
        self.dropping: dict[asyncio.Task, ExpertClient] = {}  # the close of each dropped client

    def get(self, endpoint: str) -> ExpertClient:
        client = self.clients.get(endpoint)
        if client is None:
            # A grpc.aio channel belongs to the loop it was made on: one made elsewhere would hang
            # every later call on this loop until its deadline. Fail loudly instead.
            if asyncio._get_running_loop() is not self._loop:
                raise RuntimeError("Dispatcher clients are made on its event loop: call through Dispatcher.run()")
            data_endpoint = None
            if self._directory is not None:
                self._forget_departed(self._directory.endpoints() | {endpoint})
                data_endpoint = self._directory.data_endpoint(endpoint)
            client = self.clients[endpoint] = ExpertClient(endpoint, data_endpoint=data_endpoint)
        return client

    def existing(self, endpoint: str) -> ExpertClient | None:
        """The client of `endpoint` if there is one (from any thread while the loop is held; get() makes one)."""
        return self.clients.get(endpoint)

    def interrupt_blocking(self) -> None:
        """From any thread: wake the calls a blocking caller waits on (ExpertClient.interrupt_blocking)."""
        for client in [*self.clients.values(), *self.dropping.values()]:
            client.interrupt_blocking()

    def _forget_departed(self, announced: set[str]) -> None:
        """Close the idle channels to endpoints no longer announced, and forget their health. A node
        that restarts on a new port, or a volunteer that leaves, would otherwise keep a channel and a
        health entry here for as long as the client runs. Done when a new endpoint shows up: the
        client then holds at most the endpoints announced at that time, plus those mid-call."""
        for endpoint in [e for e, client in self.clients.items() if e not in announced and not client.in_flight]:
            self.drop(endpoint, grace_s=None)
        self._picker.forget(announced | set(self.clients))

    def drop(self, endpoint: str, grace_s: float | None) -> None:
        """Forget the client of `endpoint`; close it in the background, after letting its calls in
        flight end for up to grace_s (None: cancel them now; see ExpertClient.close)."""
        client = self.clients.pop(endpoint, None)
        if client is not None:
            closing = self._loop.create_task(client.close(grace_s=grace_s))  # (also from a thread holding the loop)
            self.dropping[closing] = client
            closing.add_done_callback(self.dropping.pop)

    async def close(self) -> None:
        """Close every client now, those still being dropped included (no more grace)."""
        for closing in list(self.dropping):
            closing.cancel()
        clients = [*self.clients.values(), *self.dropping.values()]
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
