"""`sigil-feed locality`: for V virtual ranks, which world sizes give each node (L consecutive ranks, as torchrun
numbers them) one contiguous run of regions, and the share of a store of S equal shards each node reads."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from ..cached.layout import node_regions, runs
from ..rows.deal import node_order


def node_shards(regions: np.ndarray, virtual: int, shards: int) -> int:
    """The shards of a store of `shards` equal shards that these regions (of `virtual` equal ones) touch."""
    first = regions * shards // virtual
    last = -(-(regions + 1) * shards // virtual) - 1
    return len(np.unique(np.concatenate([np.arange(a, b + 1) for a, b in zip(first, last, strict=True)])))


def locality_rows(virtual: int, worlds: list[int], local: int, shards: int) -> list[dict[str, Any]]:
    """Per world size: the deal's rule, and the worst node's runs of regions and shares (regions, and shards over
    the node's share of them, S / nodes)."""
    out = []
    for world in worlds:
        nodes = node_regions(virtual, world, local)
        touched = [node_shards(n, virtual, shards) for n in nodes]
        out.append({"world": world, "nodes": len(nodes),
                    "rule": "node-aware" if node_order(world, virtual) is not None else "plain",
                    "runs": max(runs(n) for n in nodes), "region_share": max(len(n) for n in nodes) / virtual,
                    "share": 1 / len(nodes), "shards_over_share": max(touched) * len(nodes) / shards})
    return out


def locality(args: argparse.Namespace) -> int:
    """Print, per world size, how contiguous and how large each node's share of the store is."""
    local = args.local
    worlds = args.world or [w for w in (local << k for k in range(12)) if w <= 4096 and args.virtual % w == 0]
    bad = [w for w in worlds if w % local]
    if bad:
        print(f"world sizes {bad} are not multiples of --local {local}")
        return 2
    print(f"virtual_ranks {args.virtual}, {local} ranks per node, a store of {args.shards} equal shards")
    print(f"{'world':>6} {'nodes':>6} {'rule':>11} {'runs/node':>10} {'regions/node':>13} {'share':>7} "
          f"{'shards/share':>13}")
    for row in locality_rows(args.virtual, worlds, local, args.shards):
        print(f"{row['world']:>6} {row['nodes']:>6} {row['rule']:>11} {row['runs']:>10} {row['region_share']:>13.4f} "
              f"{row['share']:>7.4f} {row['shards_over_share']:>13.2f}")
    return 0
