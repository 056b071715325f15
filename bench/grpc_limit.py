"""The wire's limit: a bare grpc.aio bidirectional stream (uvloop), server and client in separate processes.

`python -m bench.grpc_limit serve` prints its port and, per stream, answers the client's one request
(the message size) with that many bytes per message until the client hangs up. `client` measures the
bytes per second it receives. No protobuf, no credits, no decoding: only what gRPC itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from bench.common import PYTHON, REPO, emit, run_module

METHOD = "/bench.Raw/Stream"
OPTIONS = [("grpc.max_send_message_length", 512 << 20), ("grpc.max_receive_message_length", 512 << 20)]


def _identity(data: bytes) -> bytes:
    return data


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    first = await anext(aiter(requests))
    payload = os.urandom(int(first.decode()))
    while True:
        yield payload


async def _serve() -> None:
    server = grpc.aio.server(options=OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(_stream, request_deserializer=_identity,
                                                    response_serializer=_identity)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Raw", {"Stream": handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"listening on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


async def _client(target: str, size: int, seconds: float, warmup: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target, options=OPTIONS) as channel:
        call = channel.stream_stream(METHOD, request_serializer=_identity, response_deserializer=_identity)()
        await call.write(str(size).encode())
        received = messages = 0
        t0 = time.perf_counter()
        async for message in call:
            messages += 1
            if messages == warmup:
                t0, received = time.perf_counter(), 0
                continue
            received += len(message)
            if messages > warmup and time.perf_counter() - t0 >= seconds:
                break
        wall = time.perf_counter() - t0
        call.cancel()
    return {"bytes_per_s": received / wall, "messages": messages - warmup, "wall_s": wall, "size": size}


def _run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def measure(sizes: dict[str, int], seconds: float) -> dict[str, dict[str, Any]]:
    """Start the bare server; for each named message size, a client in its own process; the clients' results."""
    server = subprocess.Popen([PYTHON, "-m", "bench.grpc_limit", "serve"], stdout=subprocess.PIPE, text=True,
                              cwd=REPO)
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"bare gRPC server did not start: {line!r}")
        target = line.split()[-1]
        return {name: run_module("bench.grpc_limit", ["client", target, str(size), str(seconds)])
                for name, size in sizes.items()}
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve")
    client = sub.add_parser("client")
    client.add_argument("target")
    client.add_argument("size", type=int)
    client.add_argument("seconds", type=float)
    client.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args()
    if args.cmd == "serve":
        _run(_serve())
    else:
        emit(_run(_client(args.target, args.size, args.seconds, args.warmup)))


if __name__ == "__main__":
    main()
