"""Configuration: the trainer's YAML file (`model_name`, `max_seq_len`, `pack`, `dataset:`) plus `server:`.

A file with a top-level `dataset:` section defines the dataset `default`. `server.datasets` adds more
named datasets; each entry holds `dataset:` keys (merged over the top-level section) and may override
`model_name`, `max_seq_len` and `pack`. Unknown keys under `server:` are errors; unknown `dataset:`
keys are logged and ignored, because the trainer may carry keys sigil-feed has no use for.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .pipeline.schedule import Weights, as_phases, check_phases

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ["ammarnasr/the-stack-rust-clean"]



class SourceSpec(BaseModel):
    """One entry of `dataset.names`: a spec string and optional per-source settings."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    filter: bool | None = None  # None: filter code files and text, pass pipeline pairs through


class DatasetSection(BaseModel):
    """The trainer's `dataset:` section, with the finetuner's defaults and rules, plus sigil-feed's keys."""

    model_config = ConfigDict(extra="allow")

    names: list[SourceSpec] = Field(default_factory=lambda: [SourceSpec(name=n) for n in DEFAULT_SOURCES])
    use_cache: bool = True
    cache_dir: str | None = None
    min_length: PositiveInt = 64
    max_length: PositiveInt = 200_000
    exclude_tests: bool = True
    exclude_examples: bool = False
    exclude_benches: bool = True
    prefer_idiomatic: bool = False
    prefer_documented: bool = False
    idiomatic_quality_ratio: PositiveFloat = 2.0
    shuffle_seed: int | None = None
    interleave_mode: Literal["sequential", "round_robin", "weighted"] = "sequential"
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = "first_exhausted"
    dataset_weights: Weights | None = None  # a mapping, or a schedule of phases (pipeline/schedule.py)
    task_weights: Weights | None = None
    # sigil-feed additions
    splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    legacy_filters: bool = False
    chat_template: bool = False
    completion_only: bool = False
    on_bad_record: Literal["skip", "fail"] = "skip"
    shuffle_block: PositiveInt = 4096
    shuffle_block_chars: PositiveInt = 16 << 20  # streaming: a block also ends at this much text
    epochs: int | None = Field(default=None, ge=1)  # None: forever
    remainder: Literal["pad", "drop", "keep"] = "pad"  # the end of an epoch; see README "Guarantees"
    virtual_ranks: PositiveInt | Literal["auto"] = "auto"  # cached: the epoch's readers; fixed for a run's life
    shuffle_window_shards: PositiveInt = 4  # cached: items are shuffled within windows of this many shards
    shard_records: PositiveInt = 16384  # cached: a source file's shards hold at most this many raw records
    tokenizer_backend: Literal["auto", "hf", "fastokens"] = "auto"  # who encodes; the ids are HF's either way
    shard_cache_dir: str | None = None  # a remote store's shards are cached here; None: <local cache dir>/shards
    shard_cache_gb: PositiveFloat = 20.0  # the shard cache's budget, in GB (10^9 bytes)

    @field_validator("names", mode="before")
    @classmethod
    def _names_as_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [{"name": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("task_weights")
    @classmethod
    def _task_weights_not_empty(cls, value: Weights | None) -> Weights | None:
        if value is not None and not value:
            raise ValueError("must not be empty when given (omit the key instead)")
        if isinstance(value, list) and any(not phase.weights for phase in value):
            raise ValueError("a phase's weights must not be empty (give a task 1.0 for one copy)")
        return value

    @field_validator("dataset_weights", "task_weights", mode="before")
    @classmethod
    def _schedule_parsed(cls, value: Any) -> Any:
        return as_phases(value)

    @field_validator("dataset_weights", "task_weights")
    @classmethod
    def _schedule_ordered(cls, value: Weights | None) -> Weights | None:
        return check_phases(value) if isinstance(value, list) else value

    @model_validator(mode="after")
    def _lengths_ordered(self) -> DatasetSection:
        if self.max_length < self.min_length:
            raise ValueError(f"max_length ({self.max_length}) must be >= min_length ({self.min_length})")
        if not self.names:
            raise ValueError("names must list at least one source")
        return self


class Limits(BaseModel):
    """Per-request limits the server enforces."""

    model_config = ConfigDict(extra="forbid")

    max_streams: PositiveInt = 64  # streams at once, counted from the first byte (before Open); more are
    # RESOURCE_EXHAUSTED
    max_streams_per_peer: PositiveInt = 32  # streams at once from one client address (IP, any port)
    open_timeout_s: PositiveFloat = 10.0  # a stream must send its Open within this long
    idle_timeout_s: PositiveFloat = 120.0  # a stream granting no credit for this long is ended (UNAVAILABLE:
    # the client resumes from its last cursor when it wants more)
    write_timeout_s: PositiveFloat = 30.0  # a stream whose write (a batch, or a Part of one) has not gone out
    # within this long is ended (UNAVAILABLE): its client does not read (HTTP/2 flow control holds the write back)
    evict_stalled_s: PositiveFloat = 5.0  # when the server (or a client address) is full, a new stream takes the
    # place of the stream stalled on a write the longest, if for this long
    max_credits: PositiveInt = 64  # batches one stream may have granted and not yet received
    max_batch_size: PositiveInt = 1024
    max_seq_len: PositiveInt = 32_768
    max_message_mb: PositiveInt = 256  # largest batch message sent
    max_world_size: PositiveInt = 65_536
    max_cursor_kb: PositiveInt = 16  # largest resume cursor accepted (real ones: ~200 bytes); bounds requests too


class NamedDataset(BaseModel):
    """An entry of `server.datasets`: overrides for one more dataset."""

    model_config = ConfigDict(extra="forbid")

    model_name: str | None = None
    max_seq_len: PositiveInt | None = None
    pack: bool | None = None
    dataset: dict[str, Any] = Field(default_factory=dict)


class Keepalive(BaseModel):
    """HTTP/2 pings that find clients which vanished without closing their connection."""

    model_config = ConfigDict(extra="forbid")

    time_s: PositiveFloat = 30.0  # ping a connection after this long without activity
    timeout_s: PositiveFloat = 10.0  # close it (ending its streams) when a ping stays unanswered this long


class TlsSection(BaseModel):
    """Transport security: PEM files, relative paths from the config file's folder."""

    model_config = ConfigDict(extra="forbid")

    cert_file: str = Field(min_length=1)  # the server's certificate chain
    key_file: str = Field(min_length=1)
    client_ca_file: str | None = None  # set: mutual TLS, clients must present a certificate signed by it


class AuthSection(BaseModel):
    """Bearer-token authentication; the token is read from a file or an environment variable."""

    model_config = ConfigDict(extra="forbid")

    token_file: str | None = None  # relative paths from the config file's folder
    token_env: str | None = None  # the name of the environment variable holding the token

    @model_validator(mode="before")
    @classmethod
    def _no_inline_token(cls, data: Any) -> Any:
        if isinstance(data, dict) and "token" in data:
            raise ValueError("the token itself never goes in the config file; set token_file (a path) "
                             "or token_env (the name of an environment variable)")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> AuthSection:
        if (self.token_file is None) == (self.token_env is None):
            raise ValueError("set exactly one of token_file and token_env")
        return self


class InputBoundWarning(BaseModel):
    """When to warn that a job waits for data: its data wait / step time above `threshold` for `window_s`."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(default=0.1, gt=0, le=1)  # fraction of step time spent waiting for data
    window_s: float = Field(default=60.0, gt=0, le=600)  # how long it must last (and the window it is measured over)


class ServerSection(BaseModel):
    """sigil-feed's own settings under `server:`; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    tokenizer: str | None = None
    datasets: dict[str, NamedDataset] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)
    grace_s: float = Field(default=10.0, ge=0)  # after SIGTERM, how long open streams may drain
    keepalive: Keepalive = Field(default_factory=Keepalive)
    tls: TlsSection | None = None  # None: plaintext (a sidecar on its pod's loopback)
    auth: AuthSection | None = None  # None: no token required
    metrics_port: int | None = Field(default=None, ge=0, le=65535)  # Prometheus /metrics; None: off, 0: a free port
    cursor_secret_env: str | None = None  # the environment variable holding the key that signs cursors
    input_bound: InputBoundWarning = Field(default_factory=InputBoundWarning)  # the input-bound warning


class DatasetConfig(BaseModel):
    """Everything one served dataset needs, resolved from the file."""

    name: str
    tokenizer: str
    max_seq_len: PositiveInt
    pack: bool
    dataset: DatasetSection
    base_dir: Path  # the config file's folder, a fallback for relative source paths


class FeedConfig(BaseModel):
    """The whole configuration: server settings and the datasets it serves."""

    server: ServerSection
    datasets: dict[str, DatasetConfig]
    file: str


def _format_loc(loc: tuple[Any, ...]) -> str:
    """The key path of an error, without pydantic's union branch names (`dict[str,constrained-float]`)."""
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and re.fullmatch(r"(dict|list)\[.*\]", p)))


def _raise_validation(err: ValidationError, prefix: str, file: str) -> None:
    first = err.errors()[0]
    key = ".".join(p for p in (prefix, _format_loc(first["loc"])) if p)
    fix = "remove the key" if first["type"] == "extra_forbidden" else "see the config reference in README.md"
    raise ConfigError(first["msg"], key=key or None, file=file, fix=fix) from None


def _validate(model: type[BaseModel], data: Any, prefix: str, file: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as err:
        _raise_validation(err, prefix, file)


def parse_config(raw: dict[str, Any], file: str, base_dir: Path) -> FeedConfig:
    """Validate a parsed YAML document into a FeedConfig, raising ConfigError on the first problem."""
    if not isinstance(raw, dict):
        raise ConfigError("the file must hold a YAML mapping", file=file)
    server = _validate(ServerSection, raw.get("server") or {}, "server", file)
    top_dataset = raw.get("dataset")
    if top_dataset is not None and not isinstance(top_dataset, dict):
        raise ConfigError("must be a mapping", key="dataset", file=file)
    if top_dataset is None and not server.datasets:
        raise ConfigError("no dataset defined", key="dataset", file=file,
                          fix="add a dataset: section with names: [...]")
    tokenizer = server.tokenizer or raw.get("model_name")
    max_seq_len = raw.get("max_seq_len", 2048)
    pack = raw.get("pack", True)
    entries: dict[str, tuple[NamedDataset, dict[str, Any]]] = {}
    if top_dataset is not None:
        entries["default"] = (NamedDataset(), top_dataset)
    for name, named in server.datasets.items():
        entries[name] = (named, {**(top_dataset or {}), **named.dataset})
    datasets = {}
    for name, (named, section) in entries.items():
        prefix = "dataset" if name == "default" and not named.dataset else f"server.datasets.{name}.dataset"
        parsed = _validate(DatasetSection, section, prefix, file)
        for extra in sorted(parsed.model_extra or {}):
            log.warning("%s: %s.%s is not a sigil-feed key; ignored", file, prefix, extra)
        model = named.model_name or tokenizer
        if not model:
            raise ConfigError("no tokenizer configured", key="model_name", file=file,
                              fix="set model_name (a local tokenizer directory or HF cache name)")
        datasets[name] = _validate(DatasetConfig, {
            "name": name, "tokenizer": model, "max_seq_len": named.max_seq_len or max_seq_len,
            "pack": pack if named.pack is None else named.pack, "dataset": parsed, "base_dir": base_dir,
        }, name, file)
    return FeedConfig(server=server, datasets=datasets, file=file)


def load_config(path: str | Path) -> FeedConfig:
    """Read and validate a YAML config file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError("config file not found", file=str(path), fix="pass an existing --config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}", file=str(path)) from None
    return parse_config(raw or {}, str(path), path.resolve().parent)
