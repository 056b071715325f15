"""Every source kind, schema option, split, filter mode and bad-record policy through one real server.

One server (started once for the module) serves several datasets built from the same small corpus:
a JSONL directory (plain, .gz and .zst), a Parquet glob, a Hugging Face dataset resolved by hub name
from an offline cache, and a file of pipeline pairs. Every record's fate is written down by hand in the
tables below (the data contract's rules applied by a person, not by sigil-feed's code), and the tests
compare what the real client receives, and what `sigil-feed stats --json` reports, against them.
A second server serves records that must never reach the tokenizer (lone surrogates, invalid UTF-8 in
Parquet, deep JSON, null text), in streaming and cached mode, skipping them or failing on them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from sigil_feed.client import FeedDataset
from sigil_feed.client.stream import FeedServerError
from tests.conftest import TOKENIZER_DIR, ServerProcess, running_servers, write_compressed, write_config

IGNORE = -100
HUB_OWNER, HUB_NAME = "acme", "rust-e2e"
HUB = f"{HUB_OWNER}/{HUB_NAME}"


def rust(tag: str, extra: str = "") -> str:
    """A distinct piece of Rust code of about 100 characters, free of anything a filter looks for."""
    return f"fn {tag}(values: &[u32]) -> u32 {{\n    let total: u32 = values.iter().sum();\n{extra}    total\n}}\n"


# --- the corpus, with each record's fate by hand: (value, reason by default, reason with legacy_filters) ---
# None means kept. The legacy column follows the contract's table of the finetuner's buggy patterns.

Fate = tuple[dict[str, Any], str | None, str | None]

CODE_A: list[Fate] = [  # code/a.jsonl.gz
    ({"content": rust("plain"), "path": "crate-1.0/src/lib.rs"}, None, None),
    ({"content": rust("colour", '    let c = "#fff";\n'), "path": "crate-1.0/src/colour.rs"}, None, "test_file"),
    ({"content": rust("relative_tests"), "path": "tests/it.rs"}, "test_file", None),
    ({"content": rust("nested_tests"), "path": "crate-1.0/tests/it.rs"}, "test_file", "test_file"),
]
CODE_B: list[Fate] = [  # code/b.jsonl.zst; a line of invalid UTF-8 is its third line
    ({"content": rust("cfg_test", "    #[cfg(test)]\n    mod tests {}\n"), "path": "crate-1.0/src/m.rs"},
     "test_file", None),
    ({"content": rust("nested_bench"), "path": "crate-1.0/benches/b.rs"}, "bench_file", "bench_file"),
    ({"content": rust("relative_bench"), "path": "benches/b.rs"}, "bench_file", None),
    ({"content": rust("nested_target"), "path": "crate-1.0/target/debug/x.rs"}, "vendor_path", "vendor_path"),
]
CODE_C: list[Fate] = [  # code/c.jsonl, with a truncated line and a record of no known schema
    ({"content": rust("relative_target"), "path": "target/x.rs"}, "vendor_path", None),
    ({"content": "fn short() {}", "path": "crate-1.0/src/short.rs"}, "too_short", "too_short"),
    ({"content": rust("example"), "path": "crate-1.0/examples/e.rs"}, None, None),
    ({"content": rust("lock"), "path": "crate-1.0/Cargo.lock"}, "vendor_path", "vendor_path"),
]
BAD_UTF8_LINE = 3  # 1-based line of code/b.jsonl.zst holding invalid UTF-8

PARQUET_0: list[Fate] = [  # pq/part-0.parquet: plain text records
    ({"text": rust("parquet_kept"), "path": "crate-1.0/src/p.rs"}, None, None),
    ({"text": rust("parquet_tests"), "path": "tests/p.rs"}, "test_file", None),
    ({"text": "short text"}, "too_short", "too_short"),
]
PARQUET_1_BAD_TYPE = 2  # pq/part-1.parquet: rows whose `text` column holds integers

HUB_ROWS: list[Fate] = [  # the-stack style rows, path in max_stars_repo_path; a null content is no schema
    ({"content": rust("hub_one"), "max_stars_repo_path": "crate-1.0/src/one.rs"}, None, None),
    ({"content": rust("hub_tests"), "max_stars_repo_path": "crate-1.0/tests/t.rs"}, "test_file", "test_file"),
    ({"content": None, "max_stars_repo_path": "crate-1.0/src/none.rs"}, "missing_fields", "missing_fields"),
    ({"content": rust("hub_two"), "max_stars_repo_path": "crate-1.0/src/two.rs"}, None, None),
]


def pair(tag: str, split: str | None, gen: str | None = None) -> dict[str, Any]:
    """A pipeline pair; split None leaves `_split` out."""
    value = {"prompt": f"pub fn {tag}(x: u32) -> Option<u32> {{", "gen": gen or f"    x.checked_add(1) // {tag}\n}}\n",
             "_source": "synthetic", "_task_type": "completion"}
    if split is not None:
        value["_split"] = split
    return value


# pairs.jsonl: (value, reason in the default dataset, reason in the val dataset, reason with filter: true)
PAIRS: list[tuple[dict[str, Any] | str, str | None, str | None, str | None]] = [
    (pair("train_one", "train"), None, "other_split", None),
    (pair("val_one", "val"), "other_split", None, "other_split"),
    (pair("test_one", "test"), "other_split", "other_split", "other_split"),
    (pair("no_split", None), None, "other_split", None),
    ({"prompt": "fn a() {", "gen": "}", "_split": "train"}, None, "other_split", "too_short"),
    (pair("cfg_test", "train", "    #[cfg(test)]\n    mod tests {}\n}\n"), None, "other_split", "test_file"),
    ({"prompt": 3, "gen": "x", "_split": "val"}, "bad_type", "bad_type", "bad_type"),
    ('{"prompt": "truncated', "bad_json", "bad_json", "bad_json"),
    (pair("val_two", "val"), "other_split", None, "other_split"),
]

CHAT_PAIRS = [pair(f"chat_{i}", "train", f"    x.checked_add({i}).map(|v| v * {i + 1})\n}}\n") for i in range(3)]


# --- writing the corpus -------------------------------------------------------------------------


def write_lines(path: Path, lines: list[bytes]) -> Path:
    """Write byte lines, compressed by suffix (.gz or .zst)."""
    return write_compressed(path, b"".join(line + b"\n" for line in lines))


def dumps(value: dict[str, Any] | str) -> bytes:
    """A JSONL line: a value as JSON, or a raw string as it is."""
    return (value if isinstance(value, str) else json.dumps(value)).encode()


def make_hub_cache(cache: Path, rows: list[dict[str, Any]], scratch: Path) -> None:
    """Lay out a Hub dataset in a `datasets` cache as a download would have left it (no network)."""
    import datasets
    import huggingface_hub

    source = scratch / "hub-src.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        datasets.load_dataset("parquet", data_files=str(source), split="train", cache_dir=str(scratch / "build"))
    built = next((scratch / "build" / "parquet").glob("*/0.0.0/*/parquet-train.arrow")).parent
    target = cache / f"{HUB_OWNER}___{HUB_NAME}" / "default" / "0.0.0" / built.name
    shutil.copytree(built, target)
    (target / "parquet-train.arrow").rename(target / f"{HUB_NAME}-train.arrow")


@dataclass
class Corpus:
    """Where the corpus lives, and each dataset's source specs."""

    root: Path
    code: str = field(init=False)
    parquet: str = field(init=False)
    pairs: str = field(init=False)
    chat: str = field(init=False)

    def __post_init__(self) -> None:
        self.code = f"local:{self.root / 'code'}"
        self.parquet = f"parquet:{self.root / 'pq'}/*.parquet"
        self.pairs = f"local:{self.root / 'pairs.jsonl'}"
        self.chat = f"local:{self.root / 'chat.jsonl'}"

    def write(self) -> None:
        """Write every file of the corpus and the offline Hub cache."""
        code = self.root / "code"
        write_lines(code / "a.jsonl.gz", [dumps(v) for v, _, _ in CODE_A])
        b_lines = [dumps(v) for v, _, _ in CODE_B]
        b_lines.insert(BAD_UTF8_LINE - 1, b'{"content": "caf\xe9", "path": "src/x.rs"}')
        write_lines(code / "b.jsonl.zst", b_lines)
        c_lines = [dumps(v) for v, _, _ in CODE_C]
        c_lines[1:1] = [b'{"content": "fn trunc', b'{"title": "no schema here"}']
        write_lines(code / "c.jsonl", c_lines)
        (code / "notes.txt").write_text("not a source file\n")
        (self.root / "pq").mkdir()
        pq.write_table(pa.Table.from_pylist([v for v, _, _ in PARQUET_0]), self.root / "pq" / "part-0.parquet")
        pq.write_table(pa.table({"text": list(range(PARQUET_1_BAD_TYPE))}), self.root / "pq" / "part-1.parquet")
        write_lines(self.root / "pairs.jsonl", [dumps(v) for v, _, _, _ in PAIRS])
        write_lines(self.root / "chat.jsonl", [dumps(v) for v in CHAT_PAIRS])
        make_hub_cache(self.root / "hf-cache", [v for v, _, _ in HUB_ROWS], self.root)

    def config(self) -> Path:
        """The server's config: the four-source `default` dataset and one more dataset per feature."""
        datasets = {
            "val": {"names": [self.pairs], "splits": ["val"]},
            "chat": {"names": [self.chat], "chat_template": True, "completion_only": True},
            "completion": {"names": [self.chat], "completion_only": True},
            "override": {"names": [{"name": self.pairs, "filter": True}, {"name": self.code, "filter": False}]},
            "legacy": {"names": [self.code, self.parquet], "legacy_filters": True},
            "strict": {"names": [self.code], "on_bad_record": "fail"},
        }
        return write_config(self.root / "trainer.yaml",
                            {"names": [self.code, self.parquet, HUB, self.pairs], "use_cache": False,
                             "epochs": 1, "remainder": "keep"},
                            max_seq_len=256, pack=False,
                            server={"datasets": {name: {"dataset": d} for name, d in datasets.items()}})


# --- the expected outcomes ---------------------------------------------------------------------


def text_of(value: dict[str, Any]) -> str:
    """The training text of a record, by the contract's schema table (pairs in the default format)."""
    if "prompt" in value:
        return value["prompt"] + "\n\n" + value["gen"]
    return value.get("text") or value["content"]


def kept(fates: list[Fate], legacy: bool = False) -> list[str]:
    """Texts of the kept records, in order."""
    return [text_of(v) for v, default, old in fates if (old if legacy else default) is None]


def outcome(reasons: list[str | None]) -> dict[str, Any]:
    """A source's expected stats from the fate of each record it reads."""
    malformed = {"bad_json", "bad_utf8", "too_deep", "bad_type", "missing_fields", "bad_file"}
    counts = Counter(r for r in reasons if r is not None)
    return {"read": len(reasons), "kept": reasons.count(None),
            "dropped": {r: n for r, n in counts.items() if r not in malformed},
            "malformed": {r: n for r, n in counts.items() if r in malformed}}


def code_reasons(legacy: bool = False, filtered: bool = True) -> list[str | None]:
    """The fate of every record of the code directory, bad lines included, in reading order."""
    def reasons(fates: list[Fate]) -> list[str | None]:
        return [(old if legacy else default) if filtered else None for _, default, old in fates]

    b = reasons(CODE_B)
    b.insert(BAD_UTF8_LINE - 1, "bad_utf8")
    c = reasons(CODE_C)
    c[1:1] = ["bad_json", "missing_fields"]
    return reasons(CODE_A) + b + c


# --- the server and the client ----------------------------------------------------------------


@dataclass
class Row:
    """One padded row as the trainer receives it: real tokens and their labels."""

    ids: list[int]
    labels: list[int]


def rows_of(batch: dict[str, Any]) -> list[Row]:
    """The rows of an unpacked batch, each checked to be masked and ignored past its real tokens."""
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    rows = []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        real = mask.bool()
        assert (labels[~real] == IGNORE).all()
        rows.append(Row(ids[real].tolist(), labels[real].tolist()))
    return rows


class ServedData:
    """A server and, per dataset, every row of its single epoch (read once, then remembered)."""

    def __init__(self, server: ServerProcess) -> None:
        self.server, self.target = server, server.target
        self._rows: dict[str, list[Row]] = {}

    def rows(self, dataset: str) -> list[Row]:
        """Every row of the dataset's epoch, read through the real client."""
        if dataset not in self._rows:
            batches = FeedDataset(self.target, dataset, batch_size=4, reconnect_deadline_s=10)
            self._rows[dataset] = [row for batch in batches for row in rows_of(batch)]
        return self._rows[dataset]

    def stats(self) -> dict[str, list[dict[str, Any]]]:
        """`sigil-feed stats --json`, as dataset name -> its sources with integer counts."""
        out = subprocess.run([sys.executable, "-m", "sigil_feed.server.cli", "stats", "--target", self.target,
                              "--json"], capture_output=True, text=True, timeout=60, check=True)
        result = {}
        for ds in json.loads(out.stdout)["datasets"]:
            result[ds["name"]] = [{"spec": s["spec"], "read": int(s["read"]), "kept": int(s["kept"]),
                                   "dropped": {k: int(v) for k, v in s["dropped"].items()},
                                   "malformed": {k: int(v) for k, v in s["malformed"].items()}}
                                  for s in ds["sources"]]
        return result


class Served(ServedData):
    """The module's server over the corpus."""

    def __init__(self, server: ServerProcess, corpus: Corpus) -> None:
        super().__init__(server)
        self.corpus = corpus


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The bundled tokenizer, as the server loads it."""
    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the module, with the Hub cache and offline mode in its environment."""
    corpus = Corpus(tmp_path_factory.mktemp("sources-e2e"))
    corpus.write()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_DATASETS_CACHE", str(corpus.root / "hf-cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        server = ServerProcess(corpus.config())
    try:
        yield Served(server, corpus)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def texts(rows: list[Row], tokenizer: Any) -> list[str]:
    """The rows decoded, each checked to end with EOS, which is then removed."""
    out = []
    for row in rows:
        assert row.ids[-1] == tokenizer.eos_token_id
        out.append(tokenizer.decode(row.ids[:-1]))
    return out


# --- the tests ---------------------------------------------------------------------------------


def test_all_three_source_kinds_serve_every_kept_sample(served: Served, tokenizer: Any) -> None:
    pairs = [text_of(v) for v, reason, _, _ in PAIRS if reason is None and isinstance(v, dict)]
    expected = kept(CODE_A) + kept(CODE_B) + kept(CODE_C) + kept(PARQUET_0) + kept(HUB_ROWS) + pairs
    assert texts(served.rows("default"), tokenizer) == expected
    assert any("example" in t for t in expected) and any("hub_two" in t for t in expected)  # the tables bite


def test_chat_template_formats_pairs_with_the_tokenizers_template(served: Served, tokenizer: Any) -> None:
    got = texts(served.rows("chat"), tokenizer)
    for value, text in zip(CHAT_PAIRS, got, strict=True):
        turns = [{"role": "user", "content": value["prompt"]}, {"role": "assistant", "content": value["gen"]}]
        assert text == tokenizer.apply_chat_template(turns, tokenize=False)
        assert text == f"<|user|>\n{value['prompt']}\n<|assistant|>\n{value['gen']}\n"
    assert len(got) == len(CHAT_PAIRS)


@pytest.mark.parametrize("dataset", ["completion", "chat"])
def test_completion_only_masks_exactly_the_prompt_tokens(served: Served, tokenizer: Any, dataset: str) -> None:
    rows = served.rows(dataset)
    assert len(rows) == len(CHAT_PAIRS)
    for value, row in zip(CHAT_PAIRS, rows, strict=True):
        if dataset == "chat":
            head = tokenizer.apply_chat_template([{"role": "user", "content": value["prompt"]}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            head = value["prompt"] + "\n\n"
        prompt_ids = tokenizer(head, add_special_tokens=False).input_ids
        assert row.ids[:len(prompt_ids)] == prompt_ids  # the prompt part tokenizes the same on its own
        masked = [label == IGNORE for label in row.labels]
        assert masked == [True] * len(prompt_ids) + [False] * (len(row.ids) - len(prompt_ids))
        assert row.labels[len(prompt_ids):] == row.ids[len(prompt_ids):]  # gen and EOS are trained on
        assert tokenizer.decode(row.ids[len(prompt_ids):-1]) == value["gen"] + ("\n" if dataset == "chat" else "")


def test_split_selection_serves_val_alone_and_train_with_unsplit_records(served: Served, tokenizer: Any) -> None:
    val = [text_of(v) for v, _, reason, _ in PAIRS if reason is None and isinstance(v, dict)]
    assert texts(served.rows("val"), tokenizer) == val
    assert len(val) == 2 and all("val_" in t for t in val)
    default = texts(served.rows("default"), tokenizer)
    every_pair = {text_of(v) for v, _, _, _ in PAIRS if isinstance(v, dict) and isinstance(v["prompt"], str)}
    served_pairs = [t for t in default if t in every_pair]
    assert [t.split("(")[0] for t in served_pairs] == ["pub fn train_one", "pub fn no_split", "fn a",
                                                       "pub fn cfg_test"]


def test_per_source_filter_override(served: Served, tokenizer: Any) -> None:
    pairs = [text_of(v) for v, _, _, reason in PAIRS if reason is None and isinstance(v, dict)]
    code = [text_of(v) for v, _, _ in CODE_A + CODE_B + CODE_C]  # filter: false keeps every well-formed record
    assert texts(served.rows("override"), tokenizer) == pairs + code
    stats = served.stats()["override"]
    assert stats[0] == {"spec": served.corpus.pairs, **outcome([r for _, _, _, r in PAIRS])}
    assert stats[1] == {"spec": served.corpus.code, **outcome(code_reasons(filtered=False))}


def test_legacy_filters_reproduce_the_finetuners_decisions(served: Served, tokenizer: Any) -> None:
    default = kept(CODE_A) + kept(CODE_B) + kept(CODE_C) + kept(PARQUET_0)
    legacy = (kept(CODE_A, legacy=True) + kept(CODE_B, legacy=True) + kept(CODE_C, legacy=True)
              + kept(PARQUET_0, legacy=True))
    got = texts(served.rows("legacy"), tokenizer)
    assert got == legacy and len(legacy) > len(default)
    assert any('"#fff"' in t for t in default) and not any('"#fff"' in t for t in got)
    assert any("relative_tests" in t for t in got) and not any("relative_tests" in t for t in default)
    assert any("#[cfg(test)]" in t for t in got) and not any("#[cfg(test)]" in t for t in default)
    stats = served.stats()["legacy"]
    assert stats[0] == {"spec": served.corpus.code, **outcome(code_reasons(legacy=True))}


def test_bad_records_fail_the_stream_in_fail_mode_and_are_counted_in_skip_mode(served: Served) -> None:
    bad_file = served.corpus.root / "code" / "b.jsonl.zst"
    with pytest.raises(FeedServerError) as info:
        served.rows("strict")
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert f"{bad_file}:{BAD_UTF8_LINE}" in info.value.details and "bad_utf8" in info.value.details
    served.rows("default")
    stats = served.stats()
    sources = stats["default"]
    assert [s["malformed"] for s in sources] == [
        {"bad_utf8": 1, "bad_json": 1, "missing_fields": 1},
        {"bad_type": PARQUET_1_BAD_TYPE},
        {"missing_fields": 1},
        {"bad_type": 1, "bad_json": 1},
    ]
    assert any(f"{bad_file}:{BAD_UTF8_LINE}: skipped bad record (bad_utf8)" in line for line in served.server.output)
    assert served.rows("val")  # the server serves on after a failed stream


def test_stats_json_accounts_for_every_record_of_every_source(served: Served) -> None:
    for dataset in ("default", "val", "chat", "completion", "override", "legacy"):
        served.rows(dataset)
    with pytest.raises(FeedServerError):
        served.rows("strict")
    stats = served.stats()
    assert set(stats) == {"default", "val", "chat", "completion", "override", "legacy", "strict"}
    for name, sources in stats.items():
        for s in sources:
            assert s["read"] == s["kept"] + sum(s["dropped"].values()) + sum(s["malformed"].values()), (name, s)
    corpus = served.corpus
    parquet = [r for _, r, _ in PARQUET_0] + ["bad_type"] * PARQUET_1_BAD_TYPE
    assert stats["default"] == [
        {"spec": corpus.code, **outcome(code_reasons())},
        {"spec": corpus.parquet, **outcome(parquet)},
        {"spec": HUB, **outcome([r for _, r, _ in HUB_ROWS])},
        {"spec": corpus.pairs, **outcome([r for _, r, _, _ in PAIRS])},
    ]
    assert stats["val"] == [{"spec": corpus.pairs, **outcome([r for _, _, r, _ in PAIRS])}]
    first_bad = len(CODE_A) + BAD_UTF8_LINE  # the strict stream read up to the bad line and stopped there
    assert stats["strict"] == [{"spec": corpus.code, **outcome(code_reasons()[:first_bad])}]
    assert sum(s["kept"] for s in stats["default"]) == len(served.rows("default"))


# --- records that must never reach the tokenizer, in both modes ------------------------------------
# A lone surrogate (JSON's escaped "\\ud800") or invalid UTF-8 in Parquet has no UTF-8 encoding, so the
# tokenizer raised on the whole batch: the store build failed, or the stream ended INTERNAL at every resume.

LONE = '"bad \\ud800 text"'  # as it appears in a JSON line
DEEP = b'{"a": ' * 10_000 + b"1" + b"}" * 10_000
TEXT_LINES = [dumps({"text": rust("kept_0")}), dumps({"text": rust("kept_1")}), f'{{"text": {LONE}}}'.encode(),
              dumps({"text": rust("kept_3")}), DEEP, b'{"text": null}', dumps({"text": rust("kept_6")})]
TEXT_KEPT = [rust("kept_0"), rust("kept_1"), rust("kept_3"), rust("kept_6")]
TEXT_MALFORMED = {"bad_utf8": 1, "too_deep": 1, "missing_fields": 1}
LONE_LINE = 3  # 1-based line of text.jsonl.zst holding the lone surrogate
PARQUET_TEXTS = [rust("parquet_0").encode(), rust("parquet_\xff").encode("latin-1"), rust("parquet_2").encode()]
PAIR_LINES = [dumps(CHAT_PAIRS[0]), f'{{"prompt": "fn f() {{", "gen": {LONE}}}'.encode(), dumps(CHAT_PAIRS[1])]


def invalid_utf8_parquet(path: Path, values: list[bytes]) -> None:
    """A Parquet file whose `text` column holds these bytes unchecked (Arrow does not validate on write)."""
    offsets = pa.array([sum(map(len, values[:i])) for i in range(len(values) + 1)], pa.int32()).buffers()[1]
    pq.write_table(pa.table({"text": pa.Array.from_buffers(pa.string(), len(values),
                                                           [None, offsets, pa.py_buffer(b"".join(values))])}), path)


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedData]:
    """A server over files holding such records: streaming and cached datasets, skip and fail."""
    root = tmp_path_factory.mktemp("bad-records")
    write_lines(root / "text.jsonl.zst", TEXT_LINES)
    invalid_utf8_parquet(root / "part.parquet", PARQUET_TEXTS)
    write_lines(root / "pairs.jsonl", PAIR_LINES)
    names = [f"local:{root / 'text.jsonl.zst'}", f"parquet:{root / 'part.parquet'}", f"local:{root / 'pairs.jsonl'}"]
    strict = {"names": names[:1], "on_bad_record": "fail"}
    datasets = {"cached": {"use_cache": True}, "chat": {"names": names[2:], "chat_template": True},
                "strict": strict, "strict_cached": {**strict, "use_cache": True}}
    config = write_config(root / "trainer.yaml", {"names": names, "use_cache": False, "epochs": 1, "remainder": "keep",
                                                  "cache_dir": str(root / "cache")},
                          max_seq_len=256, pack=False,
                          server={"datasets": {name: {"dataset": d} for name, d in datasets.items()}})
    with running_servers() as start:
        yield ServedData(start(config))


@pytest.mark.parametrize("dataset", ["default", "cached"])
def test_unencodable_records_are_skipped_counted_and_logged(bad: ServedData, tokenizer: Any, dataset: str) -> None:
    pairs = [text_of(CHAT_PAIRS[0]), text_of(CHAT_PAIRS[1])]
    parquet = [t.decode() for t in PARQUET_TEXTS[::2]]
    assert sorted(texts(bad.rows(dataset), tokenizer)) == sorted(TEXT_KEPT + parquet + pairs)
    assert [(s["kept"], s["malformed"]) for s in bad.stats()[dataset]] == [
        (4, TEXT_MALFORMED), (2, {"bad_utf8": 1}), (2, {"bad_utf8": 1})]
    log = "".join(bad.server.output)
    assert f"text.jsonl.zst:{LONE_LINE}: skipped bad record (bad_utf8)" in log
    assert "part.parquet row-group 0 row 1: skipped bad record (bad_utf8)" in log
    assert "pairs.jsonl:2: skipped bad record (bad_utf8)" in log


def test_chat_template_never_sees_an_unencodable_pair(bad: ServedData, tokenizer: Any) -> None:
    assert len(bad.rows("chat")) == 2
    assert bad.stats()["chat"][0]["malformed"] == {"bad_utf8": 1}


@pytest.mark.parametrize("dataset", ["strict", "strict_cached"])
def test_fail_mode_ends_the_stream_with_data_loss_naming_file_and_line(bad: ServedData, dataset: str) -> None:
    with pytest.raises(FeedServerError) as info:
        bad.rows(dataset)
    assert info.value.code == grpc.StatusCode.DATA_LOSS
    assert f"text.jsonl.zst:{LONE_LINE}: bad record (bad_utf8)" in info.value.details


def test_streaming_cursor_resumes_past_the_record(bad: ServedData, tokenizer: Any) -> None:
    whole = texts(bad.rows("default"), tokenizer)
    for cut in range(len(TEXT_KEPT) + 1):  # cursors before and after the bad lines of the first file
        first = FeedDataset(bad.target, batch_size=1, reconnect_deadline_s=10)
        batches = iter(first)
        head = [row for _, batch in zip(range(cut), batches, strict=False) for row in rows_of(batch)]
        cursor = first.state_dict()
        batches.close()  # type: ignore[attr-defined]
        resumed = FeedDataset(bad.target, batch_size=1, reconnect_deadline_s=10)
        resumed.load_state_dict(cursor)
        rest = [row for batch in resumed for row in rows_of(batch)]
        assert texts(head + rest, tokenizer) == whole, cut
