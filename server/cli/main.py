"""The `sigil-feed` command: serve, stats, top, peek, health (and the cache commands)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from ...protos import feed_pb2, feed_pb2_grpc
from ..default import DEFAULT_DIR
from ..errors import ConfigError, SourceError, Unavailable
from .cache import add_cache_commands
from .locality import add_locality_command
from .logs import configure as configure_logging

DEFAULT_CONFIG = DEFAULT_DIR / "default.yaml"
EXIT_BAD_CONFIG = 2
EXIT_UNAVAILABLE = 3  # storage a source or store lies on did not answer: start again later
STORAGE_HINT = ("(fix: check the storage endpoint, the network and the credentials' environment: AWS_ENDPOINT_URL, "
                "HF_ENDPOINT, ...; or wait longer with SIGIL_FEED_STORAGE_RETRY_S)")


def _serve(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..rpc.app import resolve_listen, run

    config = load_config(args.config or DEFAULT_CONFIG)
    section = config.server
    listen = resolve_listen(config, host=args.host or section.host,
                            port=section.port if args.port is None else args.port,
                            metrics_port=section.metrics_port if args.metrics_port is None else args.metrics_port)
    return run(config, listen)


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


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    from ..rpc.security import channel_credentials

    if not (args.tls_ca or args.tls_cert):
        return None
    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    from ..rpc.security import bearer_metadata

    if args.token_file:
        return bearer_metadata(Path(args.token_file).read_text().strip())
    if args.token_env:
        return bearer_metadata(os.environ.get(args.token_env, "").strip())
    return ()


def _channel(args: argparse.Namespace) -> grpc.Channel:
    credentials = _credentials(args)
    if credentials is None:
        return grpc.insecure_channel(args.target)
    return grpc.secure_channel(args.target, credentials)


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(args) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def _stats(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .top import input_bound_text

    with _channel(args) as channel:
        stats = _get_stats(channel, args)
    if args.json:
        print(json.dumps(json_format.MessageToDict(stats, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True), indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get every column
    for ds in stats.datasets:
        console.print(f"[bold]{ds.name}[/] {ds.info.mode} tokenizer={ds.info.tokenizer} "
                      f"fingerprint={ds.info.fingerprint} batches={ds.batches_served} "
                      f"tokens={ds.tokens_served} tokens/s={ds.tokens_per_s:,.0f} "
                      f"input-bound={input_bound_text(ds.input_bound)}")
        sources = Table("source", "read", "kept", "dropped", "malformed", "tokens", "median len")
        for src in ds.sources:
            sources.add_row(src.spec, str(src.read), str(src.kept), _reasons(src.dropped),
                            _reasons(src.malformed), f"{src.tokens:,}", _median(src.lengths))
        console.print(sources)
        mixture = _mixture_text(ds.mixture, list(ds.info.sources), ds.info.mode)
        console.print(mixture, markup=False, highlight=False)  # a spec may hold [ and ]
        if ds.info.mode == "cached":
            console.print(_store_text(ds.cache) + f"; virtual ranks {ds.info.virtual_ranks}")
        if ds.epoch_members:
            console.print("epochs' files: " + _members_text(ds.epoch_members))
        if ds.clients:
            clients = Table("peer", "client", "rank", "epoch", "position (batches)", "tokens", "tokens/s",
                            "credits", "lag s", "input-bound", "connected s")
            for c in ds.clients:
                clients.add_row(c.peer, c.client_id, f"{c.rank}/{c.world_size}", str(c.epoch), str(c.batches),
                                f"{c.tokens:,}", f"{c.tokens_per_s:,.0f}", str(c.credits), f"{c.lag_s:.2f}",
                                input_bound_text(c.input_bound), f"{c.connected_s:.0f}")
            console.print(clients)
    return 0


def _members_text(members: Iterable[feed_pb2.EpochMembers]) -> str:
    """Runs of epochs over the same files: `0-2: 18 files (content 5f0e...); 3: 20 files (content 9a1c...)`."""
    runs: list[list[Any]] = []
    for m in members:
        if runs and runs[-1][2] == m.content and runs[-1][1] + 1 == m.epoch:
            runs[-1][1] = m.epoch
        else:
            runs.append([m.epoch, m.epoch, m.content, list(m.files)])
    return "; ".join(f"{a if a == b else f'{a}-{b}'}: {'+'.join(map(str, files))} files (content {content})"
                     for a, b, content, files in runs)


def _mixture_text(mix: feed_pb2.MixtureStats, sources: list[str], mode: str) -> str:
    """The mixture's line: epoch, weights at its start (in source order), the rows inside it where a phase starts (in
    streaming `mode`, with where it takes effect), the schedule's next change, and changes accepted on resume."""
    weights = " ".join(f"{k}={mix.dataset_weights[k]:g}" for k in sources if k in mix.dataset_weights)
    tasks = " ".join(f"{k}={v:g}" for k, v in sorted(mix.task_weights.items())) or "each once"
    change = f"epoch {mix.next_change_epoch}" if mix.next_change_epoch >= 0 else "none"
    inside = f"; changes inside it at rows {', '.join(map(str, mix.change_rows))}" if mix.change_rows else ""
    if inside and mode == "streaming":
        inside += " (streaming: from the first shuffle block that starts at or after it)"
    text = f"mixture of epoch {mix.epoch}: {weights}; tasks: {tasks}{inside}; next change: {change}"
    return "\n".join([text, *(f"  accepted on resume: {c}" for c in mix.accepted_changes)])


def _store_text(cache: feed_pb2.CacheState) -> str:
    """The token store's line: state, size, bytes fetched from it, and a remote store's shard cache."""
    text = f"token store {cache.path}: {cache.state}"
    if cache.error:
        return f"{text}: {cache.error}"
    if cache.state != "ready":
        return f"{text} ({cache.samples:,} samples so far)"
    text += (f", {cache.samples:,} samples, {cache.tokens:,} tokens, {cache.shards} shards, {cache.bytes:,} bytes, "
             f"fetched by this server {cache.bytes_fetched:,} bytes")
    if cache.HasField("shard_cache"):
        c = cache.shard_cache
        text += (f"; shard cache {c.dir}: {c.bytes:,} of {c.max_bytes:,} bytes, {c.shards} shards, hit rate "
                 f"{c.hit_rate:.0%} ({c.hits} hits, {c.misses} misses), {c.evictions} evictions, "
                 f"{c.checksum_failures} checksum failures")
    if cache.HasField("working_set"):
        text += "; " + _working_set_text(cache)
    return text


def _working_set_text(cache: feed_pb2.CacheState) -> str:
    """The working set of the ranks that opened an epoch last: what they read at once, whether the shard cache
    holds it, and the `shard_cache_gb` that would."""
    from ..cached.working_set import cache_gb_to_fit, rank_ranges

    w = cache.working_set
    fit = cache_gb_to_fit(cache.working_set_bytes)
    verdict = ("fits" if w.fits else "does NOT fit the shard cache: it refetches shards")
    return (f"working set of ranks {rank_ranges(w.ranks)} of {w.world_size} (epoch {w.epoch}, {w.virtual_ranks} "
            f"virtual ranks): {cache.working_set_bytes:,} bytes at once, {verdict}; shard_cache_gb that fits it: "
            f"{fit:g}; their share of the epoch: {w.shards} shards, {w.epoch_bytes:,} bytes")


def _get_stats(channel: grpc.Channel, args: argparse.Namespace) -> feed_pb2.Stats:
    return feed_pb2_grpc.DataFeedStub(channel).GetStats(
        feed_pb2.GetStatsRequest(dataset=args.dataset or ""), timeout=args.timeout, metadata=_metadata(args))


def _top(args: argparse.Namespace) -> int:
    from .top import run_top

    with _channel(args) as channel:
        return run_top(lambda: _get_stats(channel, args), args.target, interval_s=args.interval)


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
    from ...client.stream import BatchStream, FeedBatch
    from ..pipeline.tokenize import load_tokenizer

    with BatchStream(args.target, args.dataset, batch_size=args.batch_size, seq_len=args.seq_len,
                     prefetch=2, reconnect_deadline_s=5.0, credentials=_credentials(args),
                     metadata=_metadata(args)) as stream:
        info = stream.info
        try:
            tokenizer = load_tokenizer(info.tokenizer)
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
    serve.set_defaults(func=_serve)

    stats = sub.add_parser("stats", help="print GetStats as a table (or --json)")
    _add_connection_args(stats)
    stats.add_argument("--dataset")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--timeout", type=float, default=10.0)
    stats.set_defaults(func=_stats)

    top = sub.add_parser("top", help="a live view of datasets, sources and clients (Ctrl-C quits)")
    _add_connection_args(top)
    top.add_argument("--dataset")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--timeout", type=float, default=5.0)
    top.set_defaults(func=_top)

    peek = sub.add_parser("peek", help="decode a few batches back to text")
    _add_connection_args(peek)
    peek.add_argument("--dataset", default="default")
    peek.add_argument("-n", type=int, default=2, help="batches to show")
    peek.add_argument("--batch-size", type=int, default=2)
    peek.add_argument("--seq-len", type=int, default=0)
    peek.add_argument("--chars", type=int, default=400, help="characters of each row to print")
    peek.set_defaults(func=_peek)

    health = sub.add_parser("health", help="exit 0 when the server reports SERVING (for probes and HEALTHCHECK)")
    _add_connection_args(health)
    health.add_argument("--service", default="", help="service to check (default: the whole server)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_health)
    add_cache_commands(sub)
    add_locality_command(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; exit code 2 for bad configuration or missing sources, 3 for storage that did not answer."""
    args = parser().parse_args(argv)
    configure_logging(args.log_level, json_lines=args.log_json)
    try:
        return int(args.func(args))
    except (ConfigError, SourceError) as err:
        print(f"sigil-feed: error: {err}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    except Unavailable as err:  # raised before serving (a stream reports it as UNAVAILABLE instead)
        print(f"sigil-feed: error: {err} {STORAGE_HINT}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except grpc.RpcError as err:
        print(f"sigil-feed: {args.target}: {err.code().name}: {err.details()}", file=sys.stderr)
        return 1

