"""What a remote source's identity costs: the objects of a glob in a bucket of a local moto_server, listed and
identified, and a cached dataset started over them (its membership taken, its token store built).

`python -m bench.remote_identities [--objects 2000] [--rounds 2] [--before REV]` runs it alone (no corpus needed:
small synthetic JSONL objects, the bundled tokenizer); `python -m bench` runs the first metric with the rest.
- `remote_identify_listing_vs_head`: seconds to list a glob of N objects and take each one's identity (size,
  ETag): `expand_remote`, ListObjectsV2 through boto3 (the ETags come in the listing, 1,000 objects a request),
  against pyarrow's listing and a HEAD request per object (`object_identities`: what every remote source did
  before, and what gs:// and S3 without boto3 still do); alternating, best of each.
- `remote_prepare_vs_before` (with `--before REV`): seconds of a cached dataset's start over the N objects in a
  fresh process (ServedDataset: the sources opened and their membership taken; then `prepare`: the token store
  built into an empty cache folder, one shard per object), this checkout against revision REV (its `server`,
  `client`, `protos` and `sigil_feed` exported with `git archive`, run the same way); alternating, best of each;
  with `--count`, `details.requests`: the S3 requests of one more start each, counted at a proxy (bench/s3.py
  CountingProxy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REPO, Metric
from bench.remote_sources import _record
from bench.s3 import CountingProxy, aws_environment, make_bucket, moto_server

OBJECTS = 2000
ROUNDS = 2
RECORDS = 4  # per object
TOKENIZER = REPO / "server" / "default" / "tokenizer"
EXPORTED = ("server", "client", "protos", "sigil_feed")
WITHOUT_EDITABLE = ("import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in "
                    "getattr(f, '__module__', '')]; runpy.run_module('bench.remote_identities', run_name='__main__', "
                    "alter_sys=True)")
"""Runs the worker over the package first on PYTHONPATH (an editable install's finder would find this checkout)."""


def _body(n: int) -> bytes:
    """RECORDS code records (as bench/remote_sources.py writes them: they pass the default filters)."""
    return b"".join(_record(n * RECORDS + i) for i in range(RECORDS))


def upload(endpoint: str, bucket: str, objects: int) -> str:
    """`objects` small JSONL objects under `data/` (16 PUTs at a time); returns the glob naming them."""
    from sigil_feed.server.store.fs import s3_client

    name = bucket.removeprefix("s3://")
    client = s3_client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: client.put_object(Bucket=name, Key=f"data/p{n:05d}.jsonl", Body=_body(n)),
                      range(objects)))
    return f"{bucket}/data/*.jsonl"


def identify_by_listing(glob: str) -> list[object]:
    """The identities as sources take them now: the listing's."""
    from sigil_feed.server.pipeline.sources.remote import expand_remote

    files, identities = expand_remote("bench", glob, (".jsonl",))
    assert identities is not None and len(identities) == len(files)
    return identities


def identify_by_head(glob: str) -> list[object]:
    """The identities as they were taken before: pyarrow's listing, then a HEAD request per object."""
    import pyarrow.fs as pafs

    from sigil_feed.server.pipeline.sources.remote import locate, object_identities

    fs, path = locate(glob)
    root = path.rsplit("/", 1)[0]
    files = sorted(f"s3://{i.path}" for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".jsonl"))
    return object_identities(files)


def _prepare_worker(spec: str, cache_dir: str) -> None:
    """In a fresh process: start a cached dataset over `spec` (membership, then its store built); print the
    seconds and the store's samples as JSON."""
    from sigil_feed.server.config import parse_config
    from sigil_feed.server.feed.served import ServedDataset
    from sigil_feed.server.runtime import Runtime

    raw = {"model_name": str(TOKENIZER), "max_seq_len": 64, "pack": False,
           "dataset": {"names": [spec], "use_cache": True, "cache_dir": cache_dir, "shuffle_seed": 1,
                       "remainder": "keep", "tokenizer_backend": "hf"}}
    config = parse_config(raw, "bench.yaml", Path(cache_dir)).datasets["default"]
    with Runtime() as runtime:
        started = time.perf_counter()
        served = ServedDataset(config, "bench.yaml", runtime=runtime)
        opened = time.perf_counter()
        served.prepare(show_bar=False)
        done = time.perf_counter()
    assert served.store is not None
    print(json.dumps({"open_s": opened - started, "prepare_s": done - started, "samples": len(served.store),
                      "code": str(Path(sys.modules[ServedDataset.__module__].__file__ or "").parents[1])}))


def export(revision: str, into: Path) -> Path:
    """The package of `revision` as an importable folder (`sigil_feed` with its server, client and protos)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, *EXPORTED], check=True,
                             capture_output=True).stdout
    tree = into / "tree"
    tree.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    package = into / "pkg" / "sigil_feed"
    package.mkdir(parents=True)
    (package / "__init__.py").write_bytes((tree / "sigil_feed" / "__init__.py").read_bytes())
    for name in ("server", "client", "protos"):
        (package / name).symlink_to(tree / name)
    return into / "pkg"


def start(spec: str, cache_dir: Path, package: Path | None) -> dict[str, Any]:
    """One cached start in a fresh process (this checkout, or the exported package of another revision)."""
    env = dict(os.environ)
    paths = [str(package)] if package is not None else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    run = ["-m", "bench.remote_identities"] if package is None else ["-c", WITHOUT_EDITABLE]
    out = subprocess.run([sys.executable, *run, "--prepare-worker", spec, str(cache_dir)], env=env,
                         cwd=cache_dir.parent, check=True, capture_output=True, text=True).stdout  # not REPO: its
    # sigil_feed folder would come first on the path
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _load() -> list[float]:
    return list(os.getloadavg())


def measure(objects: int = OBJECTS, rounds: int = ROUNDS, before: str | None = None, count: bool = False
            ) -> list[Metric]:
    """Upload the objects to a local moto_server; time their listing and identities both ways, and (with `before`)
    a cached start over them, this checkout against `before` (`count`: and one more start each, its requests
    counted)."""
    load = [_load()]
    with tempfile.TemporaryDirectory(prefix="bench-identities-") as scratch, moto_server() as endpoint, \
            aws_environment(endpoint):
        root = Path(scratch)
        glob = upload(endpoint, make_bucket(endpoint), objects)
        runs: dict[str, list[float]] = {"listing": [], "head": []}
        for _ in range(rounds):
            for side, identify in (("listing", identify_by_listing), ("head", identify_by_head)):
                t0 = time.perf_counter()
                found = identify(glob)
                runs[side].append(time.perf_counter() - t0)
                assert len(found) == objects
        assert identify_by_listing(glob) == identify_by_head(glob)  # the same identities either way
        load.append(_load())
        best = {side: min(v) for side, v in runs.items()}
        metrics = [Metric(
            "remote_identify_listing_vs_head", best["listing"], best["head"], "s", "",
            notes=(f"list a glob of {objects} objects in a bucket of a local moto_server and take each one's "
                   "identity (size, ETag): ListObjectsV2 through boto3 (the ETags in the listing) against pyarrow's "
                   f"listing and a HEAD request per object, 16 at a time; best of {rounds} alternating rounds"),
            details={"runs": runs, "load": load})]
        if before is not None:
            metrics.append(_prepare_metric(root, glob, objects, rounds, before, endpoint, load, count))
    return metrics


def _prepare_metric(root: Path, glob: str, objects: int, rounds: int, before: str, endpoint: str,
                    load: list[list[float]], count: bool) -> Metric:
    """Cached starts over the objects, this checkout against `before`, alternating; then (`count`) one more each,
    its S3 requests counted."""
    packages = {"now": None, "before": export(before, root / "before")}
    spec = f"local:{glob}"
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in packages}
    for r in range(rounds):
        for side, package in packages.items():
            runs[side].append(start(spec, root / f"cache-{side}-{r}", package))
        load.append(_load())
    samples = {run["samples"] for side in runs.values() for run in side}
    assert samples == {objects * RECORDS}, samples
    requests: dict[str, dict[str, int]] = {}
    for side, package in packages.items() if count else ():
        with CountingProxy(endpoint) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint
            try:
                start(spec, root / f"cache-{side}-counted", package)
            finally:
                os.environ["AWS_ENDPOINT_URL"] = endpoint
            kinds: Counter[str] = Counter()
            for (kind, _), n in proxy.taken().items():
                kinds[kind] += n
            requests[side] = dict(kinds)
    best = {side: min(run["prepare_s"] for run in side_runs) for side, side_runs in runs.items()}
    return Metric(
        "remote_prepare_vs_before", best["now"], best["before"], "s", "",
        notes=(f"a cached dataset's start over a glob of {objects} JSONL objects ({RECORDS} records each) in a bucket "
               "of a local moto_server, in a fresh process: ServedDataset (sources opened, membership taken), then "
               "prepare (the token store built into an empty cache folder, a shard per object); this checkout against "
               f"revision {before}; best of {rounds} alternating rounds; with --count, the requests of one more start "
               "each in details"),
        details={"runs": runs, "requests": requests, "load": load})


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote_identities", description=__doc__)
    parser.add_argument("--objects", type=int, default=OBJECTS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--before", help="a git revision to compare a cached start against (e.g. main)")
    parser.add_argument("--count", action="store_true", help="with --before: count the S3 requests of a start")
    parser.add_argument("--prepare-worker", nargs=2, metavar=("SPEC", "CACHE_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_worker:
        _prepare_worker(*args.prepare_worker)
        return 0
    for metric in measure(args.objects, args.rounds, args.before, args.count):
        out: dict[str, Any] = metric.to_json() | {"name": metric.name}
        print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
