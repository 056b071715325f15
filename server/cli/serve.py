"""`sigil-feed serve`: load the config, resolve where and how to listen, and run the server until SIGTERM."""

from __future__ import annotations

import argparse

from ..config import load_config
from ..default import DEFAULT_DIR
from ..rpc.app import resolve_listen, run

DEFAULT_CONFIG = DEFAULT_DIR / "default.yaml"


def serve(args: argparse.Namespace) -> int:
    """Serve the config's datasets (the embedded default dataset without --config); returns the exit code."""
    config = load_config(args.config or DEFAULT_CONFIG)
    section = config.server
    listen = resolve_listen(config, host=args.host or section.host,
                            port=section.port if args.port is None else args.port,
                            metrics_port=section.metrics_port if args.metrics_port is None else args.metrics_port)
    return run(config, listen)
