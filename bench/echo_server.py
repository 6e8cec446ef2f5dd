"""The floor under every RPC figure: a minimal grpc.aio server that echoes bytes (generic handler, no
serialisation; unary, and on one long-lived bidirectional stream), run as a child process of a benchmark. `python bench/echo_server.py READY_FILE`."""

from __future__ import annotations

import asyncio
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from common import Children, write_ready  # noqa: E402  (bench/ is a folder of scripts, not a package)

ECHO_METHOD = "/bench.Echo/Echo"
STREAM_ECHO_METHOD = "/bench.Echo/StreamEcho"  # bidirectional: each message is answered in order
GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
ECHO_MAX_LIFETIME_S = 1800.0  # an orphaned echo server never outlives this


def run_event_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def spawn_echo(children: Children, work_dir: pathlib.Path, name: str = "echo"):
    """Start an echo server child; returns (process, ready file holding {"endpoint": ...})."""
    ready = work_dir / f"{name}.json"
    return children.spawn([sys.executable, __file__, str(ready)], name), ready


async def serve_echo(ready_file: str) -> int:
    """Echo until the parent process goes (or ECHO_MAX_LIFETIME_S), with a node's allocator settings."""
    import grpc

    from moeswarm.protocol.malloc import keep_freed_memory

    keep_freed_memory()

    async def echo(request: bytes, context) -> bytes:
        return request

    async def stream_echo(requests, context):
        async for request in requests:
            yield request

    parent = os.getppid()
    server = grpc.aio.server(options=GRPC_OPTIONS + [("grpc.so_reuseport", 0)])
    handlers = {  # no (de)serializers: bytes pass through
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "StreamEcho": grpc.stream_stream_rpc_method_handler(stream_echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_ready(ready_file, {"endpoint": f"127.0.0.1:{port}"})
    for _ in range(int(ECHO_MAX_LIFETIME_S / 0.5)):
        if os.getppid() != parent:
            break
        await asyncio.sleep(0.5)
    await server.stop(1.0)
    return 0


if __name__ == "__main__":
    sys.exit(run_event_loop(serve_echo(sys.argv[1])))
