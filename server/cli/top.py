"""`sigil-feed top`: a live view of GetStats (datasets, sources, clients), refreshed every second."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ...protos import feed_pb2


def input_bound_text(view: feed_pb2.InputBound) -> str:
    """The last minute's input-bound percentage, '-' before the first timing report."""
    return f"{view.fraction_1m:.0%}" if view.reported else "-"


def _store(ds: feed_pb2.DatasetStats) -> str:
    cache = ds.cache
    if ds.info.mode != "cached":
        return "- (streaming)"
    text = f"{cache.state} {cache.samples:,} samples, {cache.tokens / 1e6:,.1f} M tokens"
    return f"{text}: {cache.error}" if cache.error else text


def render(stats: feed_pb2.Stats | None, target: str, error: str | None = None) -> RenderableType:
    """One screen: a header, then tables of datasets, sources and clients."""
    header = Text.assemble(("sigil-feed top ", "bold"), target,
                           f"  up {stats.uptime_s:,.0f} s" if stats else "", "  (Ctrl-C quits)")
    parts: list[RenderableType] = [header]
    if error:
        parts.append(Text(f"cannot read stats: {error}; retrying", style="bold red"))
    if stats is None:
        return Group(*parts)
    datasets = Table("dataset", "mode", "token store", "batches", "tokens/s", "clients", "input-bound",
                     "slowest rank", title="datasets", title_justify="left")
    sources = Table("dataset", "source", "read", "kept", "dropped", "malformed", title="sources",
                    title_justify="left")
    clients = Table("dataset", "rank", "client", "epoch", "batches/s", "tokens/s", "credits", "lag s",
                    "input-bound", title="clients", title_justify="left")
    for ds in stats.datasets:
        bound = ds.input_bound
        datasets.add_row(ds.name, ds.info.mode, _store(ds), f"{ds.batches_served:,}", f"{ds.tokens_per_s:,.0f}",
                         str(len(ds.clients)), input_bound_text(bound),
                         f"{bound.slowest_rank} ({bound.slowest_client})" if bound.reported else "-")
        for src in ds.sources:
            sources.add_row(ds.name, src.spec, f"{src.read:,}", f"{src.kept:,}", f"{sum(src.dropped.values()):,}",
                            f"{sum(src.malformed.values()):,}")
        for c in sorted(ds.clients, key=lambda c: (c.world_size, c.rank)):
            clients.add_row(ds.name, f"{c.rank}/{c.world_size}", c.client_id, str(c.epoch), f"{c.batches_per_s:,.1f}",
                            f"{c.tokens_per_s:,.0f}", str(c.credits), f"{c.lag_s:.2f}", input_bound_text(c.input_bound))
    parts += [datasets, sources, clients]
    return Group(*parts)


def run_top(fetch: Callable[[], feed_pb2.Stats], target: str, *, interval_s: float = 1.0,
            console: Console | None = None) -> int:
    """Redraw every `interval_s` until Ctrl-C, on the terminal's alternate screen; returns 0."""
    stats: feed_pb2.Stats | None = None
    with Live(render(None, target), console=console, screen=True, auto_refresh=False) as live:
        try:
            while True:
                error = None
                try:
                    stats = fetch()
                except grpc.RpcError as err:
                    error = f"{err.code().name}: {err.details()}"
                live.update(render(stats, target, error), refresh=True)
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return 0
