"""MosaicML Streaming as a peer: its own virtual environment, and running the worker in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, run_module

REQUIREMENTS = ["torch==2.13.0", "streaming-community"]
WHY_OWN_VENV = ("mosaicml-streaming 0.13.0 (its last release) cannot install beside sigil-feed's pins: pip would "
                "downgrade numpy to 2.1.x and transformers to 4.x and replace torch 2.13.0+cpu with a CUDA torch; "
                "the community fork streaming-community (same `streaming` import, same MDS format) runs in its "
                "own venv")


def default_venv() -> Path:
    """SIGIL_FEED_MOSAIC_VENV, else bench/.venv-mosaic."""
    return Path(os.environ.get("SIGIL_FEED_MOSAIC_VENV") or BENCH_DIR / ".venv-mosaic")


def venv_python(venv: Path) -> Path | None:
    """The venv's python if it has `streaming` installed, else None."""
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    check = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "raise SystemExit(u.find_spec('streaming') is None)"], capture_output=True)
    return python if check.returncode == 0 else None


def setup(venv: Path) -> None:
    """Create the peer's venv (a few minutes: a CPU torch and the streaming package)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", *REQUIREMENTS], check=True)


def run(python: Path, tokens: Path, out: Path, *, batch: int, seq: int, seconds: float, reps: int,
        log: Path) -> dict[str, Any]:
    """Write MDS shards from the token stream and read them back; the worker's result."""
    return run_module(str(BENCH_DIR / "mosaic_worker.py"),
                      ["--tokens", str(tokens), "--out", str(out), "--batch", str(batch), "--seq", str(seq),
                       "--seconds", str(seconds), "--reps", str(reps)], python=str(python), log=log,
                      cwd=out.parent)
