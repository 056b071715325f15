"""`sigil-feed cache build` reports its progress without a terminal: as JSON lines with --log-json (nothing
else on stderr), as text log lines with its total otherwise; stdout's last line is the built store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import rust_pair, write_config, write_jsonl

CLI = [sys.executable, "-m", "sigil_feed.server.cli"]
BUILT = re.compile(r"default: \S+ \(\d+ samples, \d+ tokens\)")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("progress")
    write_jsonl(folder / "pairs.jsonl", [rust_pair(i) for i in range(2000)])
    return folder


def build(corpus: Path, cache: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`cache build` into a fresh store, with a progress line at every step (SIGIL_FEED_PROGRESS_S=0)."""
    config = write_config(corpus / f"{cache}.yaml", {"names": ["local:pairs.jsonl"], "use_cache": True,
                                                     "cache_dir": str(corpus / cache), "shard_records": 400})
    env = {**os.environ, "SIGIL_FEED_PROGRESS_S": "0"}
    env.pop("SIGIL_FEED_LOG_JSON", None)
    return subprocess.run([*CLI, "cache", "build", "--config", str(config), *extra], capture_output=True, text=True,
                          timeout=300, check=True, cwd=corpus, env=env)


def test_log_json_writes_only_json_lines_with_the_progress_and_its_total(corpus: Path) -> None:
    done = build(corpus, "json", "--log-json")
    assert BUILT.fullmatch(done.stdout.splitlines()[-1])
    assert "\r" not in done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line is one JSON object
    assert all(isinstance(line, dict) and "msg" in line for line in lines)
    steps = [line["progress"] for line in lines if "progress" in line and "tokenizing" in line["msg"]]
    size = (corpus / "pairs.jsonl").stat().st_size
    assert len(steps) >= 5 and {step["total"] for step in steps} == {size}  # a start, 5 parts, a last line
    assert steps[0]["done"] == 0 and steps[-1]["done"] == size


def test_without_a_terminal_progress_is_log_lines_with_a_total(corpus: Path) -> None:
    done = build(corpus, "text")
    assert BUILT.fullmatch(done.stdout.splitlines()[-1])
    assert "\r" not in done.stderr
    steps = [line for line in done.stderr.splitlines() if "tokenizing into" in line]
    assert re.search(r"tokenizing into \S+: 0% \(0 B of \d+\.\d kB\)$", steps[0])
    assert any(re.search(r": [1-9]\d?% \(\d+\.\d kB of \d+\.\d kB\), \S+ \S?B/s, ETA ", line) for line in steps)
