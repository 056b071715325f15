"""Which sources of two token stores are the same: a source's content key.

A source's key is its files' content identities (the manifest's `inputs`) and the (file, row) of each of its
samples in store order: two sources with the same key hold the same records, curated alike (a filter that kept
other records gives other rows), in the same order, so their samples correspond one to one (the tokenizer and
the sample settings are the same for every store a cursor resumes: they are in its fingerprint). An epoch whose
source list changed inside it (cached mode, segments.py) carries each source's progress by this key, whatever its
position or path.
"""

from __future__ import annotations

import json

import numpy as np
import xxhash

from ..errors import Refused
from ..store.reader import TokenStore


def source_keys(store: TokenStore) -> list[str]:
    """Each source's content key, in the store's source order; Refused for a store whose manifest predates the
    record of its inputs."""
    inputs = store.manifest.inputs
    if inputs is None:
        raise Refused(f"cursor: token store {store.location} predates the record of its files' content, so its "
                      "sources cannot be matched with another list's: resume from the epoch's end")
    keys = []
    for index, files in enumerate(inputs):
        picked = store.source == index
        digest = xxhash.xxh3_128()
        digest.update(json.dumps([f.identity for f in files], default=str).encode())
        digest.update(np.ascontiguousarray(store.file[picked], dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(store.row[picked], dtype=np.int64).tobytes())
        keys.append(digest.hexdigest())
    return keys


def specs_of(store: TokenStore) -> list[str]:
    """The store's sources as they were named when it was built."""
    return [source.spec for source in store.manifest.sources]
