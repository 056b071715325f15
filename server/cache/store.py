"""The token store: plain files in a documented layout, written atomically, memory-mapped to serve.

A store is a folder `<cache_dir>/<fingerprint>/` holding:
- `tokens.bin`: every sample's token ids (EOS included), concatenated, little-endian `uint16` when the
  vocabulary fits, else `int32` (the dtype is in the manifest);
- `samples.parquet`: one row per sample, in mix order: `offset` (int64, index into tokens.bin),
  `length` (int32), `prompt_tokens` (int32, loss-masked prefix for completion_only), `source`,
  `file`, `row` (the stable sample id);
- `manifest.json`: format version, fingerprint, dtype, counts, per-file size and xxh3-64 checksum,
  per-source accounting, and the settings that made it.

The builder writes into a temporary folder unique to its host, process and build (see owner.py) and
renames it into place only when every file is complete and checksummed, so a crash never leaves a folder
that looks valid. A valid store in place is never replaced: the builder that finishes second keeps it and
discards its own. Any reader of plain files (numpy, pyarrow from local disk or an object store) can use a store.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from .manifest import FORMAT_VERSION, MANIFEST, REQUIRED_FILES, SAMPLES, TOKENS, Manifest, StoreDamaged, read_manifest
from .owner import OWNER, Heartbeat, discard, folder_bytes, new_owner, temp_name

log = logging.getLogger(__name__)

CHUNK = 8 << 20
SAMPLE_COLUMNS = ["offset", "length", "prompt_tokens", "source"]


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
        self.owner = new_owner()
        self.tmp = cache_dir / temp_name(fingerprint, self.owner)
        self.tmp.mkdir()
        try:
            self.heartbeat = Heartbeat(self.tmp, self.owner)
            self.tokens = (self.tmp / TOKENS).open("wb")
        except BaseException:
            discard(self.tmp)
            raise
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
        """Write samples and manifest, checksum everything, and rename the folder into place; returns the store.

        If another builder's valid store is already in place, it stays and ours is discarded."""
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
                      for name in REQUIRED_FILES},
            "built_by": self.owner.label,
            **meta,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return self._rename_into_place(self.cache_dir / self.fingerprint)

    def _rename_into_place(self, final: Path) -> Path:
        """Rename the temporary folder to `final` unless a valid store is there (renaming onto a folder that
        holds files fails, so two builders never replace each other's store); a damaged one is replaced."""
        while True:
            try:
                os.rename(self.tmp, final)
                self.heartbeat.stop()
                (final / OWNER).unlink()
                return final
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            try:
                verify_store(final, self.fingerprint)
            except StoreDamaged as damage:
                log.warning("replacing a damaged token store: %s", damage)
                discard(final)
                continue
            log.info("token store %s was finished first by another builder: keeping it, discarding ours", final)
            self.abort()
            return final

    def abort(self) -> None:
        """Stop the heartbeat and remove the temporary folder."""
        self.tokens.close()
        self.heartbeat.stop()
        discard(self.tmp)


@dataclass
class TokenStore:
    """A verified store, memory-mapped."""

    path: Path
    manifest: Manifest
    tokens: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    prompt_tokens: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.lengths)


def verify_store(path: Path, fingerprint: str, *, verify: bool = True) -> Manifest:
    """The store's manifest once every required file is present with its size (and checksum when verify);
    StoreDamaged with the reason otherwise."""
    manifest = read_manifest(path, fingerprint)
    for name, facts in manifest.files.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != facts.size:
            raise StoreDamaged(f"{file}: missing or truncated (expected {facts.size} bytes)")
        if verify and checksum(file) != facts.xxh3:
            raise StoreDamaged(f"{file}: checksum mismatch (corrupted)")
    itemsize = np.dtype(manifest.dtype).itemsize
    if manifest.files[TOKENS].size != manifest.tokens * itemsize:
        raise StoreDamaged(f"{path / TOKENS}: {manifest.files[TOKENS].size} bytes, but the manifest counts "
                           f"{manifest.tokens} tokens of {itemsize} bytes")
    return manifest


def open_store(path: Path, fingerprint: str, *, verify: bool = True) -> TokenStore:
    """Open the store at path; StoreDamaged if its manifest is invalid, or a file is missing, truncated,
    fails its checksum, or disagrees with the manifest's counts."""
    manifest = verify_store(path, fingerprint, verify=verify)
    try:
        table = pq.ParquetFile(path / SAMPLES).read(columns=SAMPLE_COLUMNS)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise StoreDamaged(f"{path / SAMPLES}: unreadable ({err})") from None
    if table.num_rows != manifest.samples:
        raise StoreDamaged(f"{path / SAMPLES}: {table.num_rows} rows, but the manifest counts {manifest.samples}")
    lengths = table["length"].to_numpy()
    if int(lengths.sum()) != manifest.tokens:
        raise StoreDamaged(f"{path / SAMPLES}: lengths sum to {int(lengths.sum())}, but the manifest counts "
                           f"{manifest.tokens} tokens")
    dtype = np.dtype(manifest.dtype)
    tokens = np.memmap(path / TOKENS, dtype=dtype, mode="r") if manifest.tokens else np.zeros(0, dtype=dtype)
    return TokenStore(path, manifest, tokens, table["offset"].to_numpy(), lengths,
                      table["prompt_tokens"].to_numpy(), table["source"].to_numpy())


def list_stores(cache_dir: Path) -> list[dict[str, Any]]:
    """Every store folder under cache_dir, with its manifest's summary (state `damaged` and the reason if the
    manifest is invalid; sizes and checksums are not read)."""
    out = []
    for manifest_file in sorted(cache_dir.glob(f"*/{MANIFEST}")):
        path = manifest_file.parent
        if path.name.startswith("."):
            continue  # a temporary folder (see owner.py), not a store
        entry: dict[str, Any] = {"path": str(path), "fingerprint": path.name, "state": "ready",
                                 "bytes": folder_bytes(path)}
        try:
            manifest = read_manifest(path)
            entry.update(dataset=manifest.dataset, samples=manifest.samples, tokens=manifest.tokens,
                         created=manifest.created, built_by=manifest.model_extra.get("built_by")
                         if manifest.model_extra else None)
        except StoreDamaged as err:
            entry.update(state="damaged", reason=str(err))
        out.append(entry)
    return out
