"""Build and run the gRPC server: DataFeed, health, reflection, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ...protos import feed_pb2, feed_pb2_grpc
from ..config import FeedConfig, ServerSection
from ..errors import ConfigError
from ..feed.served import ServedDataset, open_datasets
from ..observe.watch import InputBoundWatch
from ..runtime import Runtime
from .interceptor import ErrorInterceptor
from .metrics import RpcStatuses, serve_metrics
from .security import TokenInterceptor, load_cursor_secret, load_token, server_credentials
from .service import DataFeedService

log = logging.getLogger(__name__)

SERVICE_NAME = feed_pb2.DESCRIPTOR.services_by_name["DataFeed"].full_name
SWITCH_INTERVAL_S = 0.0005
"""How long a worker thread making a big batch keeps the GIL while the event loop asks for it (CPython's default,
5 ms, delays every other stream by up to that at each of the loop's many GIL hand-offs)."""
HELD_FREE_BYTES = 1 << 30
"""Freed heap memory the allocator keeps for reuse instead of returning it to the system (see _reuse_memory)."""
REQUEST_HEADROOM = 16 << 10
"""Bytes a request may carry beyond its cursor (names, ids, framing)."""


def load_datasets(config: FeedConfig, runtime: Runtime) -> dict[str, ServedDataset]:
    """Open every configured dataset on `runtime` and start building missing token stores in the background."""
    datasets = open_datasets(config, runtime)
    for dataset in datasets.values():
        dataset.prepare_in_background()
    return datasets


@dataclass(frozen=True)
class Listen:
    """Where and how the server listens: gRPC address, metrics port, TLS, token and cursor key (all resolved)."""

    host: str
    port: int
    metrics_port: int | None
    credentials: grpc.ServerCredentials | None
    token: str | None
    cursor_secret: bytes = b""


def _options(section: ServerSection) -> list[tuple[str, int]]:
    limits, keepalive = section.limits, section.keepalive
    return [("grpc.max_send_message_length", limits.max_message_mb << 20),
            ("grpc.max_receive_message_length", (limits.max_cursor_kb << 10) + REQUEST_HEADROOM),
            ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
            # keepalive_timeout alone leaves a connection whose ping is never answered open; this closes it
            ("grpc.http2.ping_timeout_ms", int(keepalive.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000)]


def _bind(server: grpc.aio.Server, listen: Listen) -> int:
    """Add the listening port (TLS when configured); returns the bound port."""
    address = f"{listen.host}:{listen.port}"
    try:
        if listen.credentials is not None:
            return server.add_secure_port(address, listen.credentials)
        return server.add_insecure_port(address)
    except RuntimeError as err:
        raise ConfigError(f"cannot listen on {address}: {err}", key="server.port",
                          fix="choose a free port (--port, env SIGIL_FEED_PORT)") from None


def _reuse_memory() -> None:
    """Have glibc's allocator serve big blocks from its heap, kept for reuse, instead of mapping fresh memory.

    gRPC copies every outgoing message into a block it allocates on the event loop, GIL held. glibc maps each
    block over 32 MB fresh from the system and unmaps it when freed, so the copy of a whole 128 MB batch (a client
    without `accept_parts`) first faults in and zeroes 32k pages: measured 80-200 ms of the loop on 2 busy cores,
    12-90 ms once the block comes from memory already in use. Freed memory past HELD_FREE_BYTES is still given
    back. No-op without glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_MAX, 0)
    mallopt(M_TRIM_THRESHOLD, HELD_FREE_BYTES)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters


async def serve(config: FeedConfig, datasets: dict[str, ServedDataset], listen: Listen) -> int:
    """Serve until SIGTERM/SIGINT, then drain open streams within the grace period; returns the exit code."""
    section = config.server
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    _reuse_memory()
    statuses = RpcStatuses()
    interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor(statuses.record)]
    if listen.token is not None:
        interceptors.append(TokenInterceptor(listen.token))
    server = grpc.aio.server(interceptors=interceptors, options=_options(section))
    executor = ThreadPoolExecutor(max_workers=min(section.limits.max_streams, 32), thread_name_prefix="feed")
    service = DataFeedService(datasets, section.limits, executor, listen.cursor_secret,
                              InputBoundWatch(section.input_bound))
    feed_pb2_grpc.add_DataFeedServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = _bind(server, listen)
    metrics = None
    if listen.metrics_port is not None:
        metrics = serve_metrics(service.stats, statuses, host=listen.host, port=listen.metrics_port)
        print(f"sigil-feed metrics on http://{listen.host}:{metrics.server_port}/metrics", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    ready = asyncio.create_task(_serving_when_ready(health_servicer, datasets))
    transport = "plaintext" if section.tls is None else "mutual-tls" if section.tls.client_ca_file else "tls"
    print(f"sigil-feed listening on {listen.host}:{bound} datasets={','.join(sorted(datasets))} "
          f"transport={transport} token={'required' if listen.token else 'off'}", flush=True)

    await stopping.wait()
    ready.cancel()
    await _shut_down(server, service, health_servicer, section.grace_s)
    if metrics is not None:
        metrics.shutdown()
    executor.shutdown(wait=False, cancel_futures=True)
    return 0


async def _serving_when_ready(health_servicer: health.aio.HealthServicer,
                              datasets: dict[str, ServedDataset]) -> None:
    """The DataFeed service reports SERVING once every token store is ready (a readiness probe's signal);
    the server as a whole ("") is SERVING from the start, so liveness holds during a long cache build."""
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    loop = asyncio.get_running_loop()
    for dataset in datasets.values():
        await loop.run_in_executor(None, dataset.lifecycle.ready.wait)
    if all(d.progress.state != "failed" for d in datasets.values()):
        await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)


async def _shut_down(server: grpc.aio.Server, service: DataFeedService, health_servicer: health.aio.HealthServicer,
                     grace_s: float) -> None:
    """NOT_SERVING, refuse new streams, let open ones send what they were granted, then stop."""
    log.info("shutting down: health NOT_SERVING, new streams refused, open streams get %.1f s to send what "
             "they were granted", grace_s)
    started = time.monotonic()
    await health_servicer.enter_graceful_shutdown()
    await service.drain()
    if not await service.drained(grace_s):
        log.warning("grace period over: cancelling %d stream(s) still open", len(service.streams))
    await server.stop(max(0.0, grace_s - (time.monotonic() - started)))
    log.info("stopped after %.1f s", time.monotonic() - started)


def resolve_listen(config: FeedConfig, *, host: str, port: int, metrics_port: int | None) -> Listen:
    """Read the TLS files, the token and the cursor secret now, so that a bad setting stops the start before
    datasets load."""
    section = config.server
    credentials = server_credentials(section.tls, config.file) if section.tls else None
    token = load_token(section.auth, config.file) if section.auth else None
    return Listen(host, port, metrics_port, credentials, token,
                  load_cursor_secret(section.cursor_secret_env, config.file))


def run(config: FeedConfig, listen: Listen) -> int:
    """Load the datasets, then serve on uvloop when available; the runtime they share is closed at stop."""
    with Runtime() as runtime:
        datasets = load_datasets(config, runtime)
        try:
            import uvloop
        except ImportError:
            return asyncio.run(serve(config, datasets, listen))
        return uvloop.run(serve(config, datasets, listen))
