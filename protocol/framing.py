"""The data port: Forward/Backward requests as length-prefixed frames on a plain TCP connection,
beside the gRPC service. Same messages as ExpertService.Stream (protocol/wire.py), without HTTP/2.

Why: grpc.aio hands every message between threads (its event engine's poller, the completion-queue
poller, the asyncio loop) before a coroutine sees it, and on a virtual machine each hand-off wakes a
CPU that went idle. Measured on the 2-core VM, from a synchronous caller with torch work between
calls (the decoding pattern), median round trip to an echo server in another process: 1 KiB, 279 us
over an open gRPC stream and 115 us over this framing on uvloop; 256 KiB, 545 vs 329 us.

The protocol, both directions on one connection:
  * the client opens with PREFACE (8 bytes: a magic word and the protocol version);
  * then frames: a 4-byte little-endian length, then that many bytes. The client sends ExpertRequest
    messages (a backward sets its `backward` field, as on the Stream); the node answers each with one
    ExpertResponse, in order (a failed request gets error_code/error_message, a gRPC status number).
A node answers a preface it does not know, or a frame over its max_message_bytes, with one error
response and closes the connection. Clients keep one request in flight per connection.

A client's connection is driven either by its event loop (FrameProtocol as an asyncio protocol) or
by a blocking caller (BlockingConnection: the decoding fast path, model/dispatcher.py); both frame
what they receive with FrameProtocol.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import time

import torch

from moeswarm.protocol.errors import BadRequest, Overloaded

PREFACE = b"MSWDATA\x01"
LENGTH = struct.Struct("<I")
SMALL_FRAME = 64 << 10  # frames up to this size are copied out of the read buffer; larger ones are read in place
_READ_BUFFER = SMALL_FRAME  # per connection: a node with its 1024 data connections open holds 64 MiB of them


class FrameTooLarge(Overloaded):  # RESOURCE_EXHAUSTED, as gRPC answers a message over its limit
    def __init__(self, size: int, limit: int):
        super().__init__(f"a frame of {size} bytes is over the limit of {limit} bytes (max_message_bytes)")
        self.size, self.limit = size, limit


class BadPreface(BadRequest):  # INVALID_ARGUMENT
    pass


def frame_chunks(message: bytes | memoryview) -> list:
    """What to write for one frame: one bytes object when small (one send), else the length and the
    message as they are (no copy of a large message; the transport writes both at once)."""
    if len(message) <= SMALL_FRAME:
        return [LENGTH.pack(len(message)) + message]
    return [LENGTH.pack(len(message)), message]


class FrameProtocol(asyncio.BufferedProtocol):
    """asyncio protocol of one connection: splits what arrives into frames, which `next_frame()`
    returns in order. Small frames are copied out of a shared read buffer; a large one is received
    straight into its own buffer (uninitialised memory, no zero-filling). Reading pauses while two
    frames wait unread, so a peer that sends faster than its frames are handled fills its own TCP
    window, not this process's memory. A frame longer than max_frame_bytes, or a preface other than
    PREFACE (expect_preface), ends the reading with FrameTooLarge or BadPreface."""

    def __init__(self, max_frame_bytes: int, *, expect_preface: bool = False):
        self.max_frame_bytes = max_frame_bytes
        self.transport: asyncio.Transport | None = None
        self._scratch = bytearray(_READ_BUFFER)
        self._pending = bytearray()  # bytes received and not yet parsed (a partial length, or small frames)
        self._preface_left = len(PREFACE) if expect_preface else 0
        self._body: memoryview | None = None  # the large frame being received in place
        self._body_owner: torch.Tensor | None = None
        self._body_filled = 0
        self._frames: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._error: BaseException | None = None
        self._paused = False
        self._can_write = asyncio.Event()
        self._can_write.set()

    # ---- asyncio callbacks
    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small frames leave at once (asyncio's and uvloop's TCP default too)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def get_buffer(self, sizehint: int):
        if self._body is not None:
            return self._body[self._body_filled :]
        return self._scratch

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._body_filled += nbytes
            if self._body_filled == len(self._body):
                self._deliver(self._body.toreadonly())
                self._body = self._body_owner = None
                self._parse()
            return
        self._pending += memoryview(self._scratch)[:nbytes]
        self._parse()

    def eof_received(self) -> bool:
        self._fail(ConnectionResetError("the peer closed the connection"))
        return False

    def connection_lost(self, exc) -> None:
        self._fail(exc or ConnectionResetError("connection closed"))
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ---- for the user of the connection
    async def next_frame(self) -> bytes | memoryview:
        """The next frame; raises the connection's failure (ConnectionError, FrameTooLarge,
        BadPreface) once the frames before it are taken."""
        if not self._frames:
            if self._error is not None:
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if not self._frames:
                raise self._error
        frame = self._frames.popleft()
        if self._paused and len(self._frames) < 2 and self.transport is not None and not self.transport.is_closing():
            self._paused = False
            self.transport.resume_reading()
        return frame

    def take_frame(self) -> bytes | memoryview | None:
        """The next frame if one is complete, else None (for a reader that feeds this protocol itself,
        without a transport: BlockingConnection); raises the failure once the frames before it are taken."""
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            raise self._error
        return None

    async def send(self, message: bytes | memoryview) -> None:
        """Write one frame; waits while the transport's buffer is over its high-water mark."""
        if self.transport is None or self.transport.is_closing():
            raise self._error or ConnectionResetError("connection closed")
        self.transport.writelines(frame_chunks(message))
        if not self._can_write.is_set():
            await self._can_write.wait()
            if self.transport.is_closing():
                raise self._error or ConnectionResetError("connection closed")

    def close(self) -> None:
        """Close the connection; a next_frame() waiting is cancelled (as a gRPC call is, when cancelled)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()
        if self.transport is not None:
            self.transport.close()

    # ---- parsing
    def _parse(self) -> None:
        pending = self._pending
        start = 0
        if self._preface_left:
            take = min(self._preface_left, len(pending))
            offset = len(PREFACE) - self._preface_left
            if pending[:take] != PREFACE[offset : offset + take]:
                return self._fail(BadPreface("not a moeswarm data connection (unknown preface)"))
            self._preface_left -= take
            start = take
        while len(pending) - start >= LENGTH.size and self._error is None:
            (size,) = LENGTH.unpack_from(pending, start)
            if size > self.max_frame_bytes:
                return self._fail(FrameTooLarge(size, self.max_frame_bytes))
            body_start = start + LENGTH.size
            available = len(pending) - body_start
            if size <= SMALL_FRAME or available >= size:
                if available < size:
                    break  # a small frame not all here yet
                self._deliver(bytes(memoryview(pending)[body_start : body_start + size]))
                start = body_start + size
                continue
            # A large frame: receive the rest straight into its own buffer (aligned, not zero-filled).
            self._body_owner = torch.empty(size, dtype=torch.uint8)
            self._body = memoryview(self._body_owner.numpy())
            self._body[:available] = memoryview(pending)[body_start:]
            self._body_filled = available
            start = len(pending)
            break
        del pending[:start]

    def _deliver(self, frame) -> None:
        self._frames.append(frame)
        if len(self._frames) >= 2 and not self._paused and self.transport is not None and not self.transport.is_closing():
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        if not isinstance(error, ConnectionError) and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()  # stop here: what follows cannot be framed
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class BlockingConnection:
    """A client's data connection driven by a blocking caller instead of an event loop: it writes a
    request and reads the answer itself, with no event-loop run around the call (model/dispatcher.py,
    forward_blocking). One request at a time. An answer not complete by a deadline stays readable:
    receive() again, or finish it on an event loop with receive_async(). interrupt(), from any
    thread, wakes a blocked receive() with a ConnectionError."""

    def __init__(self, sock: socket.socket, max_frame_bytes: int):
        self._sock, self._reader = sock, FrameProtocol(max_frame_bytes)

    @classmethod
    def connect(cls, host: str, port: int, *, timeout_s: float, max_frame_bytes: int) -> "BlockingConnection":
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(PREFACE)
        except BaseException:
            sock.close()
            raise
        return cls(sock, max_frame_bytes)

    def send(self, message: bytes | memoryview, timeout_s: float) -> None:
        """Write one frame (raises OSError; TimeoutError when the peer takes none of it for timeout_s)."""
        self._sock.settimeout(timeout_s)
        for chunk in frame_chunks(message):
            self._sock.sendall(chunk)

    def receive(self, timeout_s: float) -> bytes | memoryview | None:
        """The next frame, or None if it has not all arrived within timeout_s (what came is kept).
        Raises ConnectionError (closed by the peer, or interrupted), FrameTooLarge, OSError."""
        deadline = time.monotonic() + timeout_s
        while (frame := self._reader.take_frame()) is None:
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                return None
            self._sock.settimeout(left_s)
            try:
                received = self._sock.recv_into(self._reader.get_buffer(-1))
            except TimeoutError:
                return None
            self._feed(received)
        return frame

    async def receive_async(self) -> bytes | memoryview:
        """The next frame, read on the running event loop (no deadline: wrap it in one)."""
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)  # as the loop's socket calls need; receive() sets a timeout again
        while (frame := self._reader.take_frame()) is None:
            self._feed(await loop.sock_recv_into(self._sock, self._reader.get_buffer(-1)))
        return frame

    def _feed(self, received: int) -> None:
        if received:
            self._reader.buffer_updated(received)
        else:
            self._reader.eof_received()

    def interrupt(self) -> None:
        """End the connection's reading and writing now: a receive() blocked in another thread returns
        with a ConnectionError. The socket stays open until close()."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # not connected any more, or closed already
            pass

    def close(self) -> None:
        self._sock.close()
