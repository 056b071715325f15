"""A token store's manifest: the schema every store must meet, validated before a byte of it is served."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..tokenize import TokenFacts

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENS = "tokens.bin"
SAMPLES = "samples.parquet"
REQUIRED_FILES = (TOKENS, SAMPLES)
"""The files a store must list and verify: no more, no fewer."""

Count = Annotated[int, Field(ge=0)]


class StoreDamaged(Exception):
    """A store on disk is incomplete or corrupt; the message says what is wrong."""


class FileFacts(BaseModel):
    """One file of the store: its size and xxh3-64 checksum."""

    model_config = ConfigDict(strict=True, frozen=True)

    size: Count
    xxh3: str = Field(pattern=r"^[0-9a-f]{16}$")


class SourceSnapshot(BaseModel):
    """One source's accounting from the build's pass (see SourceCounters.snapshot)."""

    model_config = ConfigDict(strict=True, frozen=True)

    spec: str
    read: Count
    kept: Count
    dropped: dict[str, Count]
    malformed: dict[str, Count]
    tokens: Count
    lengths: list[Count]


class Manifest(BaseModel):
    """`manifest.json`: format, counts, every required file's facts, and the facts the server needs to serve."""

    model_config = ConfigDict(strict=True, frozen=True, extra="allow")

    format: Literal[1]
    fingerprint: str
    dtype: Literal["<u2", "<i4"]
    samples: Count
    tokens: Count
    created: float
    files: dict[str, FileFacts]
    dataset: str
    sources: list[SourceSnapshot]
    tokenizer_fingerprint: str
    tokenizer_backend: Literal["hf", "fastokens"] = "hf"  # which encoder built it (the ids are the same)
    token_facts: TokenFacts

    @field_validator("files")
    @classmethod
    def _every_required_file(cls, files: dict[str, FileFacts]) -> dict[str, FileFacts]:
        missing, extra = sorted(set(REQUIRED_FILES) - set(files)), sorted(set(files) - set(REQUIRED_FILES))
        if missing or extra:
            raise ValueError(f"must list exactly {', '.join(REQUIRED_FILES)} (missing {missing}, unexpected {extra})")
        return files


def read_manifest(path: Path, fingerprint: str | None = None) -> Manifest:
    """The store's validated manifest; StoreDamaged naming the first problems if it is unreadable or invalid."""
    file = path / MANIFEST
    try:
        text = file.read_text()
        data: Any = json.loads(text)
    except FileNotFoundError:
        raise StoreDamaged(f"{file}: missing") from None
    except (OSError, ValueError) as err:
        raise StoreDamaged(f"{file}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise StoreDamaged(f"{file}: not a JSON object")
    if data.get("format") != FORMAT_VERSION:
        raise StoreDamaged(f"{file}: format {data.get('format')!r}, this server reads format {FORMAT_VERSION}")
    try:
        manifest = Manifest.model_validate_json(text)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in err.errors()[:5])
        raise StoreDamaged(f"{file}: invalid ({problems})") from None
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise StoreDamaged(f"{file}: fingerprint {manifest.fingerprint} does not match this configuration's "
                           f"{fingerprint}")
    return manifest
