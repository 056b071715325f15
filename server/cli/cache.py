"""`sigil-feed cache build|ls|rm`: build stores ahead of serving (an init container), list and remove them.
`cache build` elects one builder per store through the store's build lease, as servers do: started on many
machines at once, one builds and the others wait for it."""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..store.fs import StoreFS, resolve
from ..store.owner import discard, folder_bytes, reclaim, temp_folders
from ..store.reader import list_stores

if TYPE_CHECKING:
    from ..builders.local_engine import StoreBuilder
    from ..feed.served import ServedDataset


def _roots(args: argparse.Namespace) -> list[StoreFS]:
    """The store locations to look at: --cache-dir, or every dataset's in --config, or the default."""
    from ..config import load_config
    from ..paths import cache_home

    if args.cache_dir:
        locations = [args.cache_dir]
    elif not args.config:
        locations = [str(cache_home())]
    else:
        config = load_config(args.config)
        locations = sorted({d.dataset.cache_dir or str(cache_home()) for d in config.datasets.values()})
    return [resolve(location) for location in locations]


def build(args: argparse.Namespace) -> int:
    """Build every cached dataset's store of --config with --engine, then exit."""
    from ..builders import local_engine
    from ..config import load_config
    from ..errors import ConfigError
    from ..feed.served import open_datasets
    from ..runtime import Runtime

    if args.ray_address and args.engine != "ray":
        raise ConfigError("--ray-address needs --engine ray")
    with Runtime() as runtime:
        datasets = open_datasets(load_config(args.config), runtime)
        if args.engine == "local":
            _build_all(datasets, local_engine.build_store)
            return 0
        from ..builders import ray_engine

        with ray_engine.cluster(args.ray_address):
            _build_all(datasets, functools.partial(ray_engine.build_store, address=args.ray_address))
    return 0


def _build_all(datasets: dict[str, ServedDataset], build: StoreBuilder) -> None:
    """Build every cached dataset's store with `build` (an engine's build_store)."""
    for name, dataset in datasets.items():
        if not dataset.cached:
            print(f"{name}: use_cache is false; nothing to build")
            continue
        dataset.prepare(build=build, serve=False)
        progress = dataset.progress
        print(f"{name}: {dataset.store_path} ({progress.samples} samples, {progress.tokens} tokens)")


def _temporaries(root: StoreFS) -> list[dict[str, Any]]:
    """Temporary folders and files of local builds under way (`building`) or left by builders that are gone
    (`stale`): the root's, and those in each store's shard folder."""
    if not root.is_local:
        return []
    base = Path(root.root)
    folders = [base, *(p / "shards" for p in base.iterdir() if p.is_dir())] if base.is_dir() else []
    return [{"path": str(t.path), "fingerprint": t.fingerprint, "state": "building" if t.alive else "stale",
             "owner": t.owner.label if t.owner else None, "heartbeat_age_s": round(t.heartbeat_age, 1),
             "bytes": folder_bytes(t.path), "detail": t.describe()} for f in folders for t in temp_folders(f)]


def ls(args: argparse.Namespace) -> int:
    """Print the stores, and the temporary folders of builds, in the store locations (or JSON with --json)."""
    entries: list[dict[str, Any]] = [e for root in _roots(args) for e in (*list_stores(root), *_temporaries(root))]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        if e["state"] == "ready":
            print(f"{e['path']}  dataset={e['dataset']} samples={e['samples']} tokens={e['tokens']} "
                  f"shards={e['shards']} bytes={e['bytes']}")
        elif e["state"] in ("damaged", "outdated", "partial"):
            print(f"{e['path']}  {e['state']}: {e['reason']}")
        else:
            print(f"{e['path']}  {e['detail']} bytes={e['bytes']}")
    if not any(e["state"] == "ready" for e in entries):
        print("no token stores")
    if any(e["state"] == "stale" for e in entries):
        print("stale temporary files are reclaimed by the next start or by `sigil-feed cache rm --all`")
    return 0


def _remove(root: StoreFS, path: str) -> None:
    """Remove a store folder: locally renamed aside first (nobody sees it half-removed), remotely every object."""
    if root.is_local:
        discard(Path(path))
    else:
        root.fs.delete_dir(path)


def rm(args: argparse.Namespace) -> int:
    """Remove the named stores (or --all, with stale temporaries); 1 when a named one was not found."""
    removed = 0
    for root in _roots(args):
        for store in list_stores(root):
            if args.all or store["fingerprint"] in args.fingerprints:
                _remove(root, root.path(store["fingerprint"]))
                print(f"removed {store['path']}")
                removed += 1
        if not root.is_local or not Path(root.root).is_dir():
            continue
        for fingerprint in [None] if args.all else args.fingerprints:
            for temp in reclaim(Path(root.root), fingerprint):
                print(f"removed {temp.path} ({temp.describe()})")
                removed += 1
        for temp in temp_folders(Path(root.root)):
            if temp.alive and (args.all or temp.fingerprint in args.fingerprints):
                print(f"left {temp.path}: {temp.describe()}")
    return 0 if removed or not args.fingerprints else 1
