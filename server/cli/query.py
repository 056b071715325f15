"""`sigil-feed stats|top|health`: ask a running server (GetStats, the health service) and print the answer; the
connection options (TLS, bearer token) that every command asking a server shares."""

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
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rich.console import Console
from rich.table import Table

from ...protos import feed_pb2, feed_pb2_grpc
from ..rpc.security import bearer_metadata, channel_credentials
from .top import input_bound_text, run_top


def credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """The channel's TLS credentials from --tls-ca/--tls-cert/--tls-key; None for plaintext."""
    if not (args.tls_ca or args.tls_cert):
        return None
    return channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)


def metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """The bearer token's call metadata from --token-file or --token-env; none without either."""
    if args.token_file:
        return bearer_metadata(Path(args.token_file).read_text().strip())
    if args.token_env:
        return bearer_metadata(os.environ.get(args.token_env, "").strip())
    return ()


def _channel(args: argparse.Namespace) -> grpc.Channel:
    credentials_ = credentials(args)
    if credentials_ is None:
        return grpc.insecure_channel(args.target)
    return grpc.secure_channel(args.target, credentials_)


def health(args: argparse.Namespace) -> int:
    """Print the server's health status; 0 when SERVING."""
    with _channel(args) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout).status
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else 1


def stats(args: argparse.Namespace) -> int:
    """Print GetStats as tables (or as JSON with --json)."""
    with _channel(args) as channel:
        reply = _get_stats(channel, args)
    if args.json:
        print(json.dumps(json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True), indent=2))
        return 0
    console = Console(width=None if sys.stdout.isatty() else 200)  # pipes and logs get every column
    for ds in reply.datasets:
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
    from ..cached.working_set import cache_gb_to_fit, rank_ranges  # numpy: only a cached store's stats need it

    w = cache.working_set
    fit = cache_gb_to_fit(cache.working_set_bytes)
    verdict = ("fits" if w.fits else "does NOT fit the shard cache: it refetches shards")
    return (f"working set of ranks {rank_ranges(w.ranks)} of {w.world_size} (epoch {w.epoch}, {w.virtual_ranks} "
            f"virtual ranks): {cache.working_set_bytes:,} bytes at once, {verdict}; shard_cache_gb that fits it: "
            f"{fit:g}; their share of the epoch: {w.shards} shards, {w.epoch_bytes:,} bytes")


def _get_stats(channel: grpc.Channel, args: argparse.Namespace) -> feed_pb2.Stats:
    return feed_pb2_grpc.DataFeedStub(channel).GetStats(
        feed_pb2.GetStatsRequest(dataset=args.dataset or ""), timeout=args.timeout, metadata=metadata(args))


def top(args: argparse.Namespace) -> int:
    """Refresh a live view of GetStats until Ctrl-C."""
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
