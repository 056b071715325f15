"""Prometheus metrics, JSON logs, the stats table and the health command, against one real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sigil_feed.client.stream import BatchStream, EpochEnd, FeedBatch
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from tests.conftest import REPO, ServerProcess, rust_pair, write_config, write_jsonl
from tests.integration.conftest import metrics_url

N_PAIRS = 40


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, module_server) -> ServerProcess:
    folder = tmp_path_factory.mktemp("observability")
    records: list[object] = [rust_pair(i) for i in range(N_PAIRS)]
    records += ['{"prompt": "truncated', {"prompt": 3, "gen": "x"}]
    write_jsonl(folder / "pairs.jsonl", records)
    config = write_config(folder / "trainer.yaml", {"names": ["local:pairs.jsonl"], "use_cache": False})
    return module_server(config, "--metrics-port", "0", "--log-json")


def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "stateset": ("",)}


def exported_names(server: ServerProcess) -> set[str]:
    """Every sample name /metrics exports, including those of families with no samples right now."""
    with urllib.request.urlopen(metrics_url(server), timeout=10) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    return ({s.name for family in families for s in family.samples}
            | {family.name + suffix for family in families for suffix in SUFFIXES.get(family.type, ("",))})


def sample(metrics: dict, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [v for (n, ls), v in metrics.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_metrics_count_batches_records_clients_streams_and_errors(server: ServerProcess) -> None:
    with BatchStream(server.target, batch_size=4, prefetch=2, client_id="trainer-7") as stream:
        for item in stream:
            if isinstance(item, EpochEnd):
                break
        live = scrape(server)
    labels = {"dataset": "default", "rank": "0", "client_id": "trainer-7"}
    assert sample(live, "sigil_feed_client_credits", **labels) >= 0
    assert sample(live, "sigil_feed_client_lag_seconds", **labels) >= 0
    assert sample(live, "sigil_feed_client_batches", **labels) >= 1
    assert sample(live, "sigil_feed_streams_open", dataset="default") == 1
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError):
        feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(dataset="nope"), timeout=10)
    after = scrape(server)
    assert sample(after, "sigil_feed_batches_served_total", dataset="default") >= 1
    assert sample(after, "sigil_feed_tokens_served_total", dataset="default") > 0
    assert sample(after, "sigil_feed_records_read_total", dataset="default") == N_PAIRS + 2
    assert sample(after, "sigil_feed_records_kept_total", dataset="default") == N_PAIRS
    for reason in ("bad_json", "bad_type"):
        assert sample(after, "sigil_feed_records_malformed_total", dataset="default", reason=reason) == 1
    assert sample(after, "sigil_feed_streams_opened_total", dataset="default") >= 1
    assert sample(after, "sigil_feed_streams_closed_total", dataset="default") >= 1
    assert sample(after, "sigil_feed_streams_open", dataset="default") == 0
    assert not [k for k in after if k[0] == "sigil_feed_client_credits"]  # a closed stream leaves no series
    assert sample(after, "sigil_feed_rpcs_total", method="/sigil_feed.v1.DataFeed/GetStats", code="NOT_FOUND") == 1
    assert sample(after, "sigil_feed_cache_state", dataset="default", sigil_feed_cache_state="ready") == 1
    assert sample(after, "process_resident_memory_bytes") > 0


def test_stats_shows_connected_clients_and_json_logs_name_peer_rank_dataset(server: ServerProcess) -> None:
    with BatchStream(server.target, batch_size=2, prefetch=2, rank=1, world_size=2, client_id="rank-one") as stream:
        batches = [item for _, item in zip(range(5), (i for i in stream if isinstance(i, FeedBatch)), strict=False)]
        table = cli("stats", "--target", server.target)
        as_json = json.loads(cli("stats", "--target", server.target, "--json").stdout)
    assert len(batches) == 5 and table.returncode == 0, table.stderr
    for column in ("rank", "epoch", "position", "lag s", "tokens/s", "rank-one", "1/2"):
        assert column in table.stdout, column
    (client,) = as_json["datasets"][0]["clients"]
    assert client["client_id"] == "rank-one" and client["rank"] == 1 and client["epoch"] in (0, 1)
    assert int(client["batches"]) >= 5 and client["tokens_per_s"] > 0 and client["lag_s"] >= 0
    deadline = time.monotonic() + 30  # the server logs the close after the client has gone
    while True:
        logs = [json.loads(line) for line in list(server.output) if line.startswith("{")]
        opened = [r for r in logs if r["msg"].startswith("stream opened") and r.get("client_id") == "rank-one"]
        closed = [r for r in logs if r["msg"].startswith("stream closed") and r.get("client_id") == "rank-one"]
        if (opened and closed) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert opened and closed, logs[-5:]
    assert {"peer", "dataset", "rank", "world_size", "ts", "level", "logger"} <= set(opened[0])
    assert (opened[0]["rank"], opened[0]["dataset"], closed[0]["batches"] >= 5) == (1, "default", True)
    assert json.loads(cli("stats", "--target", server.target, "--json").stdout)["datasets"][0].get("clients", []) == []


def test_health_command_exits_0_only_for_a_serving_server(server: ServerProcess) -> None:
    ok = cli("health", "--target", server.target)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    down = cli("health", "--target", "127.0.0.1:1", "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stderr


def test_every_metric_the_grafana_dashboard_queries_is_exported(server: ServerProcess) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels) and all("gridPos" in p for p in panels)
    queries = [t["expr"] for p in panels for t in p["targets"]]
    queries.append(next(v["definition"] for v in dashboard["templating"]["list"] if v["name"] == "dataset"))
    used = {name for query in queries for name in re.findall(r"\bsigil_feed_\w+", query)}
    with BatchStream(server.target, batch_size=2, prefetch=2, client_id="dashboard") as stream:
        started = time.monotonic()
        for _ in stream:  # long enough for timing reports (up to two a second) to reach the server
            time.sleep(0.01)
            if time.monotonic() - started > 1.5:
                break
        exported = exported_names(server)
    assert used and used <= exported, sorted(used - exported)
    for panel in ("Input-bound % per rank", "Throughput", "Lag", "Token store build progress", "RPCs by status"):
        assert any(p["title"].startswith(panel) for p in panels), panel
