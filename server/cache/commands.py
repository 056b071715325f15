"""`sigil-feed cache build|ls|rm`: build stores ahead of serving (an init container), list and remove them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

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


def _ls(args: argparse.Namespace) -> int:
    stores: list[dict[str, Any]] = [s for d in _cache_dirs(args) for s in list_stores(d)]
    if args.json:
        print(json.dumps(stores, indent=2))
        return 0
    for s in stores:
        print(f"{s['path']}  dataset={s['dataset']} samples={s['samples']} tokens={s['tokens']} "
              f"bytes={s['bytes']}")
    if not stores:
        print("no token stores")
    return 0


def _rm(args: argparse.Namespace) -> int:
    removed = 0
    for store in (s for d in _cache_dirs(args) for s in list_stores(d)):
        if args.all or store["fingerprint"] in args.fingerprints:
            shutil.rmtree(store["path"])
            print(f"removed {store['path']}")
            removed += 1
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
    verbs.choices["rm"].add_argument("--all", action="store_true", help="remove every store in the folder")
