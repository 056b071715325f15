"""Build and run the gRPC server: DataFeed, health, reflection, graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ..protos import feed_pb2, feed_pb2_grpc
from .config import FeedConfig
from .dataset import ServedDataset, open_datasets
from .interceptor import ErrorInterceptor
from .service import DataFeedService

log = logging.getLogger(__name__)

SERVICE_NAME = feed_pb2.DESCRIPTOR.services_by_name["DataFeed"].full_name


def load_datasets(config: FeedConfig) -> dict[str, ServedDataset]:
    """Open every configured dataset and start building missing token stores in the background."""
    datasets = open_datasets(config)
    for dataset in datasets.values():
        dataset.prepare_in_background()
    return datasets


async def serve(config: FeedConfig, datasets: dict[str, ServedDataset], *, host: str, port: int) -> int:
    """Serve until SIGTERM/SIGINT, then drain open streams within the grace period; returns the exit code."""
    limits = config.server.limits
    max_message = limits.max_message_mb << 20
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=[("grpc.max_send_message_length", max_message),
                 ("grpc.max_receive_message_length", 4 << 20),
                 ("grpc.keepalive_time_ms", 30_000),
                 ("grpc.keepalive_timeout_ms", 10_000),
                 ("grpc.http2.max_pings_without_data", 0)])
    executor = ThreadPoolExecutor(max_workers=min(limits.max_streams, 32), thread_name_prefix="feed")
    service = DataFeedService(datasets, limits, executor)
    feed_pb2_grpc.add_DataFeedServicer_to_server(service, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"sigil-feed listening on {host}:{bound} datasets={','.join(sorted(datasets))}", flush=True)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down: draining streams for up to %.1f s", config.server.grace_s)
    service.accepting = False
    await health_servicer.enter_graceful_shutdown()
    await server.stop(config.server.grace_s)
    executor.shutdown(wait=False, cancel_futures=True)
    return 0


def run(config: FeedConfig, *, host: str, port: int) -> int:
    """Load the datasets, then serve on uvloop when available."""
    datasets = load_datasets(config)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(config, datasets, host=host, port=port))
    return uvloop.run(serve(config, datasets, host=host, port=port))
