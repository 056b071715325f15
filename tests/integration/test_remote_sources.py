"""Sources in a bucket of a real S3-compatible server (moto_server on loopback), read in place: the same records and
the same served epochs as the same files on disk, ranged reads, and a fault of the server mid-read ridden out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from sigil_feed.client import FeedDataset
from sigil_feed.protos import feed_pb2, feed_pb2_grpc
from sigil_feed.server.errors import SourceError, Unavailable
from sigil_feed.server.pipeline.sources.base import SourceState
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.pipeline.sources.remote import RemoteUnavailable, object_identity
from sigil_feed.server.store.fs import resolve
from sigil_feed.server.store.retry import STORAGE_RETRY_ENV
from tests.conftest import batch_digest, rust_pair, write_compressed, write_config
from tests.fault_proxy import FaultProxy

JSONL_GLOB = "corpus/**/*.jsonl*"


def lines(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def code(i: int, pad: int = 0) -> dict[str, Any]:
    """A code record with `pad` more characters of a comment that compresses poorly (hex digits)."""
    noise = "".join(hashlib.sha256(f"{i}-{k}".encode()).hexdigest() for k in range(pad // 64 + 1))[:pad]
    return {"text": f"fn f{i}() -> u32 {{ {i} }} // {noise}", "path": f"src/m{i}.rs"}


def write_corpus(root: Path) -> None:
    """JSONL (plain, zstd, gzip) over nested folders, a hidden folder a glob leaves out, and Parquet files of
    several row groups."""
    write_compressed(root / "corpus/a/part0.jsonl", lines([rust_pair(i) for i in range(40)]))
    write_compressed(root / "corpus/a/b/part1.jsonl.zst", lines([code(i) for i in range(40, 90)]))
    write_compressed(root / "corpus/c/part2.jsonl.gz", lines([rust_pair(i) for i in range(90, 120)]))
    write_compressed(root / "corpus/c/.hidden/skip.jsonl", lines([code(999)]))
    (root / "corpus/p").mkdir(parents=True)
    for f in range(2):
        rows = [code(i) for i in range(200 + 60 * f, 260 + 60 * f)]
        pq.write_table(pa.Table.from_pylist(rows), root / f"corpus/p/t{f}.parquet", row_group_size=16)


def upload(local: Path, bucket: str) -> None:
    pafs.copy_files(str(local), f"{bucket.removeprefix('s3://')}/corpus", destination_filesystem=resolve(bucket).fs)


def put(uri: str, data: bytes) -> None:
    """Write an object as it is (pyarrow would compress a `.zst` or `.gz` name by default)."""
    with resolve(uri).fs.open_output_stream(uri.removeprefix("s3://"), compression=None) as out:
        out.write(data)


@pytest.fixture
def corpus(tmp_path: Path, s3_bucket: str) -> tuple[Path, str]:
    """The corpus on disk under tmp_path and the same files in a fresh bucket; (local root, bucket URI)."""
    write_corpus(tmp_path)
    upload(tmp_path / "corpus", s3_bucket)
    return tmp_path, s3_bucket


def records(spec: str, base_dir: Path) -> list[tuple[int, int, Any]]:
    """(file, row, value) of every record a source reads."""
    return [(r.file, r.row, r.value) for r in open_source(spec, 0, base_dir=base_dir)]


def test_a_glob_over_prefixes_reads_the_records_of_the_same_files_on_disk(corpus: tuple[Path, str]) -> None:
    root, bucket = corpus
    local = open_source(f"local:{root}/{JSONL_GLOB}", 0, base_dir=root)
    remote = open_source(f"local:{bucket}/{JSONL_GLOB}", 0, base_dir=root)
    assert [f.removeprefix(str(root)) for f in local.files] == [f.removeprefix(bucket) for f in remote.files]
    assert sorted(Path(f).name for f in remote.files) == ["part0.jsonl", "part1.jsonl.zst", "part2.jsonl.gz"]
    assert records(f"local:{bucket}/{JSONL_GLOB}", root) == records(f"local:{root}/{JSONL_GLOB}", root)
    assert len(records(f"local:{bucket}/{JSONL_GLOB}", root)) == 120
    assert records(f"local:{bucket}/corpus/a", root) == records(f"local:{root}/corpus/a", root)  # a folder: its files
    assert records(f"parquet:{bucket}/corpus/p/*.parquet", root) == records(f"parquet:{root}/corpus/p/*.parquet",
                                                                              root)
    with pytest.raises(SourceError, match=r"no files found at s3://.*/corpus/nothing"):
        open_source(f"local:{bucket}/corpus/nothing/*.jsonl", 0, base_dir=root)


def test_a_remote_source_resumes_at_every_position(corpus: tuple[Path, str]) -> None:
    """Each saved state, restored in a fresh source, continues with the same records (plain JSONL seeks to its
    byte offset; Parquet starts at the row group holding the row)."""
    root, bucket = corpus
    for spec in (f"local:{bucket}/{JSONL_GLOB}", f"parquet:{bucket}/corpus/p"):
        source = open_source(spec, 0, base_dir=root)
        states, values = [source.get_state()], []
        for record in source:
            values.append(record.value)
            states.append(source.get_state())
        for k in (1, 37, 45, 100, len(values) - 1):
            fresh = open_source(spec, 0, base_dir=root)
            fresh.set_state(states[k])
            assert [r.value for r in fresh] == values[k:], (spec, k)


def test_remote_identity_is_etag_and_size_and_changes_with_the_object(corpus: tuple[Path, str]) -> None:
    root, bucket = corpus
    uri = f"{bucket}/corpus/a/part0.jsonl"
    size, etag = object_identity(uri)
    assert size == (root / "corpus/a/part0.jsonl").stat().st_size and etag
    copy = f"{bucket}/moved/part0.jsonl"  # the same bytes elsewhere: the same identity (data that moves keeps it)
    put(copy, (root / "corpus/a/part0.jsonl").read_bytes())
    assert object_identity(copy) == [size, etag]
    put(uri, lines([rust_pair(i) for i in range(41)]))
    assert object_identity(uri)[1] != etag


def big_jsonl(records: int = 6000) -> bytes:
    return lines([code(i, pad=400) for i in range(records)])  # about 2.6 MB


def test_a_remote_plain_jsonl_part_and_a_parquet_row_group_are_read_by_ranges(
        tmp_path: Path, s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading from a late offset of a large plain JSONL file, or the last row group of a large Parquet file,
    fetches a small part of it (bytes counted on the wire)."""
    data = big_jsonl()
    rows = [code(i, pad=400) for i in range(6000)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet", row_group_size=500)
    put(f"{s3_bucket}/big.jsonl", data)
    put(f"{s3_bucket}/big.parquet", (tmp_path / "big.parquet").read_bytes())
    offset = data.index(b'{"text": "fn f5900()')
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        source = open_source(f"local:{s3_bucket}/big.jsonl", 0, base_dir=tmp_path)
        source.set_state(SourceState(file=0, row=5900, offset=offset))
        assert [r.value for r in source] == rows[5900:]
        assert proxy.bytes_down < len(data) // 2, (proxy.bytes_down, len(data))

        before = proxy.bytes_down
        parquet = open_source(f"parquet:{s3_bucket}/big.parquet", 0, base_dir=tmp_path)
        parquet.set_state(SourceState(file=0, row=5600))
        assert [r.value for r in parquet] == [{"text": r["text"], "path": r["path"]} for r in rows[5600:]]
        size = (tmp_path / "big.parquet").stat().st_size
        assert proxy.bytes_down - before < size // 3, (proxy.bytes_down - before, size)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_a_reset_of_the_s3_server_mid_read_is_ridden_out(
        tmp_path: Path, s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, suffix: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Every connection to S3 is reset for 3 s after the first MB of a file went by: the read tries again within
    the storage retry window (the S3 client tries each request once, so the retries are the read's own) and yields
    every record once, in order."""
    # compressed, twice the records, so that more than a MB is still to come when the fault is armed
    write_compressed(tmp_path / f"big{suffix}", big_jsonl(6000 if suffix == ".jsonl" else 12000))
    expected = records(f"local:{tmp_path}/big{suffix}", tmp_path)
    put(f"{s3_bucket}/big{suffix}", (tmp_path / f"big{suffix}").read_bytes())
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        monkeypatch.setenv(STORAGE_RETRY_ENV, "30")
        source = open_source(f"local:{s3_bucket}/big{suffix}", 0, base_dir=tmp_path)
        got = []
        for record in source:
            got.append((record.file, record.row, record.value))
            if len(got) == 10:
                proxy.fault_after(1 << 19, "reset", 3)
        assert proxy.mode == "pass"
    assert got == expected
    assert any("trying again" in r.getMessage() for r in caplog.records), "the read never met the reset"


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_an_object_replaced_while_read_by_ranges_ends_the_read_never_mixes_versions_silently(
        tmp_path: Path, s3_bucket: str, suffix: str) -> None:
    """The object is overwritten (same size, same line lengths) after the first of its 1 MiB ranges was read: the
    read ends RemoteChanged (UNAVAILABLE: a build is tried again, never committing a shard of two versions), and a
    read of it again gives the new version whole."""
    def version(tag: str) -> bytes:
        return lines([{"text": f"{tag} {i:05d} " + hashlib.sha256(f"{tag}{i}".encode()).hexdigest() * 3}
                      for i in range(12000 if suffix == ".jsonl" else 60000)])

    for tag in ("old", "new"):
        write_compressed(tmp_path / tag / f"a{suffix}", version(tag))
    uri = f"{s3_bucket}/a{suffix}"
    put(uri, (tmp_path / f"old/a{suffix}").read_bytes())
    assert (tmp_path / f"old/a{suffix}").stat().st_size > 2 << 20  # read in several ranges
    source = open_source(f"local:{uri}", 0, base_dir=tmp_path)
    got = []
    with pytest.raises(RemoteUnavailable, match="replaced while it was read"):
        for record in source:
            got.append(record.value["text"][:3])
            if len(got) == 100:
                put(uri, (tmp_path / f"new/a{suffix}").read_bytes())
    assert got[0] == "old"
    assert records(f"local:{uri}", tmp_path) == records(f"local:{tmp_path}/new/a{suffix}", tmp_path)


def test_a_parquet_object_replaced_while_read_ends_the_read_never_mixes_versions_silently(
        tmp_path: Path, s3_bucket: str) -> None:
    for tag in ("old", "new"):
        (tmp_path / tag).mkdir()
        pq.write_table(pa.Table.from_pylist([code(i, pad=400 + len(tag)) | {"path": tag} for i in range(4000)]),
                       tmp_path / tag / "t.parquet", row_group_size=500)
    uri = f"{s3_bucket}/t.parquet"
    put(uri, (tmp_path / "old/t.parquet").read_bytes())
    source = open_source(f"parquet:{uri}", 0, base_dir=tmp_path)
    got = []
    with pytest.raises(RemoteUnavailable, match="replaced while it was read"):
        for record in source:
            got.append(record.value["path"])
            if len(got) == 10:
                put(uri, (tmp_path / "new/t.parquet").read_bytes())
    assert got[0] == "old"
    assert records(f"parquet:{uri}", tmp_path) == records(f"parquet:{tmp_path}/new/t.parquet", tmp_path)


def test_an_outage_longer_than_the_retry_window_ends_the_read_unavailable_never_as_a_bad_file(
        tmp_path: Path, s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream then ends UNAVAILABLE (the client resumes) and a build is tried again (an OSError); no record of
    the file is counted bad, which would drop the rest of it from the epoch."""
    put(f"{s3_bucket}/big.jsonl", big_jsonl())
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        monkeypatch.setenv(STORAGE_RETRY_ENV, "1")
        source = open_source(f"local:{s3_bucket}/big.jsonl", 0, base_dir=tmp_path)
        proxy.fault_after(3 << 19, "reset", 8)  # within the second 1 MiB range
        seen = []
        with pytest.raises(RemoteUnavailable, match=r"cannot read s3://.*/big.jsonl: .*no progress for") as raised:
            for record in source:
                seen.append(record.error)
    assert isinstance(raised.value, Unavailable) and isinstance(raised.value, OSError)
    assert 0 < len(seen) < 6000 and set(seen) == {None}


# --- served, both modes ---------------------------------------------------------------------------


def section(names: list[str], cache: Path, use_cache: bool) -> dict[str, Any]:
    return {"names": names, "use_cache": use_cache, "cache_dir": str(cache), "shuffle_seed": 4,
            "interleave_mode": "round_robin", "stopping_strategy": "all_exhausted", "remainder": "keep",
            "epochs": 1, "min_length": 16, "tokenizer_backend": "hf"}


def epoch(target: str, dataset: str) -> Iterator[str]:
    """A hash of every batch of one epoch (pack: false: each row one whole sample)."""
    for batch in FeedDataset(target, dataset, batch_size=8):
        yield batch_digest(batch)


def test_sources_in_a_bucket_serve_the_epochs_of_the_same_files_on_disk_in_both_modes(
        corpus: tuple[Path, str], start_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """One server, four datasets: the corpus on disk and in the bucket, streaming and cached. Each mode serves the
    bucket's sources batch for batch as it serves the disk's; the credentials appear in no log line or stats."""
    root, bucket = corpus
    secret = "testing-" + hashlib.sha256(str(root).encode()).hexdigest()[:16]  # moto takes any secret key
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    names = {"disk": [f"local:{root}/{JSONL_GLOB}", f"parquet:{root}/corpus/p"],
             "bucket": [f"local:{bucket}/{JSONL_GLOB}", f"parquet:{bucket}/corpus/p"]}
    datasets = {f"{where}-{mode}": {"dataset": section(specs, root / "cache", mode == "cached")}
                for where, specs in names.items() for mode in ("streaming", "cached")}
    server = start_server(write_config(root / "c.yaml", None, max_seq_len=256, pack=False,
                                       server={"datasets": datasets}))
    for mode in ("streaming", "cached"):
        disk = list(epoch(server.target, f"disk-{mode}"))
        assert len(disk) >= 30  # 240 samples (and more: all_exhausted), 8 rows a batch
        assert list(epoch(server.target, f"bucket-{mode}")) == disk, mode
    assert not any("bad_file" in line for line in server.output)
    with grpc.insecure_channel(server.target) as channel:
        stats = feed_pb2_grpc.DataFeedStub(channel).GetStats(feed_pb2.GetStatsRequest(), timeout=30)
    assert bucket in str(stats) and secret not in str(stats) and not any(secret in line for line in server.output)


def test_streaming_serves_its_first_batch_after_reading_a_small_part_of_the_bucket(
        tmp_path: Path, s3_bucket: str, s3_endpoint: str, start_server, monkeypatch: pytest.MonkeyPatch) -> None:
    total = 0
    for f in range(4):  # 11 MB; the first batch needs the first two 1 MiB ranges of one file
        data = lines([code(i, pad=400) for i in range(f * 6000, (f + 1) * 6000)])
        total += len(data)
        put(f"{s3_bucket}/big/part{f}.jsonl", data)
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        settings = {**section([f"local:{s3_bucket}/big"], tmp_path / "cache", False), "shuffle_block": 256}
        server = start_server(write_config(tmp_path / "c.yaml", settings, max_seq_len=256, pack=False))
        batch = next(iter(FeedDataset(server.target, batch_size=8)))
        assert batch["input_ids"].shape[0] == 8
        assert proxy.bytes_down < total // 4, (proxy.bytes_down, total)


def test_a_streaming_epoch_from_the_bucket_rides_out_a_reset_of_the_s3_server(
        tmp_path: Path, s3_bucket: str, s3_endpoint: str, start_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server streams two files from the bucket through the fault proxy; a few batches in, every connection to
    S3 is reset for 3 s mid-transfer. The epoch is batch for batch the one the same files on disk give."""
    for f in range(2):
        data = lines([code(i, pad=400) for i in range(f * 3000, (f + 1) * 3000)])
        write_compressed(tmp_path / "disk" / f"part{f}.jsonl", data)
        put(f"{s3_bucket}/big/part{f}.jsonl", data)
    with FaultProxy(int(s3_endpoint.rsplit(":", 1)[1])) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{proxy.endpoint}")
        monkeypatch.setenv(STORAGE_RETRY_ENV, "30")
        datasets = {where: {"dataset": {**section([spec], tmp_path / "cache", False), "shuffle_block": 512}}
                    for where, spec in (("disk", f"local:{tmp_path}/disk"), ("bucket", f"local:{s3_bucket}/big"))}
        server = start_server(write_config(tmp_path / "c.yaml", None, max_seq_len=256, pack=False,
                                           server={"datasets": datasets}))
        digests = []
        for batch in FeedDataset(server.target, "bucket", batch_size=64):
            digests.append(batch_digest(batch))
            if len(digests) == 3:
                proxy.fault_after(1 << 19, "reset", 3)
        assert proxy.mode == "pass"
    assert digests == [batch_digest(batch) for batch in FeedDataset(server.target, "disk", batch_size=64)]
    assert any("trying again" in line for line in server.output), "".join(server.output[-20:])
