"""The `sigil-feed` command: serve, stats, top, peek, health, cache build|ls|rm, locality."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

import grpc

from ..errors import ConfigError, SourceError, Unavailable
from .logs import configure as configure_logging

EXIT_BAD_CONFIG = 2
EXIT_UNAVAILABLE = 3  # storage a source or store lies on did not answer: start again later
STORAGE_HINT = ("(fix: check the storage endpoint, the network and the credentials' environment: AWS_ENDPOINT_URL, "
                "HF_ENDPOINT, ...; or wait longer with SIGIL_FEED_STORAGE_RETRY_S)")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value else None


def _add_connection_args(command: argparse.ArgumentParser) -> None:
    """--target, and the TLS and token options a secured server needs."""
    command.add_argument("--target", default=f"127.0.0.1:{os.environ.get('SIGIL_FEED_PORT') or 50051}",
                         help="server address (default 127.0.0.1 on env SIGIL_FEED_PORT, else 50051)")
    command.add_argument("--tls-ca", help="PEM file of the CA that signed the server's certificate (enables TLS)")
    command.add_argument("--tls-cert", help="this client's certificate (mutual TLS)")
    command.add_argument("--tls-key", help="this client's private key (mutual TLS)")
    token = command.add_mutually_exclusive_group()
    token.add_argument("--token-file", help="file holding the bearer token")
    token.add_argument("--token-env", help="name of the environment variable holding the bearer token")


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    root = argparse.ArgumentParser(prog="sigil-feed", description=__doc__)
    root.add_argument("--log-level", default=os.environ.get("SIGIL_FEED_LOG_LEVEL", "INFO"))
    log_json = os.environ.get("SIGIL_FEED_LOG_JSON", "") not in ("", "0")
    root.set_defaults(log_json=log_json)
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve batches (the embedded default dataset without --config)")
    serve.add_argument("--config", default=os.environ.get("SIGIL_FEED_CONFIG"),
                       help="trainer YAML (env SIGIL_FEED_CONFIG); default: the embedded dataset")
    serve.add_argument("--host", default=os.environ.get("SIGIL_FEED_HOST"))
    env_port = os.environ.get("SIGIL_FEED_PORT")
    serve.add_argument("--port", type=int, default=int(env_port) if env_port else None,
                       help="gRPC port (env SIGIL_FEED_PORT; default server.port, 50051; 0 picks a free one)")
    serve.add_argument("--metrics-port", type=int, default=_env_int("SIGIL_FEED_METRICS_PORT"),
                       help="Prometheus /metrics port (env SIGIL_FEED_METRICS_PORT; default server.metrics_port, "
                            "off; 0 picks a free one)")
    serve.add_argument("--log-json", action="store_true", default=log_json,
                       help="log one JSON object per line (env SIGIL_FEED_LOG_JSON=1)")
    serve.set_defaults(run="serve:serve")

    stats = sub.add_parser("stats", help="print GetStats as a table (or --json)")
    _add_connection_args(stats)
    stats.add_argument("--dataset")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--timeout", type=float, default=10.0)
    stats.set_defaults(run="query:stats")

    top = sub.add_parser("top", help="a live view of datasets, sources and clients (Ctrl-C quits)")
    _add_connection_args(top)
    top.add_argument("--dataset")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--timeout", type=float, default=5.0)
    top.set_defaults(run="query:top")

    peek = sub.add_parser("peek", help="decode a few batches back to text")
    _add_connection_args(peek)
    peek.add_argument("--dataset", default="default")
    peek.add_argument("-n", type=int, default=2, help="batches to show")
    peek.add_argument("--batch-size", type=int, default=2)
    peek.add_argument("--seq-len", type=int, default=0)
    peek.add_argument("--chars", type=int, default=400, help="characters of each row to print")
    peek.set_defaults(run="peek:peek")

    health = sub.add_parser("health", help="exit 0 when the server reports SERVING (for probes and HEALTHCHECK)")
    _add_connection_args(health)
    health.add_argument("--service", default="", help="service to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(run="query:health")
    _add_cache_commands(sub)
    _add_locality_command(sub)
    return root


def _add_cache_commands(sub: argparse._SubParsersAction) -> None:
    """`cache build|ls|rm` (cache.py)."""
    cache = sub.add_parser("cache", help="build, list or remove token stores (cached mode)")
    verbs = cache.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser("build", help="build every cached dataset's store, then exit")
    build.add_argument("--config", required=True)
    build.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: this machine's cores (default); ray: Ray Data on a Ray cluster "
                            "(pip install 'sigil-feed[ray]')")
    build.add_argument("--ray-address", help="the Ray cluster to build on (as `ray.init` takes it: HOST:PORT, "
                                             "ray://HOST:PORT, auto); default: a local cluster on this machine")
    build.add_argument("--log-json", action="store_true", default=argparse.SUPPRESS,
                       help="log one JSON object per line (env SIGIL_FEED_LOG_JSON=1)")
    build.set_defaults(run="cache:build")
    for verb in ("ls", "rm"):
        parser = verbs.add_parser(verb, help=f"{verb} token stores")
        parser.add_argument("--config", help="list the store locations this config uses")
        parser.add_argument("--cache-dir", help="a store location: a folder or a URI such as s3://bucket/prefix "
                                                "(default: SIGIL_FEED_CACHE or ~/.cache/sigil-feed)")
        parser.set_defaults(run=f"cache:{verb}")
    verbs.choices["ls"].add_argument("--json", action="store_true")
    verbs.choices["rm"].add_argument("fingerprints", nargs="*", help="stores to remove")
    verbs.choices["rm"].add_argument("--all", action="store_true",
                                     help="remove every store and stale temporary folder in the folder")


def _add_locality_command(sub: argparse._SubParsersAction) -> None:
    """`locality` (locality.py)."""
    command = sub.add_parser("locality", help="which world sizes read one contiguous run of the store per node")
    command.add_argument("--virtual", type=int, required=True, help="dataset.virtual_ranks (the layout's V)")
    command.add_argument("--world", type=int, action="append",
                         help="a world size (repeatable); default: L, 2L, 4L, ... that divide V")
    command.add_argument("--local", type=int, default=8, help="ranks per node, LOCAL_WORLD_SIZE (default 8)")
    command.add_argument("--shards", type=int, default=64, help="shards of the store (default 64)")
    command.set_defaults(run="locality:locality")


def _handler(name: str) -> Callable[[argparse.Namespace], int]:
    """A command's function from its `module:function` name in this package. The module is imported here, when its
    command runs, so that each command loads only what it uses: `stats` and `health` never load pyarrow, the
    stores or the data path, and `serve` never loads the inspection commands."""
    module, function = name.split(":")
    return getattr(importlib.import_module(f".{module}", __package__), function)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 2 for bad configuration or missing sources, 3 for storage that did not answer."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        return int(_handler(args.run)(args))
    except (ConfigError, SourceError) as err:
        print(f"sigil-feed: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Unavailable as err:  # raised before serving (a stream reports it as UNAVAILABLE instead)
        print(f"sigil-feed: error: {err} {STORAGE_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except grpc.RpcError as err:
        print(f"sigil-feed: {args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1

