from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StreamRequest(_message.Message):
    __slots__ = ["open", "credit"]
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CREDIT_FIELD_NUMBER: _ClassVar[int]
    open: Open
    credit: Credit
    def __init__(self, open: _Optional[_Union[Open, _Mapping]] = ..., credit: _Optional[_Union[Credit, _Mapping]] = ...) -> None: ...

class Open(_message.Message):
    __slots__ = ["dataset", "rank", "world_size", "batch_size", "seq_len", "cursor", "credits", "client_id", "accept_parts", "run_id"]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACCEPT_PARTS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    rank: int
    world_size: int
    batch_size: int
    seq_len: int
    cursor: bytes
    credits: int
    client_id: str
    accept_parts: bool
    run_id: str
    def __init__(self, dataset: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., cursor: _Optional[bytes] = ..., credits: _Optional[int] = ..., client_id: _Optional[str] = ..., accept_parts: bool = ..., run_id: _Optional[str] = ...) -> None: ...

class Credit(_message.Message):
    __slots__ = ["credits", "timing"]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    credits: int
    timing: StepTiming
    def __init__(self, credits: _Optional[int] = ..., timing: _Optional[_Union[StepTiming, _Mapping]] = ...) -> None: ...

class StepTiming(_message.Message):
    __slots__ = ["steps", "wait_s", "step_s", "wait_counts"]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_COUNTS_FIELD_NUMBER: _ClassVar[int]
    steps: int
    wait_s: float
    step_s: float
    wait_counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, steps: _Optional[int] = ..., wait_s: _Optional[float] = ..., step_s: _Optional[float] = ..., wait_counts: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ["opened", "batch", "epoch_end", "part"]
    OPENED_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    EPOCH_END_FIELD_NUMBER: _ClassVar[int]
    PART_FIELD_NUMBER: _ClassVar[int]
    opened: Opened
    batch: Batch
    epoch_end: EpochEnd
    part: Part
    def __init__(self, opened: _Optional[_Union[Opened, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., epoch_end: _Optional[_Union[EpochEnd, _Mapping]] = ..., part: _Optional[_Union[Part, _Mapping]] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ["data", "last"]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    last: bool
    def __init__(self, data: _Optional[bytes] = ..., last: bool = ...) -> None: ...

class Opened(_message.Message):
    __slots__ = ["dataset", "seq_len"]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    dataset: DatasetInfo
    seq_len: int
    def __init__(self, dataset: _Optional[_Union[DatasetInfo, _Mapping]] = ..., seq_len: _Optional[int] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ["name", "tokenizer", "vocab_size", "eos_id", "pad_id", "max_seq_len", "pack", "completion_only", "mode", "fingerprint", "sources", "virtual_ranks"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_ONLY_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    name: str
    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    max_seq_len: int
    pack: bool
    completion_only: bool
    mode: str
    fingerprint: str
    sources: _containers.RepeatedScalarFieldContainer[str]
    virtual_ranks: int
    def __init__(self, name: _Optional[str] = ..., tokenizer: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_id: _Optional[int] = ..., pad_id: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., pack: bool = ..., completion_only: bool = ..., mode: _Optional[str] = ..., fingerprint: _Optional[str] = ..., sources: _Optional[_Iterable[str]] = ..., virtual_ranks: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ["name", "dtype", "shape", "data"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ["seq", "epoch", "tensors", "cursor", "tokens", "row"]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    seq: int
    epoch: int
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    cursor: bytes
    tokens: int
    row: int
    def __init__(self, seq: _Optional[int] = ..., epoch: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., cursor: _Optional[bytes] = ..., tokens: _Optional[int] = ..., row: _Optional[int] = ...) -> None: ...

class EpochEnd(_message.Message):
    __slots__ = ["epoch", "cursor", "row"]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    cursor: bytes
    row: int
    def __init__(self, epoch: _Optional[int] = ..., cursor: _Optional[bytes] = ..., row: _Optional[int] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ["dataset"]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    def __init__(self, dataset: _Optional[str] = ...) -> None: ...

class Stats(_message.Message):
    __slots__ = ["datasets", "uptime_s"]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetStats]
    uptime_s: float
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetStats, _Mapping]]] = ..., uptime_s: _Optional[float] = ...) -> None: ...

class DatasetStats(_message.Message):
    __slots__ = ["name", "info", "sources", "clients", "batches_served", "tokens_served", "tokens_per_s", "cache", "input_bound", "jobs", "streams_opened", "streams_closed", "shared_reads", "epoch_members", "mixture"]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_SERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_SERVED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    INPUT_BOUND_FIELD_NUMBER: _ClassVar[int]
    JOBS_FIELD_NUMBER: _ClassVar[int]
    STREAMS_OPENED_FIELD_NUMBER: _ClassVar[int]
    STREAMS_CLOSED_FIELD_NUMBER: _ClassVar[int]
    SHARED_READS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MIXTURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    info: DatasetInfo
    sources: _containers.RepeatedCompositeFieldContainer[SourceStats]
    clients: _containers.RepeatedCompositeFieldContainer[ClientStats]
    batches_served: int
    tokens_served: int
    tokens_per_s: float
    cache: CacheState
    input_bound: InputBound
    jobs: _containers.RepeatedCompositeFieldContainer[JobStats]
    streams_opened: int
    streams_closed: int
    shared_reads: SharedReads
    epoch_members: _containers.RepeatedCompositeFieldContainer[EpochMembers]
    mixture: MixtureStats
    def __init__(self, name: _Optional[str] = ..., info: _Optional[_Union[DatasetInfo, _Mapping]] = ..., sources: _Optional[_Iterable[_Union[SourceStats, _Mapping]]] = ..., clients: _Optional[_Iterable[_Union[ClientStats, _Mapping]]] = ..., batches_served: _Optional[int] = ..., tokens_served: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., cache: _Optional[_Union[CacheState, _Mapping]] = ..., input_bound: _Optional[_Union[InputBound, _Mapping]] = ..., jobs: _Optional[_Iterable[_Union[JobStats, _Mapping]]] = ..., streams_opened: _Optional[int] = ..., streams_closed: _Optional[int] = ..., shared_reads: _Optional[_Union[SharedReads, _Mapping]] = ..., epoch_members: _Optional[_Iterable[_Union[EpochMembers, _Mapping]]] = ..., mixture: _Optional[_Union[MixtureStats, _Mapping]] = ...) -> None: ...

class MixtureStats(_message.Message):
    __slots__ = ["epoch", "dataset_weights", "task_weights", "next_change_epoch", "accepted_changes", "change_rows"]
    class DatasetWeightsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TaskWeightsEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    DATASET_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    TASK_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_CHANGE_EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_CHANGES_FIELD_NUMBER: _ClassVar[int]
    CHANGE_ROWS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    dataset_weights: _containers.ScalarMap[str, float]
    task_weights: _containers.ScalarMap[str, float]
    next_change_epoch: int
    accepted_changes: _containers.RepeatedScalarFieldContainer[str]
    change_rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., dataset_weights: _Optional[_Mapping[str, float]] = ..., task_weights: _Optional[_Mapping[str, float]] = ..., next_change_epoch: _Optional[int] = ..., accepted_changes: _Optional[_Iterable[str]] = ..., change_rows: _Optional[_Iterable[int]] = ...) -> None: ...

class EpochMembers(_message.Message):
    __slots__ = ["epoch", "content", "files"]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    content: str
    files: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, epoch: _Optional[int] = ..., content: _Optional[str] = ..., files: _Optional[_Iterable[int]] = ...) -> None: ...

class SharedReads(_message.Message):
    __slots__ = ["blocks_read", "blocks_shared", "samples_read"]
    BLOCKS_READ_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SHARED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_READ_FIELD_NUMBER: _ClassVar[int]
    blocks_read: int
    blocks_shared: int
    samples_read: int
    def __init__(self, blocks_read: _Optional[int] = ..., blocks_shared: _Optional[int] = ..., samples_read: _Optional[int] = ...) -> None: ...

class InputBound(_message.Message):
    __slots__ = ["fraction_1m", "fraction_total", "steps_per_s", "steps", "wait_s", "step_s", "wait_histogram", "reported", "slowest_rank", "slowest_client"]
    FRACTION_1M_FIELD_NUMBER: _ClassVar[int]
    FRACTION_TOTAL_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    STEP_S_FIELD_NUMBER: _ClassVar[int]
    WAIT_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    SLOWEST_RANK_FIELD_NUMBER: _ClassVar[int]
    SLOWEST_CLIENT_FIELD_NUMBER: _ClassVar[int]
    fraction_1m: float
    fraction_total: float
    steps_per_s: float
    steps: int
    wait_s: float
    step_s: float
    wait_histogram: _containers.RepeatedCompositeFieldContainer[WaitBucket]
    reported: bool
    slowest_rank: int
    slowest_client: str
    def __init__(self, fraction_1m: _Optional[float] = ..., fraction_total: _Optional[float] = ..., steps_per_s: _Optional[float] = ..., steps: _Optional[int] = ..., wait_s: _Optional[float] = ..., step_s: _Optional[float] = ..., wait_histogram: _Optional[_Iterable[_Union[WaitBucket, _Mapping]]] = ..., reported: bool = ..., slowest_rank: _Optional[int] = ..., slowest_client: _Optional[str] = ...) -> None: ...

class WaitBucket(_message.Message):
    __slots__ = ["upper_s", "count"]
    UPPER_S_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    upper_s: float
    count: int
    def __init__(self, upper_s: _Optional[float] = ..., count: _Optional[int] = ...) -> None: ...

class JobStats(_message.Message):
    __slots__ = ["world_size", "ranks", "input_bound"]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_BOUND_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    input_bound: InputBound
    def __init__(self, world_size: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., input_bound: _Optional[_Union[InputBound, _Mapping]] = ...) -> None: ...

class CacheState(_message.Message):
    __slots__ = ["state", "samples", "tokens", "path", "error", "bytes", "shards", "bytes_fetched", "shard_cache", "working_set_bytes", "working_set"]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    SHARD_CACHE_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORKING_SET_FIELD_NUMBER: _ClassVar[int]
    state: str
    samples: int
    tokens: int
    path: str
    error: str
    bytes: int
    shards: int
    bytes_fetched: int
    shard_cache: ShardCacheStats
    working_set_bytes: int
    working_set: WorkingSet
    def __init__(self, state: _Optional[str] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., path: _Optional[str] = ..., error: _Optional[str] = ..., bytes: _Optional[int] = ..., shards: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., shard_cache: _Optional[_Union[ShardCacheStats, _Mapping]] = ..., working_set_bytes: _Optional[int] = ..., working_set: _Optional[_Union[WorkingSet, _Mapping]] = ...) -> None: ...

class WorkingSet(_message.Message):
    __slots__ = ["epoch", "world_size", "ranks", "virtual_ranks", "epoch_bytes", "shards", "fits"]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_RANKS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FITS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    world_size: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    virtual_ranks: int
    epoch_bytes: int
    shards: int
    fits: bool
    def __init__(self, epoch: _Optional[int] = ..., world_size: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., virtual_ranks: _Optional[int] = ..., epoch_bytes: _Optional[int] = ..., shards: _Optional[int] = ..., fits: bool = ...) -> None: ...

class ShardCacheStats(_message.Message):
    __slots__ = ["dir", "bytes", "max_bytes", "shards", "hits", "misses", "hit_rate", "fetches", "bytes_fetched", "evictions", "checksum_failures", "refetches", "thrashing"]
    DIR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    FETCHES_FIELD_NUMBER: _ClassVar[int]
    BYTES_FETCHED_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FAILURES_FIELD_NUMBER: _ClassVar[int]
    REFETCHES_FIELD_NUMBER: _ClassVar[int]
    THRASHING_FIELD_NUMBER: _ClassVar[int]
    dir: str
    bytes: int
    max_bytes: int
    shards: int
    hits: int
    misses: int
    hit_rate: float
    fetches: int
    bytes_fetched: int
    evictions: int
    checksum_failures: int
    refetches: int
    thrashing: bool
    def __init__(self, dir: _Optional[str] = ..., bytes: _Optional[int] = ..., max_bytes: _Optional[int] = ..., shards: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., hit_rate: _Optional[float] = ..., fetches: _Optional[int] = ..., bytes_fetched: _Optional[int] = ..., evictions: _Optional[int] = ..., checksum_failures: _Optional[int] = ..., refetches: _Optional[int] = ..., thrashing: bool = ...) -> None: ...

class SourceStats(_message.Message):
    __slots__ = ["spec", "read", "kept", "dropped", "malformed", "tokens", "lengths"]
    class DroppedEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class MalformedEntry(_message.Message):
        __slots__ = ["key", "value"]
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SPEC_FIELD_NUMBER: _ClassVar[int]
    READ_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    MALFORMED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    spec: str
    read: int
    kept: int
    dropped: _containers.ScalarMap[str, int]
    malformed: _containers.ScalarMap[str, int]
    tokens: int
    lengths: _containers.RepeatedCompositeFieldContainer[LengthBucket]
    def __init__(self, spec: _Optional[str] = ..., read: _Optional[int] = ..., kept: _Optional[int] = ..., dropped: _Optional[_Mapping[str, int]] = ..., malformed: _Optional[_Mapping[str, int]] = ..., tokens: _Optional[int] = ..., lengths: _Optional[_Iterable[_Union[LengthBucket, _Mapping]]] = ...) -> None: ...

class LengthBucket(_message.Message):
    __slots__ = ["upper", "count"]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    upper: int
    count: int
    def __init__(self, upper: _Optional[int] = ..., count: _Optional[int] = ...) -> None: ...

class ClientStats(_message.Message):
    __slots__ = ["peer", "client_id", "rank", "world_size", "epoch", "batches", "tokens", "credits", "connected_s", "lag_s", "tokens_per_s", "input_bound", "batches_per_s"]
    PEER_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_S_FIELD_NUMBER: _ClassVar[int]
    LAG_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    INPUT_BOUND_FIELD_NUMBER: _ClassVar[int]
    BATCHES_PER_S_FIELD_NUMBER: _ClassVar[int]
    peer: str
    client_id: str
    rank: int
    world_size: int
    epoch: int
    batches: int
    tokens: int
    credits: int
    connected_s: float
    lag_s: float
    tokens_per_s: float
    input_bound: InputBound
    batches_per_s: float
    def __init__(self, peer: _Optional[str] = ..., client_id: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., epoch: _Optional[int] = ..., batches: _Optional[int] = ..., tokens: _Optional[int] = ..., credits: _Optional[int] = ..., connected_s: _Optional[float] = ..., lag_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., input_bound: _Optional[_Union[InputBound, _Mapping]] = ..., batches_per_s: _Optional[float] = ...) -> None: ...

class ListDatasetsRequest(_message.Message):
    __slots__ = []
    def __init__(self) -> None: ...

class ListDatasetsResponse(_message.Message):
    __slots__ = ["datasets"]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ...) -> None: ...
