"""The token store: plain files in a documented layout, written atomically, memory-mapped to serve.

A store is a folder `<cache_dir>/<fingerprint>/` holding:
- `tokens.bin`: every sample's token ids (EOS included), concatenated, little-endian `uint16` when the
  vocabulary fits, else `int32` (the dtype is in the manifest);
- `samples.parquet`: one row per sample, in mix order: `offset` (int64, index into tokens.bin),
  `length` (int32), `prompt_tokens` (int32, loss-masked prefix for completion_only), `source`,
  `file`, `row` (the stable sample id);
- `manifest.json`: format version, fingerprint, dtype, counts, per-file size and xxh3-64 checksum,
  per-source accounting, and the settings that made it.

The builder writes into `<cache_dir>/.<fingerprint>.tmp-<pid>` and renames it into place only when
every file is complete and checksummed, so a crash never leaves a folder that looks valid. Any
reader of plain files (numpy, pyarrow from local disk or an object store) can use a store.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
SAMPLES = "samples.parquet"
CHUNK = 8 << 20


class StoreDamaged(Exception):
    """A store on disk is incomplete or corrupt; the message says what is wrong."""


def checksum(path: Path) -> str:
    """xxh3-64 of a file, read in chunks."""
    digest = xxhash.xxh3_64()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class StoreWriter:
    """Appends encoded samples to a temporary folder; `commit` makes it a store atomically."""

    def __init__(self, cache_dir: Path, fingerprint: str, dtype: np.dtype) -> None:
        self.cache_dir, self.fingerprint, self.dtype = cache_dir, fingerprint, np.dtype(dtype)
        cache_dir.mkdir(parents=True, exist_ok=True)
        self.tmp = cache_dir / f".{fingerprint}.tmp-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        self.tokens = (self.tmp / TOKENS).open("wb")
        self.columns: dict[str, list[np.ndarray]] = {k: [] for k in ("length", "prompt_tokens", "source",
                                                                      "file", "row")}
        self.n_tokens = 0

    def append(self, ids: list[np.ndarray], prompt_tokens: list[int], source: list[int], file: list[int],
               row: list[int]) -> None:
        """Add a chunk of samples in mix order."""
        if not ids:
            return
        flat = np.concatenate(ids).astype(self.dtype.newbyteorder("<"), copy=False)
        self.tokens.write(flat.tobytes())
        self.n_tokens += len(flat)
        self.columns["length"].append(np.fromiter(map(len, ids), dtype=np.int32, count=len(ids)))
        for name, values in (("prompt_tokens", prompt_tokens), ("source", source), ("file", file),
                             ("row", row)):
            self.columns[name].append(np.asarray(values, dtype=np.int64 if name == "row" else np.int32))

    def commit(self, meta: dict[str, Any]) -> Path:
        """Write samples and manifest, checksum everything, and rename the folder into place."""
        self.tokens.close()
        columns = {k: np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for k, v in self.columns.items()}
        lengths = columns["length"].astype(np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
        table = pa.table({"offset": offsets, **columns})
        pq.write_table(table, self.tmp / SAMPLES)
        manifest = {
            "format": FORMAT_VERSION, "fingerprint": self.fingerprint, "dtype": self.dtype.str,
            "samples": len(lengths), "tokens": self.n_tokens, "created": time.time(),
            "files": {name: {"size": (self.tmp / name).stat().st_size, "xxh3": checksum(self.tmp / name)}
                      for name in (TOKENS, SAMPLES)},
            **meta,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        final = self.cache_dir / self.fingerprint
        shutil.rmtree(final, ignore_errors=True)
        os.rename(self.tmp, final)
        return final

    def abort(self) -> None:
        """Remove the temporary folder."""
        self.tokens.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@dataclass
class TokenStore:
    """A verified store, memory-mapped."""

    path: Path
    manifest: dict[str, Any]
    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    prompt_tokens: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def open_store(path: Path, fingerprint: str, *, verify: bool = True) -> TokenStore:
    """Open the store at path; StoreDamaged if it is missing a file, truncated, or fails its checksum."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise StoreDamaged(f"{path}: no readable {MANIFEST} ({err})") from None
    if manifest.get("format") != FORMAT_VERSION or manifest.get("fingerprint") != fingerprint:
        raise StoreDamaged(f"{path}: format or fingerprint does not match this configuration")
    for name, facts in manifest["files"].items():
        file = path / name
        if not file.exists() or file.stat().st_size != facts["size"]:
            raise StoreDamaged(f"{file}: missing or truncated (expected {facts['size']} bytes)")
        if verify and checksum(file) != facts["xxh3"]:
            raise StoreDamaged(f"{file}: checksum mismatch (corrupted)")
    table = pq.ParquetFile(path / SAMPLES).read(columns=["offset", "length", "prompt_tokens", "source"])
    dtype = np.dtype(manifest["dtype"])
    tokens = (np.memmap(path / TOKENS, dtype=dtype, mode="r") if manifest["tokens"]
              else np.zeros(0, dtype=dtype))
    return TokenStore(path, manifest, tokens, table["offset"].to_numpy(), table["length"].to_numpy(),
                      table["prompt_tokens"].to_numpy(), table["source"].to_numpy())


def list_stores(cache_dir: Path) -> list[dict[str, Any]]:
    """Every complete store under cache_dir, with its manifest's summary."""
    out = []
    for manifest in sorted(cache_dir.glob(f"*/{MANIFEST}")):
        try:
            facts = json.loads(manifest.read_text())
        except ValueError:
            continue
        size = sum(f.stat().st_size for f in manifest.parent.iterdir())
        out.append({"path": str(manifest.parent), "fingerprint": facts.get("fingerprint"),
                    "dataset": facts.get("dataset"), "samples": facts.get("samples"),
                    "tokens": facts.get("tokens"), "bytes": size, "created": facts.get("created")})
    return out
