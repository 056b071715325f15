"""Config loading: the trainer's files load unchanged; bad values name the key, the file and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sigil_feed.server.config import load_config
from sigil_feed.server.errors import ConfigError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_phase1_config_loads_unchanged() -> None:
    config = load_config(FIXTURES / "phase1.yaml")
    default = config.datasets["default"]
    assert default.max_seq_len == 4096 and default.pack
    assert default.tokenizer == "meta-llama/Llama-3.1-8B-Instruct"
    assert [s.name for s in default.dataset.names] == ["ammarnasr/the-stack-rust-clean"]
    assert default.dataset.shuffle_seed == 42 and default.dataset.use_cache


def test_phase2_config_loads_unchanged() -> None:
    section = load_config(FIXTURES / "phase2.yaml").datasets["default"].dataset
    assert section.interleave_mode == "weighted" and section.prefer_idiomatic and section.prefer_documented
    assert section.task_weights == {"completion": 1.0, "docstring": 1.5}
    assert len(section.names) == 3


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trainer.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "key"), [
    ("model_name: t\ndataset:\n  names: [local:x]\n  min_length: 10\n  max_length: 5\n", "dataset"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  min_length: 0\n", "dataset.min_length"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  interleave_mode: zigzag\n", "dataset.interleave_mode"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  task_weights: {}\n", "dataset.task_weights"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  task_weights: {a: .inf}\n", "dataset.task_weights.a"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  task_weights: {a: 1e12}\n", "dataset.task_weights.a"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  dataset_weights: {local:x: .nan}\n",
     "dataset.dataset_weights.local:x"),
    ("model_name: t\ndataset:\n  names: [local:x]\n  dataset_weights:\n    - {from_epoch: 0, weights: {local:x: 1}}\n"
     "    - {from_epoch: 1, weights: {local:x: .inf}}\n", "dataset.dataset_weights"),
    ("model_name: t\ndataset:\n  names: [local:x]\nserver:\n  prot: 1\n", "server.prot"),
    ("dataset:\n  names: [local:x]\n", "model_name"),
    ("model_name: t\nserver:\n  port: 1\n", "dataset"),
])
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and f"{key}:" in str(err.value)


def test_unknown_server_key_suggests_removing_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fix: remove the key"):
        load_config(write(tmp_path, "model_name: t\ndataset: {names: [local:x]}\nserver: {colour: red}\n"))


def test_named_datasets_inherit_the_top_level_section(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "model_name: t\nmax_seq_len: 128\ndataset:\n  names: [local:x]\n"
                                         "  shuffle_seed: 3\nserver:\n  datasets:\n    val:\n"
                                         "      max_seq_len: 256\n      dataset: {splits: [val]}\n"))
    val = config.datasets["val"]
    assert val.dataset.splits == ["val"] and val.dataset.shuffle_seed == 3 and val.max_seq_len == 256
    assert config.datasets["default"].dataset.splits == ["train"]
