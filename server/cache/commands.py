"""`sigil-feed cache build|ls|rm`: build stores ahead of serving (an init container), list and remove them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .owner import discard, folder_bytes, reclaim, temp_folders
from .store import list_stores


def _cache_dirs(args: argparse.Namespace) -> list[Path]:
    from ..config import load_config
    from ..dataset import default_cache_dir

    if args.cache_dir:
        return [Path(args.cache_dir)]
    if not args.config:
        return [default_cache_dir()]
    config = load_config(args.config)
    dirs = {Path(d.dataset.cache_dir) if d.dataset.cache_dir else default_cache_dir() for d in config.datasets.values()}
    return sorted(dirs)


def _build(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..dataset import open_datasets

    for name, dataset in open_datasets(load_config(args.config)).items():
        if not dataset.cached:
            print(f"{name}: use_cache is false; nothing to build")
            continue
        dataset.prepare()
        state = dataset.cache_state()
        print(f"{name}: {state.path} ({state.samples} samples, {state.tokens} tokens)")
    return 0


def _temporaries(cache_dir: Path) -> list[dict[str, Any]]:
    """The temporary folders of builds under way (`building`) or left by builders that are gone (`stale`)."""
    return [{"path": str(t.path), "fingerprint": t.fingerprint, "state": "building" if t.alive else "stale",
             "owner": t.owner.label if t.owner else None, "heartbeat_age_s": round(t.heartbeat_age, 1),
             "bytes": folder_bytes(t.path), "detail": t.describe()} for t in temp_folders(cache_dir)]


def _ls(args: argparse.Namespace) -> int:
    entries: list[dict[str, Any]] = [e for d in _cache_dirs(args) if d.is_dir()
                                     for e in (*list_stores(d), *_temporaries(d))]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for e in entries:
        if e["state"] == "ready":
            print(f"{e['path']}  dataset={e['dataset']} samples={e['samples']} tokens={e['tokens']} "
                  f"bytes={e['bytes']}")
        else:
            detail = f"damaged: {e['reason']}" if e["state"] == "damaged" else e["detail"]
            print(f"{e['path']}  {detail} bytes={e['bytes']}")
    if not any(e["state"] == "ready" for e in entries):
        print("no token stores")
    if any(e["state"] == "stale" for e in entries):
        print("stale temporary folders are reclaimed by the next start or by `sigil-feed cache rm --all`")
    return 0


def _rm(args: argparse.Namespace) -> int:
    removed = 0
    for cache_dir in _cache_dirs(args):
        if not cache_dir.is_dir():
            continue
        for store in list_stores(cache_dir):
            if args.all or store["fingerprint"] in args.fingerprints:
                discard(Path(store["path"]))
                print(f"removed {store['path']}")
                removed += 1
        for fingerprint in [None] if args.all else args.fingerprints:
            for temp in reclaim(cache_dir, fingerprint):
                print(f"removed {temp.path} ({temp.describe()})")
                removed += 1
        for temp in temp_folders(cache_dir):
            if temp.alive and (args.all or temp.fingerprint in args.fingerprints):
                print(f"left {temp.path}: {temp.describe()}")
    return 0 if removed or not args.fingerprints else 1


def add_cache_commands(sub: Any) -> None:
    """Register `cache build|ls|rm` on the top-level subparsers."""
    cache = sub.add_parser("cache", help="build, list or remove token stores (cached mode)")
    verbs = cache.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser("build", help="build every cached dataset's store, then exit")
    build.add_argument("--config", required=True)
    build.set_defaults(func=_build)
    for verb, func in (("ls", _ls), ("rm", _rm)):
        parser = verbs.add_parser(verb, help=f"{verb} token stores")
        parser.add_argument("--config", help="list the cache folders this config uses")
        parser.add_argument("--cache-dir", help="a cache folder (default: SIGIL_FEED_CACHE or ~/.cache/sigil-feed)")
        parser.set_defaults(func=func)
    verbs.choices["ls"].add_argument("--json", action="store_true")
    verbs.choices["rm"].add_argument("fingerprints", nargs="*", help="stores to remove")
    verbs.choices["rm"].add_argument("--all", action="store_true",
                                     help="remove every store and stale temporary folder in the folder")
