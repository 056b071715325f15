"""Remote sources' identities cost no request per object: an epoch's membership takes each object's size and ETag
from the bucket's listing, and its store build uses them as they are (counted at a proxy in front of a real
S3-compatible server, moto_server); an object replaced after it was listed is never read as the listed one."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.s3 import CountingProxy
from sigil_feed.server.config import parse_config
from sigil_feed.server.errors import SourceError
from sigil_feed.server.feed.served import ServedDataset
from sigil_feed.server.pipeline.sources.opening import open_source
from sigil_feed.server.pipeline.sources.remote import RemoteChanged, object_identities
from sigil_feed.server.runtime import Runtime
from sigil_feed.server.store.fs import resolve
from tests.conftest import TOKENIZER_DIR, rust_pair
from tests.unit.streaming_fixtures import encoder

OBJECTS = 12
RECORDS = 4  # per object


def body(first: int, count: int = RECORDS) -> bytes:
    return b"".join(json.dumps(rust_pair(i)).encode() + b"\n" for i in range(first, first + count))


def put(uri: str, data: bytes) -> None:
    with resolve(uri).fs.open_output_stream(uri.removeprefix("s3://"), compression=None) as out:
        out.write(data)


@pytest.fixture
def proxy(s3_bucket: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingProxy]:
    """OBJECTS JSONL objects under `data/` in the bucket, and every later request to it counted."""
    for n in range(OBJECTS):
        put(f"{s3_bucket}/data/p{n:02d}.jsonl", body(RECORDS * n))
    with CountingProxy(s3_endpoint) as counting:
        monkeypatch.setenv("AWS_ENDPOINT_URL", counting.endpoint)
        yield counting


def dataset(root: Path, bucket: str, runtime: Runtime) -> ServedDataset:
    section = {"names": [f"local:{bucket}/data/*.jsonl"], "use_cache": True, "cache_dir": str(root / "cache"),
               "shuffle_seed": 3, "remainder": "keep"}
    raw = {"model_name": str(TOKENIZER_DIR), "max_seq_len": 64, "pack": False, "dataset": section}
    return ServedDataset(parse_config(raw, "test.yaml", root).datasets["default"], "test.yaml", encoder(),
                         runtime=runtime)


def by_object(counts: dict[tuple[str, str], int]) -> dict[str, tuple[int, int]]:
    """(HEAD requests, GET requests) per object."""
    keys = {key for kind, key in counts if kind in ("head", "get")}
    return {key: (counts.get(("head", key), 0), counts.get(("get", key), 0)) for key in keys}


def listings(counts: dict[tuple[str, str], int]) -> int:
    return sum(n for (kind, _), n in counts.items() if kind == "list")


def test_a_build_of_remote_objects_takes_their_identities_once_per_epoch_opening_from_the_listing(
        tmp_path: Path, s3_bucket: str, proxy: CountingProxy, runtime: Runtime) -> None:
    """Every HEAD request is a read's opening of the object (pyarrow's, for its size; each object here is read in
    one range, so one GET each): the membership, the build's plans and its shards' names ask for none. Each epoch
    opening looks at the sources again with one listing and no request per object."""
    served = dataset(tmp_path, s3_bucket, runtime)
    opened = proxy.taken()
    assert listings(opened) == 1
    assert all(heads <= gets for heads, gets in by_object(opened).values()), by_object(opened)  # the probe reads

    served.prepare(show_bar=False)
    built = proxy.taken()
    assert listings(built) == 0
    per_object = by_object(built)
    assert len(per_object) == OBJECTS
    assert all(heads == gets for heads, gets in per_object.values()), per_object
    assert served.store is not None and len(served.store) == OBJECTS * RECORDS

    for epoch in range(2):
        assert served.memberships.of_epoch(epoch).fingerprint == served.content_fingerprint
        looked = proxy.taken()
        assert listings(looked) == 1 and by_object(looked) == {}, looked


def test_the_listing_gives_the_identities_a_head_request_gives_for_an_object_a_folder_and_a_glob(
        tmp_path: Path, s3_bucket: str, proxy: CountingProxy) -> None:
    for spec, files in (("data/p03.jsonl", 1), ("data", OBJECTS), ("**/p1*.jsonl", 2)):
        proxy.taken()
        source = open_source(f"local:{s3_bucket}/{spec}", 0, base_dir=tmp_path)
        assert len(source.files) == files and source.identities is not None
        assert by_object(proxy.taken()) == {}  # listed, nothing asked of each object
        assert source.file_identities() == object_identities(source.files)
    for spec in ("data/*.jsonl", "data/p03.jsonl"):
        with pytest.raises(SourceError, match="no files found"):
            open_source(f"local:s3://no-such-bucket-here/{spec}", 0, base_dir=tmp_path)


def test_an_object_replaced_after_it_was_listed_is_never_read_as_the_listed_one(
        tmp_path: Path, s3_bucket: str, proxy: CountingProxy) -> None:
    source = open_source(f"local:{s3_bucket}/data/*.jsonl", 0, base_dir=tmp_path)
    put(f"{s3_bucket}/data/p00.jsonl", body(1000))  # the same size, another ETag
    with pytest.raises(RemoteChanged, match="replaced since it was listed"):
        next(source)


def test_a_build_whose_object_was_replaced_since_the_epochs_listing_is_retried_over_its_new_content(
        tmp_path: Path, s3_bucket: str, proxy: CountingProxy, runtime: Runtime,
        caplog: pytest.LogCaptureFixture) -> None:
    """The first attempt meets the listed identity no more (RemoteChanged: no shard of the new content is named by
    the old identity); the retry takes the identities anew and builds the store of what the bucket holds."""
    served = dataset(tmp_path, s3_bucket, runtime)
    put(f"{s3_bucket}/data/p05.jsonl", body(1000, 2 * RECORDS))
    with caplog.at_level(logging.WARNING):
        served.prepare(show_bar=False)
    assert any("replaced since it was listed" in r.getMessage() for r in caplog.records)
    assert served.store is not None and len(served.store) == (OBJECTS + 1) * RECORDS
    inputs = served.store.manifest.inputs
    assert inputs is not None
    assert [f.identity for f in inputs[0]] == object_identities(served.files[0])
