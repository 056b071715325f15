"""The `sigil-feed` command: serve, stats, peek."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from ..protos import feed_pb2, feed_pb2_grpc
from .cache.commands import add_cache_commands
from .errors import ConfigError, SourceError

DEFAULT_CONFIG = Path(__file__).parent / "default" / "default.yaml"
EXIT_BAD_CONFIG = 2


def _serve(args: argparse.Namespace) -> int:
    from .app import run
    from .config import load_config

    config = load_config(args.config or DEFAULT_CONFIG)
    host = args.host or config.server.host
    port = config.server.port if args.port is None else args.port
    return run(config, host=host, port=port)


def _stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with grpc.insecure_channel(args.target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(
            feed_pb2.GetStatsRequest(dataset=args.dataset or ""), timeout=args.timeout)
    if args.json:
        print(json.dumps(json_format.MessageToDict(stats, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True), indent=2))
        return 0
    console = Console()
    for ds in stats.datasets:
        console.print(f"[bold]{ds.name}[/] {ds.info.mode} tokenizer={ds.info.tokenizer} "
                      f"fingerprint={ds.info.fingerprint} batches={ds.batches_served} "
                      f"tokens={ds.tokens_served} tokens/s={ds.tokens_per_s:,.0f}")
        sources = Table("source", "read", "kept", "dropped", "malformed", "tokens", "median len")
        for src in ds.sources:
            sources.add_row(src.spec, str(src.read), str(src.kept), _reasons(src.dropped),
                            _reasons(src.malformed), f"{src.tokens:,}", _median(src.lengths))
        console.print(sources)
        if ds.clients:
            clients = Table("peer", "client", "rank", "epoch", "batches", "tokens", "credits", "connected s")
            for c in ds.clients:
                clients.add_row(c.peer, c.client_id, f"{c.rank}/{c.world_size}", str(c.epoch),
                                str(c.batches), f"{c.tokens:,}", str(c.credits), f"{c.connected_s:.0f}")
            console.print(clients)
    return 0


def _reasons(counts: object) -> str:
    items = sorted(dict(counts).items())  # type: ignore[call-overload]
    return ", ".join(f"{k}={v}" for k, v in items) or "-"


def _median(buckets: list[feed_pb2.LengthBucket]) -> str:
    total = sum(b.count for b in buckets)
    seen = 0
    for bucket in buckets:
        seen += bucket.count
        if seen * 2 >= total:
            return f"<={bucket.upper}"
    return "-"


def _peek(args: argparse.Namespace) -> int:
    from ..client.stream import BatchStream, FeedBatch
    from .tokenize import load_tokenizer

    with BatchStream(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len,
                     prefetch=2, reconnect_deadline_s=5.0) as stream:
        info = stream.info
        try:
            tokenizer = load_tokenizer(info.tokenizer, base_dir=DEFAULT_CONFIG.parent)
        except ConfigError:
            tokenizer = None
        print(f"dataset={info.name} tokenizer={info.tokenizer} vocab={info.vocab_size} "
              f"seq_len={stream.seq_len} pack={info.pack}")
        batches = (item for item in stream if isinstance(item, FeedBatch))
        for _, batch in zip(range(args.n), batches, strict=False):
            ids = batch.arrays["input_ids"]
            print(f"--- batch {batch.seq} epoch {batch.epoch} shape {list(ids.shape)} tokens {batch.tokens} "
                  f"cursor {len(batch.cursor)} bytes")
            for row, row_ids in enumerate(ids):
                text = tokenizer.decode(row_ids.tolist()) if tokenizer else str(row_ids.tolist())
                print(f"[row {row}] {text[: args.chars]!r}")
    return 0


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    root = argparse.ArgumentParser(prog="sigil-feed", description=__doc__)
    root.add_argument("--log-level", default=os.environ.get("SIGIL_FEED_LOG_LEVEL", "INFO"))
    sub = root.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve batches (the embedded default dataset without --config)")
    serve.add_argument("--config", default=os.environ.get("SIGIL_FEED_CONFIG"),
                       help="trainer YAML (env SIGIL_FEED_CONFIG); default: the embedded dataset")
    serve.add_argument("--host", default=os.environ.get("SIGIL_FEED_HOST"))
    env_port = os.environ.get("SIGIL_FEED_PORT")
    serve.add_argument("--port", type=int, default=int(env_port) if env_port else None,
                       help="gRPC port (env SIGIL_FEED_PORT; default server.port, 50051; 0 picks a free one)")
    serve.set_defaults(func=_serve)

    stats = sub.add_parser("stats", help="print GetStats as a table (or --json)")
    stats.add_argument("--target", default="127.0.0.1:50051")
    stats.add_argument("--dataset")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--timeout", type=float, default=10.0)
    stats.set_defaults(func=_stats)

    peek = sub.add_parser("peek", help="decode a few batches back to text")
    peek.add_argument("--target", default="127.0.0.1:50051")
    peek.add_argument("--dataset", default="default")
    peek.add_argument("-n", type=int, default=2, help="batches to show")
    peek.add_argument("--batch-size", type=int, default=2)
    peek.add_argument("--seq-len", type=int, default=0)
    peek.add_argument("--chars", type=int, default=400, help="characters of each row to print")
    peek.set_defaults(func=_peek)
    add_cache_commands(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 2 for bad configuration or missing sources."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, SourceError) as err:
        print(f"sigil-feed: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except grpc.RpcError as err:
        print(f"sigil-feed: {args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
