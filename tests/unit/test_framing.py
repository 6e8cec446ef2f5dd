"""protocol/framing.py: frames split anywhere across reads, large frames read in place, limits; the
blocking connection over a socket pair."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from moeswarm.protocol.framing import (
    LENGTH, PREFACE, SMALL_FRAME, BadPreface, BlockingConnection, FrameProtocol, FrameTooLarge, frame_chunks,
)


class _Transport:
    """What FrameProtocol calls on its transport (the parsing under test is pure; the data port's
    real sockets are tested in tests/integration/test_data_port.py)."""

    def __init__(self):
        self.paused = False
        self.written = []

    def pause_reading(self):
        self.paused = True

    def resume_reading(self):
        self.paused = False

    def is_closing(self):
        return False

    def get_extra_info(self, name, default=None):
        return default

    def writelines(self, chunks):
        self.written.extend(bytes(chunk) for chunk in chunks)


def _feed(protocol: FrameProtocol, data: bytes, piece: int) -> None:
    """Deliver data as the event loop would, at most `piece` bytes per read into get_buffer()."""
    pos = 0
    while pos < len(data):
        buffer = protocol.get_buffer(-1)
        n = min(piece, len(buffer), len(data) - pos)
        buffer[:n] = data[pos : pos + n]
        protocol.buffer_updated(n)
        pos += n


def _frame(message: bytes) -> bytes:
    return b"".join(bytes(chunk) for chunk in frame_chunks(message))


async def _take(protocol: FrameProtocol, n: int) -> list[bytes]:
    return [bytes(await protocol.next_frame()) for _ in range(n)]


@pytest.mark.parametrize("piece", [1, 3, 4096, 1 << 20])
def test_frames_come_out_whole_and_in_order_however_the_bytes_arrive(piece):
    messages = [b"", b"a", bytes(range(256)) * 3, bytes(SMALL_FRAME), bytes(SMALL_FRAME + 1), b"\x07" * (300 << 10), b"end"]
    stream = PREFACE + b"".join(_frame(m) for m in messages)

    async def run():
        protocol = FrameProtocol(1 << 20, expect_preface=True)
        protocol.connection_made(_Transport())
        got = []
        for start in range(0, len(stream), 64 << 10):  # the reader takes frames as they come
            _feed(protocol, stream[start : start + (64 << 10)], piece)
            while protocol._frames:
                got.append(bytes(await protocol.next_frame()))
        return got

    assert asyncio.run(run()) == messages


def test_a_large_frame_is_read_into_its_own_aligned_buffer():
    message = bytes(range(256)) * 1024  # 256 KiB

    async def run():
        protocol = FrameProtocol(1 << 20)
        protocol.connection_made(_Transport())
        _feed(protocol, _frame(message), 1 << 20)
        return await protocol.next_frame()

    frame = asyncio.run(run())
    assert isinstance(frame, memoryview) and frame.readonly and bytes(frame) == message


def test_reading_pauses_while_two_frames_wait_and_resumes_when_taken():
    async def run():
        protocol = FrameProtocol(1 << 10)
        transport = _Transport()
        protocol.connection_made(transport)
        _feed(protocol, _frame(b"one") + _frame(b"two"), 1 << 10)
        paused = transport.paused
        await protocol.next_frame()
        return paused, transport.paused

    assert asyncio.run(run()) == (True, False)


def test_a_frame_over_the_limit_fails_before_its_bytes_arrive():
    async def run():
        protocol = FrameProtocol(1000)
        transport = _Transport()
        protocol.connection_made(transport)
        _feed(protocol, _frame(b"fine") + LENGTH.pack(1001), 1 << 10)
        first = await protocol.next_frame()
        with pytest.raises(FrameTooLarge, match="1001 bytes is over the limit of 1000"):
            await protocol.next_frame()
        return first, transport.paused

    assert asyncio.run(run()) == (b"fine", True)


@pytest.mark.parametrize("opening", [b"PRI * HTTP/2.0\r\n", PREFACE[:5] + b"X", b"MSWDATA\x02"])
def test_an_unknown_preface_fails_at_its_first_wrong_byte(opening):
    async def run():
        protocol = FrameProtocol(1000, expect_preface=True)
        protocol.connection_made(_Transport())
        _feed(protocol, opening, 1)
        with pytest.raises(BadPreface):
            await protocol.next_frame()

    asyncio.run(run())


def test_a_lost_connection_wakes_the_reader_after_the_frames_before_it():
    async def run():
        protocol = FrameProtocol(1000)
        protocol.connection_made(_Transport())
        _feed(protocol, _frame(b"last"), 1000)
        waiter = asyncio.ensure_future(_take(protocol, 2))
        await asyncio.sleep(0)
        protocol.connection_lost(None)
        with pytest.raises(ConnectionResetError):
            await waiter
        return protocol

    asyncio.run(run())


def test_small_frames_go_in_one_write_and_large_ones_without_a_copy():
    small, large = b"x" * 100, bytearray(SMALL_FRAME + 1)
    assert frame_chunks(small) == [LENGTH.pack(100) + small]
    chunks = frame_chunks(large)
    assert chunks[0] == LENGTH.pack(len(large)) and chunks[1] is large


def test_closing_cancels_a_reader_waiting_for_a_frame():
    """As cancelling a gRPC call does: a client closed under a call ends that call as cancelled."""

    async def run():
        protocol = FrameProtocol(1000)
        protocol.connection_made(_Transport())
        protocol.transport.close = lambda: None
        waiter = asyncio.ensure_future(protocol.next_frame())
        await asyncio.sleep(0)
        protocol.close()
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(run())


# ---------------------------------------------------------------- BlockingConnection (a socket pair)


def _blocking_pair(max_frame_bytes: int = 1 << 20):
    ours, peer = socket.socketpair()
    return BlockingConnection(ours, max_frame_bytes), peer


def _send_from_a_thread(peer: socket.socket, data: bytes, delay_s: float = 0.0) -> threading.Thread:
    """The peer's send, on its own thread: a frame larger than the socket buffers waits for the reader."""
    thread = threading.Timer(delay_s, peer.sendall, (data,))
    thread.start()
    return thread


@pytest.mark.parametrize("size", [0, 5, SMALL_FRAME + 1, 300 << 10])
def test_blocking_connection_sends_a_frame_and_receives_the_answer(size):
    connection, peer = _blocking_pair()
    try:
        connection.send(b"question", timeout_s=5)
        assert peer.recv(64) == _frame(b"question")
        answer = bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)
        sender = _send_from_a_thread(peer, _frame(answer))
        assert bytes(connection.receive(timeout_s=5)) == answer
        sender.join(5)
    finally:
        connection.close()
        peer.close()


def test_an_answer_late_for_its_deadline_is_kept_and_finished_on_an_event_loop():
    connection, peer = _blocking_pair()
    answer = b"\x05" * (SMALL_FRAME * 2)  # a large frame: read in place, in pieces
    whole = _frame(answer)
    try:
        assert connection.receive(timeout_s=0.05) is None  # nothing yet
        peer.sendall(whole[:1000])
        assert connection.receive(timeout_s=0.05) is None  # part of it: kept, not lost
        assert connection.receive(timeout_s=0.05) is None

        sender = _send_from_a_thread(peer, whole[1000:], delay_s=0.05)
        assert bytes(asyncio.run(connection.receive_async())) == answer
        sender.join(5)
        peer.sendall(_frame(b"next"))  # and the connection goes on, blocking again
        assert connection.receive(timeout_s=5) == b"next"
    finally:
        connection.close()
        peer.close()


def test_interrupt_wakes_a_receive_blocked_in_another_thread():
    connection, peer = _blocking_pair()
    outcome = []

    def receive():
        try:
            outcome.append(connection.receive(timeout_s=30))
        except BaseException as e:  # noqa: BLE001 (checked below)
            outcome.append(e)

    thread = threading.Thread(target=receive)
    try:
        thread.start()
        time.sleep(0.1)
        connection.interrupt()
        thread.join(5)
        assert not thread.is_alive() and isinstance(outcome[0], ConnectionError), outcome
    finally:
        connection.close()
        peer.close()


def test_blocking_connection_fails_on_a_closed_peer_and_on_a_frame_over_its_limit():
    connection, peer = _blocking_pair(max_frame_bytes=100)
    peer.sendall(LENGTH.pack(101))
    with pytest.raises(FrameTooLarge):
        connection.receive(timeout_s=5)
    connection.close()
    peer.close()
    connection, peer = _blocking_pair()
    peer.sendall(_frame(b"whole"))
    peer.sendall(LENGTH.pack(10) + b"part")
    peer.close()
    try:
        assert connection.receive(timeout_s=5) == b"whole"  # what came before the close is still read
        with pytest.raises(ConnectionError):
            connection.receive(timeout_s=5)
    finally:
        connection.close()
