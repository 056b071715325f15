"""Build a token store: read and curate the mix once, tokenize chunks on all cores, write atomically."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..mixing import Mixer
from ..samples import Sample
from ..tokenize import EncodedBatch, Encoder
from ..wire import ids_dtype
from .store import StoreWriter

log = logging.getLogger(__name__)

BUILD_CHUNK = 512  # small enough that reading the next chunk overlaps encoding even on small corpora


@dataclass
class BuildProgress:
    """What GetStats shows while a store is being built."""

    state: str = "pending"  # pending, building, ready, failed
    samples: int = 0
    tokens: int = 0
    error: str = ""


def _chunks(mixer: Mixer) -> Iterator[list[Sample]]:
    chunk: list[Sample] = []
    for sample in mixer:
        chunk.append(sample)
        if len(chunk) == BUILD_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def build_store(mixer: Mixer, encoder: Encoder, *, cache_dir: Path, fingerprint: str, with_prompts: bool,
                meta: Callable[[], dict[str, Any]], progress: BuildProgress,
                on_encoded: Callable[[list[Sample], EncodedBatch], None], show_bar: bool = True) -> Path:
    """Tokenize every sample of the mix into a new store; the fast tokenizer's threads use every core.

    Reading and curating the next chunk (Python) overlaps with encoding the current one (Rust, no GIL).
    `meta` is called at the end for the manifest's extra facts (the finished accounting).
    """
    writer = StoreWriter(cache_dir, fingerprint, ids_dtype(encoder.vocab_size))
    progress.state = "building"
    bar = tqdm(desc="tokenizing", unit=" samples", disable=not show_bar)

    def write(samples: list[Sample], encoded: EncodedBatch) -> None:
        writer.append(np.split(encoded.ids, encoded.offsets[1:-1]), encoded.prompt_tokens.tolist(),
                      [s.source for s in samples], [s.file for s in samples], [s.row for s in samples])
        on_encoded(samples, encoded)
        progress.samples += len(samples)
        progress.tokens += len(encoded.ids)
        bar.update(len(samples))

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
            pending: tuple[list[Sample], Future[EncodedBatch]] | None = None
            for chunk in _chunks(mixer):
                future = pool.submit(encoder.encode, chunk, with_prompts)
                if pending is not None:
                    write(pending[0], pending[1].result())
                pending = (chunk, future)
            if pending is not None:
                write(pending[0], pending[1].result())
        path = writer.commit({**meta(), "tokenizer_fingerprint": encoder.fingerprint,
                              "tokenizer_backend": encoder.backend_name,
                              "token_facts": dataclasses.asdict(encoder.facts())})
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    progress.state = "ready"
    log.info("token store ready: %s (%d samples, %d tokens)", path, progress.samples, progress.tokens)
    return path
